"""Logistic-regression probes on frozen features, and the classification metrics they report.

The probe follows the dinov2 logistic-regression protocol (recipe s10: L-BFGS, L2 penalty, C swept
on a validation split). The objective is scikit-learn's

    C * sum_i loss_i + 0.5 * ||W||^2        (intercept not penalised)

divided by C * N (same minimiser), minimised with optax's L-BFGS in a jitted `while_loop`.
Binary problems use one sigmoid output (as scikit-learn does), multi-class problems a softmax
over K outputs. Features are standardised with the training statistics.

Why not `sklearn.linear_model.LogisticRegression`: each fit is one compiled program on the
default JAX device (float32, warm-started from the neighbouring C, rows padded to a power of
two so the sweep and the train + val refit share one compilation), so on a GPU / TPU host the
23-45 fits of a C sweep run on the accelerator rather than in scikit-learn's float64 solver on
the host's CPU cores. tests/test_eval.py checks the solution against scikit-learn's on the same
objective. (The speed argument is not benchmarked on an accelerator in this repository.)

The metrics are scikit-learn's (`accuracy_score`, `balanced_accuracy_score`, `roc_auc_score`,
`average_precision_score`) behind thin wrappers that return NaN where a score is undefined
(one class only) instead of raising or warning.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _sklearn_metrics():
    """scikit-learn's metrics, imported on first use: the training driver imports this module
    (the periodic kNN's accuracy) and should not pay sklearn's ~1 s import when eval is off."""
    from sklearn import metrics

    return metrics


# recipe s10 sweeps C over 10^linspace(-6, 5, 45); the default here keeps every other point of
# that grid (23 values, same range) to halve the cost; pass FULL_C_GRID for the recipe's grid.
FULL_C_GRID = tuple(float(c) for c in np.logspace(-6, 5, 45))
DEFAULT_C_GRID = FULL_C_GRID[::2]
# Every fourth value (12, same range): the demo's quick evaluation (scripts/demo.sh).
COARSE_C_GRID = FULL_C_GRID[::4]
LBFGS_MAX_ITER = 500
LBFGS_TOLERANCE = 1e-5

# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Fraction of `predictions` [N] equal to `labels` [N]."""
    return float(_sklearn_metrics().accuracy_score(np.asarray(labels), np.asarray(predictions)))


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean per-class recall over the classes present in `labels` (`balanced_accuracy_score`).

    Predicted classes absent from `labels` count as errors but not as classes (scikit-learn
    warns about them; the warning is silenced: kNN on a small test split hits it routinely).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        score = _sklearn_metrics().balanced_accuracy_score
        return float(score(np.asarray(labels), np.asarray(predictions)))


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of binary `labels` [N] (0/1) given `scores` [N].

    `roc_auc_score` (tied scores count one half); NaN when only one class is present.
    """
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(_sklearn_metrics().roc_auc_score(labels, np.asarray(scores, np.float64)))


def auprc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of binary `labels` [N] given `scores` [N] (`average_precision_score`:
    step-wise, no interpolation). NaN without positives."""
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return float("nan")
    return float(_sklearn_metrics().average_precision_score(labels, np.asarray(scores, np.float64)))


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Metrics of class `probabilities` [N, K] against integer `labels` [N].

    Always accuracy and balanced accuracy. Binary (K == 2): AUROC and AUPRC of class 1.
    Multi-class: macro one-vs-rest AUROC over the classes with both positives and negatives.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    predictions = np.argmax(probabilities, axis=1)
    result = {
        "accuracy": accuracy(labels, predictions),
        "balanced_accuracy": balanced_accuracy(labels, predictions),
        "n": int(len(labels)),
    }
    if probabilities.shape[1] == 2:
        result["auroc"] = auroc(labels == 1, probabilities[:, 1])
        result["auprc"] = auprc(labels == 1, probabilities[:, 1])
    else:
        per_class = [
            auroc(labels == c, probabilities[:, c])
            for c in range(probabilities.shape[1])
            if 0 < np.sum(labels == c) < len(labels)
        ]
        result["auroc_macro_ovr"] = float(np.mean(per_class)) if per_class else float("nan")
    return result


# ------------------------------------------------------------------------------------------
# Logistic regression
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Standardizer:
    """Per-feature affine map fitted on training features: (x - mean) / scale.

    Constant features get scale 1 so they map to 0 instead of dividing by zero.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> Standardizer:
        """Statistics of `features` [N, D] (float64 for accuracy)."""
        features = np.asarray(features, np.float64)
        scale = features.std(axis=0)
        scale = np.where(scale > 1e-8 * max(1.0, float(np.abs(features).max())), scale, 1.0)
        return cls(mean=features.mean(axis=0), scale=scale)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """[N, D] -> standardised float32 [N, D]."""
        return ((np.asarray(features, np.float64) - self.mean) / self.scale).astype(np.float32)


def _logistic_loss(params, features, targets, row_mask, inverse_c_n, binary: bool):
    """Mean cross-entropy over real rows + ||W||^2 / (2 C N).

    features [R, D]; targets [R] in [0, 1] (binary) or one-hot [R, K]; row_mask [R] is 1 for
    the N real rows and 0 for padding.
    """
    weights, bias = params
    logits = features @ weights + bias
    if binary:
        logits = logits[:, 0]
        per_row = jax.nn.softplus(logits) - targets * logits
    else:
        per_row = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    data_loss = jnp.sum(per_row * row_mask) / jnp.sum(row_mask)
    return data_loss + 0.5 * inverse_c_n * jnp.sum(weights**2)


def _padded_rows(n: int) -> int:
    """Row count rounded up to a power of two (at least 64): few shapes, few compiles."""
    return max(64, 1 << (n - 1).bit_length())


def _pad(array: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([array, np.zeros((rows - len(array), *array.shape[1:]), array.dtype)])


@functools.partial(jax.jit, static_argnames=("binary", "max_iter"))
def _solve_lbfgs(params, features, targets, row_mask, inverse_c_n, *, binary: bool, max_iter: int):
    """L-BFGS (optax, zoom line search) from `params` until ||grad|| < tol or max_iter steps."""

    def loss(p):
        return _logistic_loss(p, features, targets, row_mask, inverse_c_n, binary)

    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = optimizer.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(p, updates), state

    def not_converged(carry):
        _, state = carry
        count = optax.tree_utils.tree_get(state, "count")
        grad_norm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))
        return (count == 0) | ((count < max_iter) & (grad_norm >= LBFGS_TOLERANCE))

    params, _ = jax.lax.while_loop(not_converged, step, (params, optimizer.init(params)))
    return params


@dataclasses.dataclass(frozen=True)
class LogisticModel:
    """A fitted probe: standardiser + linear map. weights [D, 1] (binary) or [D, K]."""

    standardizer: Standardizer
    weights: np.ndarray
    bias: np.ndarray
    n_classes: int
    c: float

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Raw features [N, D] -> logits [N, 1] (binary) or [N, K]."""
        return self.standardizer(features) @ self.weights + self.bias

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Raw features [N, D] -> class probabilities [N, K] (K = 2 for binary)."""
        logits = self.logits(features).astype(np.float64)
        if self.n_classes == 2:
            positive = 1.0 / (1.0 + np.exp(-logits[:, 0]))
            return np.stack([1.0 - positive, positive], axis=1)
        logits = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)


def _targets(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Integer labels [N] -> float32 targets: [N] for binary, one-hot [N, K] otherwise.

    Float labels in [0, 1] are kept as soft binary targets (e.g. a patch's lesion fraction).
    """
    labels = np.asarray(labels)
    if n_classes == 2:
        return labels.astype(np.float32)
    return np.eye(n_classes, dtype=np.float32)[labels.astype(np.int64)]


def fit_logistic(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    c: float,
    *,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    standardizer: Standardizer | None = None,
    max_iter: int = LBFGS_MAX_ITER,
    min_rows: int = 0,
) -> LogisticModel:
    """L2-penalised logistic regression (scikit-learn's objective at inverse strength `c`).

    Args:
      features: [N, D] raw features (standardised here with `standardizer` or their own stats).
      labels: [N] integer classes in [0, n_classes), or soft targets in [0, 1] when binary.
      n_classes: K >= 2; K == 2 fits a single sigmoid output.
      c: inverse regularisation strength (larger = weaker penalty).
      init: optional (weights, bias) warm start (from a neighbouring C).
      min_rows: pad the rows to at least this many (masked out of the loss) so that fits of
        different sizes (a sweep on train, the refit on train + val) share one compilation.
    Returns:
      the fitted LogisticModel.
    """
    if n_classes < 2:
        raise ValueError(f"a probe needs at least 2 classes, got {n_classes}")
    standardizer = standardizer or Standardizer.fit(features)
    n = len(features)
    rows = _padded_rows(max(n, min_rows))
    x = _pad(standardizer(features), rows)
    outputs = 1 if n_classes == 2 else n_classes
    if init is None:
        init = (np.zeros((x.shape[1], outputs), np.float32), np.zeros((outputs,), np.float32))
    params = (jnp.asarray(init[0], jnp.float32), jnp.asarray(init[1], jnp.float32))
    weights, bias = _solve_lbfgs(
        params,
        jnp.asarray(x),
        jnp.asarray(_pad(_targets(labels, n_classes), rows)),
        jnp.asarray(_pad(np.ones(n, np.float32), rows)),
        jnp.float32(1.0 / (c * n)),
        binary=n_classes == 2,
        max_iter=max_iter,
    )
    return LogisticModel(standardizer, np.asarray(weights), np.asarray(bias), n_classes, float(c))


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean negative log-likelihood of integer `labels` [N] under `probabilities` [N, K]."""
    picked = np.asarray(probabilities)[np.arange(len(labels)), np.asarray(labels, np.int64)]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))


def _selection_key(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """Validation score to maximise: (AUROC if binary and defined, else accuracy; -log-loss)."""
    if probabilities.shape[1] == 2:
        primary = auroc(labels == 1, probabilities[:, 1])
        if np.isnan(primary):
            primary = accuracy(labels, probabilities.argmax(1))
    else:
        primary = accuracy(labels, probabilities.argmax(1))
    return primary, -log_loss(labels, probabilities)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """The chosen C, the validation sweep [(C, primary, -log-loss)], and the final model."""

    model: LogisticModel
    best_c: float
    sweep: list[tuple[float, float, float]]


def select_and_fit(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    n_classes: int,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    refit_on_train_and_val: bool = True,
) -> ProbeResult:
    """Sweep C (ascending, warm-started) on train, pick it on validation, then refit.

    Selection: validation AUROC for binary labels, accuracy for multi-class (recipe s10 selects
    on validation accuracy); ties go to the lower validation log-loss, then to the smaller C.
    The final probe is refitted on train + validation (both disjoint from test by patient)
    with the chosen C, unless `refit_on_train_and_val` is False.
    """
    standardizer = Standardizer.fit(train_features)
    rows = len(train_features) + len(val_features)
    sweep, best, init = [], None, None
    for c in sorted(c_grid):
        model = fit_logistic(
            train_features,
            train_labels,
            n_classes,
            c,
            init=init,
            standardizer=standardizer,
            min_rows=rows,
        )
        init = (model.weights, model.bias)
        primary, neg_loss = _selection_key(val_labels, model.probabilities(val_features))
        sweep.append((float(c), primary, neg_loss))
        if best is None or (primary, neg_loss) > best[0]:
            best = ((primary, neg_loss), c, model)
    _, best_c, model = best
    if refit_on_train_and_val:
        model = fit_logistic(
            np.concatenate([train_features, val_features]),
            np.concatenate([train_labels, val_labels]),
            n_classes,
            best_c,
            init=(model.weights, model.bias),
        )
    return ProbeResult(model=model, best_c=float(best_c), sweep=sweep)
