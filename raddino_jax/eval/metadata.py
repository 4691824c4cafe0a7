"""Metadata probes as in RAD-DINO: patient sex (AUROC) and age (MAE, R^2) from frozen features.

The targets come from the metadata `data_prep` stores with every record: `sex` (b'M' / b'F',
b'' unknown) and `age_years` (-1 unknown); unknown values are dropped per probe. Sex uses the
logistic probe of `linear`; age uses scikit-learn's `Ridge` on standardised features with the
penalty chosen on the validation split by mean absolute error (a held-out split like the other
probes, not `RidgeCV`'s leave-one-out), scored with `mean_absolute_error` and `r2_score`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_absolute_error, r2_score

from raddino_jax.eval.linear import (
    DEFAULT_C_GRID,
    Standardizer,
    classification_metrics,
    select_and_fit,
)

# Ridge penalties (on standardised features, un-normalised sum of squares) swept on validation.
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-3, 5, 17))
SEX_CLASSES = (b"F", b"M")


def _r2(targets: np.ndarray, predictions: np.ndarray) -> float:
    """`r2_score`, but NaN for constant targets (scikit-learn would report 0 or 1 there)."""
    targets = np.asarray(targets, np.float64)
    if np.ptp(targets) == 0:
        return float("nan")
    return float(r2_score(targets, predictions))


@dataclasses.dataclass(frozen=True)
class RidgeModel:
    """y = standardise(x) @ weights + intercept."""

    standardizer: Standardizer
    weights: np.ndarray
    intercept: float
    alpha: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        """[N, D] -> [N] float64."""
        return self.standardizer(features).astype(np.float64) @ self.weights + self.intercept


def fit_ridge(
    features: np.ndarray,
    targets: np.ndarray,
    alpha: float,
    standardizer: Standardizer | None = None,
) -> RidgeModel:
    """argmin ||y - Xw - b||^2 + alpha ||w||^2 (b unpenalised) on standardised X, float64.

    `sklearn.linear_model.Ridge` (its "auto" solver: Cholesky, in the dual when D > N).
    """
    standardizer = standardizer or Standardizer.fit(features)
    x = standardizer(features).astype(np.float64)
    ridge = Ridge(alpha=alpha).fit(x, np.asarray(targets, np.float64))
    return RidgeModel(standardizer, ridge.coef_, float(ridge.intercept_), float(alpha))


def age_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    alphas: Sequence[float] = RIDGE_ALPHAS,
) -> dict[str, float]:
    """Ridge regression of age; alpha by validation MAE, refitted on train + val.

    Each argument is (features [N, D], age [N]); unknown ages (< 0 or NaN) are dropped.
    Returns test MAE and R^2, the MAE of always predicting the training mean, and the alpha.
    """
    train, val, test = (_known_ages(*part) for part in (train, val, test))
    if min(len(train[1]), len(val[1]), len(test[1])) == 0:
        return {"skipped": "no known ages in one of the splits"}
    standardizer = Standardizer.fit(train[0])
    val_mae = []
    for alpha in alphas:
        model = fit_ridge(train[0], train[1], alpha, standardizer)
        val_mae.append(mean_absolute_error(val[1], model.predict(val[0])))
    best_alpha = float(alphas[int(np.argmin(val_mae))])
    model = fit_ridge(
        np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]), best_alpha
    )
    predictions = model.predict(test[0])
    return {
        "mae": float(mean_absolute_error(test[1], predictions)),
        "r2": _r2(test[1], predictions),
        "mae_predict_train_mean": float(
            mean_absolute_error(test[1], np.full(len(test[1]), train[1].mean()))
        ),
        "alpha": best_alpha,
        "n_test": int(len(test[1])),
    }


def _known_ages(features: np.ndarray, ages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ages = np.asarray(ages, np.float64)
    keep = np.isfinite(ages) & (ages >= 0)
    return features[keep], ages[keep]


def encode_sex(values: np.ndarray) -> np.ndarray:
    """b'F' -> 0, b'M' -> 1, anything else (b'', b'O') -> -1 (dropped)."""
    lookup = {name: index for index, name in enumerate(SEX_CLASSES)}
    return np.asarray([lookup.get(bytes(v).strip().upper(), -1) for v in values], np.int64)


def sex_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    c_grid: Sequence[float] = DEFAULT_C_GRID,
) -> dict[str, float]:
    """Logistic probe of sex (1 = male); each argument is (features [N, D], sex values [N]).

    Returns test AUROC, AUPRC, accuracy and balanced accuracy, plus the chosen C.
    """
    parts = []
    for features, values in (train, val, test):
        codes = encode_sex(values)
        parts.append((features[codes >= 0], codes[codes >= 0]))
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = parts
    if len(set(y_train.tolist())) < 2 or len(y_val) == 0 or len(y_test) == 0:
        return {"skipped": "sex needs both classes in train and known values in val and test"}
    probe = select_and_fit(x_train, y_train, x_val, y_val, 2, c_grid)
    metrics = classification_metrics(y_test, probe.model.probabilities(x_test))
    return {**metrics, "c": probe.best_c}
