"""Frozen-feature evaluators: metrics, probes, kNN, metadata, segmentation, hook and CLI.

scikit-learn is used here only as an independent reference (the implementation does not need it).
"""

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    mean_absolute_error,
    roc_auc_score,
)

from raddino_jax import checkpoint, evaluate, extract
from raddino_jax.data.preprocess import preprocess_uint8
from raddino_jax.eval import bootstrap, knn, linear, metadata, segmentation, splits
from raddino_jax.eval import features as feats
from raddino_jax.eval import report as eval_report
from raddino_jax.eval.hook import KnnEvaluator
from raddino_jax.models import ModelSpec, init_params
from raddino_jax.models.vit import vit_config

# ------------------------------------------------------------------------------------------
# Synthetic features with known structure
# ------------------------------------------------------------------------------------------


def clusters(rng, n_per_class, n_classes, dim=16, spread=0.05):
    """Tight clusters around random unit centres: [n_classes * n_per_class, dim], labels."""
    centres = rng.normal(size=(n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    points = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    order = rng.permutation(len(labels))
    return points[order].astype(np.float32), labels[order]


def test_auroc_auprc_balanced_accuracy_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # many ties
    assert linear.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert linear.auprc(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    classes = rng.integers(0, 4, 200)
    predictions = np.where(rng.random(200) < 0.6, classes, rng.integers(0, 4, 200))
    assert linear.balanced_accuracy(classes, predictions) == pytest.approx(
        balanced_accuracy_score(classes, predictions)
    )
    assert np.isnan(linear.auroc(np.ones(5), np.arange(5)))


# Outputs of the NumPy implementations that scikit-learn replaced (linear.auroc as Mann-Whitney
# with average ranks, linear.auprc as a step-wise sum, balanced accuracy as mean per-class
# recall, metadata's MAE / R^2 and closed-form primal / dual ridge), recorded at commit 64d641a
# on the seeded inputs below. Everything is float64, so scikit-learn must agree to 1e-12
# (metrics) and 1e-9 relative (ridge: a different but equally exact linear solve).
HAND_WRITTEN = {
    "auroc": 0.6983901515151515,
    "auprc": 0.6241896270676494,
    "balanced_accuracy": 0.5776978280581736,
    "accuracy": 0.5866666666666667,
    "multiclass": {
        "accuracy": 0.4,
        "balanced_accuracy": 0.41298408951831456,
        "n": 120,
        "auroc_macro_ovr": 0.5462350133894079,
    },
    "binary": {
        "accuracy": 0.5,
        "balanced_accuracy": 0.49776785714285715,
        "n": 120,
        "auroc": 0.45814732142857145,
        "auprc": 0.4992168720027475,
    },
    "mae": 4.18788221427677,
    "r2": 0.8670935564428787,
    # (n, d): intercept, predictions on 4 query rows, sum of squared weights
    "ridge": {
        (60, 7): (
            3.7206720439986136,
            [2.4249204151464703, 0.7179026704989209, 4.35420031703601, 2.0896417414569015],
            4.792552631507282,
        ),
        (10, 25): (
            5.732363337744383,
            [4.624586944720274, 2.8537589837810535, 5.364813964877535, 8.77783973434483],
            28.542817544908992,
        ),
    },
    "age_probe": {
        "mae": 4.127175585202371,
        "r2": 0.7332146220963889,
        "mae_predict_train_mean": 8.925320378887658,
        "alpha": 10.0,
        "n_test": 50,
    },
}


def test_sklearn_metrics_reproduce_the_hand_written_ones():
    rng = np.random.default_rng(2024)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + 0.8 * labels, 1)  # many ties
    assert linear.auroc(labels, scores) == pytest.approx(HAND_WRITTEN["auroc"], abs=1e-12)
    assert linear.auprc(labels, scores) == pytest.approx(HAND_WRITTEN["auprc"], abs=1e-12)
    classes = rng.integers(0, 5, 300)
    predictions = np.where(rng.random(300) < 0.5, classes, rng.integers(0, 5, 300))
    assert linear.balanced_accuracy(classes, predictions) == pytest.approx(
        HAND_WRITTEN["balanced_accuracy"], abs=1e-12
    )
    assert linear.accuracy(classes, predictions) == pytest.approx(
        HAND_WRITTEN["accuracy"], abs=1e-12
    )
    probabilities = rng.dirichlet(np.ones(3), size=120)
    three = linear.classification_metrics(rng.integers(0, 3, 120), probabilities)
    assert three == pytest.approx(HAND_WRITTEN["multiclass"], abs=1e-12)
    probabilities = rng.dirichlet(np.ones(2), size=120)
    two = linear.classification_metrics(rng.integers(0, 2, 120), probabilities)
    assert two == pytest.approx(HAND_WRITTEN["binary"], abs=1e-12)
    ages = rng.normal(50, 15, 200)
    predicted = ages + rng.normal(0, 5, 200)
    assert mean_absolute_error(ages, predicted) == pytest.approx(HAND_WRITTEN["mae"], abs=1e-12)
    assert metadata._r2(ages, predicted) == pytest.approx(HAND_WRITTEN["r2"], abs=1e-12)
    assert np.isnan(metadata._r2(np.full(4, 3.0), np.arange(4.0)))  # as before: constant -> NaN
    for n, d in ((60, 7), (10, 25)):  # primal (d < n) and dual (d > n)
        x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.normal(size=d)
        y = x @ rng.normal(size=d) + 3.0 + rng.normal(size=n)
        model = metadata.fit_ridge(x, y, alpha=1.7)
        intercept, predictions, weight_norm = HAND_WRITTEN["ridge"][(n, d)]
        assert model.intercept == pytest.approx(intercept, rel=1e-9)
        np.testing.assert_allclose(model.predict(rng.normal(size=(4, d))), predictions, rtol=1e-9)
        assert np.sum(model.weights**2) == pytest.approx(weight_norm, rel=1e-9)


def test_age_probe_reproduces_the_hand_written_ridge():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(150, 60)).astype(np.float32)
    age = 50 + 10 * x[:, 0] - 5 * x[:, 3] + rng.normal(0, 4, 150)
    parts = [slice(0, 70), slice(70, 100), slice(100, 150)]
    result = metadata.age_probe(*[(x[p], age[p]) for p in parts])
    assert result == pytest.approx(HAND_WRITTEN["age_probe"], rel=1e-9)


@pytest.mark.parametrize("n_classes, c", [(2, 0.05), (2, 3.0), (3, 0.5)])
def test_logistic_regression_matches_sklearn(n_classes, c):
    rng = np.random.default_rng(1)
    # 100 x 16 like the other probe tests: same padded shape, one compilation for all.
    x = rng.normal(size=(100, 16)) * rng.uniform(0.5, 5, 16) + rng.normal(size=16)
    scores = x @ rng.normal(size=16) / 4 + rng.normal(size=100)
    labels = np.digitize(scores, [-1.0, 1.0][: n_classes - 1])
    model = linear.fit_logistic(x, labels, n_classes, c)
    standardised = model.standardizer(x)
    np.testing.assert_allclose(standardised.mean(0), 0, atol=1e-5)
    reference = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(standardised, labels)
    np.testing.assert_allclose(
        model.probabilities(x), reference.predict_proba(standardised), atol=2e-4
    )


def test_probe_separable_gives_perfect_and_shuffled_gives_chance():
    rng = np.random.default_rng(2)
    x, y = clusters(rng, 150, 2)
    train, val, test = slice(0, 80), slice(80, 120), slice(120, 300)
    probe = linear.select_and_fit(x[train], y[train], x[val], y[val], 2)
    metrics = linear.classification_metrics(y[test], probe.model.probabilities(x[test]))
    assert metrics["accuracy"] == 1.0 and metrics["auroc"] == 1.0 and metrics["auprc"] == 1.0
    assert len(probe.sweep) == len(linear.DEFAULT_C_GRID)

    noise = rng.normal(size=(920, 16)).astype(np.float32)
    labels = rng.permutation(np.arange(920) % 2)
    probe = linear.select_and_fit(noise[:80], labels[:80], noise[80:120], labels[80:120], 2)
    metrics = linear.classification_metrics(labels[120:], probe.model.probabilities(noise[120:]))
    assert abs(metrics["auroc"] - 0.5) < 0.08
    assert abs(metrics["balanced_accuracy"] - 0.5) < 0.08


def test_multiclass_probe_on_clusters():
    rng = np.random.default_rng(3)
    x, y = clusters(rng, 60, 3)
    probe = linear.select_and_fit(x[:90], y[:90], x[90:120], y[90:120], 3)
    metrics = linear.classification_metrics(y[120:], probe.model.probabilities(x[120:]))
    assert metrics["accuracy"] == 1.0 and metrics["auroc_macro_ovr"] == 1.0
    assert "auroc" not in metrics


# ------------------------------------------------------------------------------------------
# kNN
# ------------------------------------------------------------------------------------------


def reference_knn_scores(train, labels, queries, n_classes, k, temperature, max_k):
    """Brute-force NumPy version of recipe s10's weighted kNN."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = np.zeros((len(queries), n_classes))
    for row, similarity in enumerate(queries @ train.T):
        top = np.argsort(-similarity, kind="stable")[:max_k]
        weights = np.exp(similarity[top] / temperature)
        weights /= weights.sum()
        for neighbour, weight in zip(top[:k], weights[:k]):
            out[row, labels[neighbour]] += weight
        out[row] /= out[row].sum()
    return out


def test_knn_scores_match_reference_and_clip_k():
    rng = np.random.default_rng(4)
    train = rng.normal(size=(30, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 30)
    queries = rng.normal(size=(7, 8)).astype(np.float32)
    scores = knn.knn_class_scores(train, labels, queries, 3, ks=(5, 20, 100), temperature=0.07)
    for k in (5, 20):
        # The top-`max(ks)` softmax runs over min(max(ks), N) = 30 neighbours here.
        want = reference_knn_scores(train, labels, queries, 3, k, 0.07, max_k=30)
        np.testing.assert_allclose(scores[k], want, atol=1e-5)
    np.testing.assert_allclose(
        scores[100], reference_knn_scores(train, labels, queries, 3, 30, 0.07, 30), atol=1e-5
    )
    result = knn.knn_evaluate(train, labels, queries, labels[:7], 3, ks=(10, 200))
    assert result["k200"]["effective_k"] == 30 and result["k10"]["effective_k"] == 10


def test_knn_separable_is_perfect_and_shuffled_is_chance():
    rng = np.random.default_rng(5)
    x, y = clusters(rng, 250, 2)
    result = knn.knn_evaluate(x[:300], y[:300], x[300:], y[300:], 2)
    assert all(result[f"k{k}"]["accuracy"] == 1.0 for k in knn.KNN_KS)
    noise = rng.normal(size=(1000, 16)).astype(np.float32)
    labels = rng.permutation(np.arange(1000) % 2)
    result = knn.knn_evaluate(noise[:600], labels[:600], noise[600:], labels[600:], 2)
    assert abs(result["k20"]["balanced_accuracy"] - 0.5) < 0.08


# ------------------------------------------------------------------------------------------
# Metadata probes
# ------------------------------------------------------------------------------------------


def test_ridge_matches_sklearn_in_primal_and_dual():
    rng = np.random.default_rng(6)
    for n, d in ((50, 5), (8, 20)):
        x = rng.normal(size=(n, d))
        y = x @ rng.normal(size=d) + 3.0
        model = metadata.fit_ridge(x, y, alpha=2.5)
        reference = Ridge(alpha=2.5).fit(model.standardizer(x).astype(np.float64), y)
        np.testing.assert_allclose(model.weights, reference.coef_, atol=1e-4)
        assert model.intercept == pytest.approx(reference.intercept_, abs=1e-4)


def test_age_and_sex_probes_recover_planted_signal():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(240, 16)).astype(np.float32)
    age = 50 + 15 * x[:, 0]
    age[:10] = -1  # unknown, dropped
    sex = np.where(x[:, 1] > 0, b"M", b"F").astype(object)
    sex[:5] = b""
    parts = [slice(0, 80), slice(80, 120), slice(120, 240)]
    result = metadata.age_probe(*[(x[p], age[p]) for p in parts])
    assert result["mae"] < 1.0 and result["r2"] > 0.99
    assert result["mae"] < result["mae_predict_train_mean"] / 5
    result = metadata.sex_probe(*[(x[p], sex[p]) for p in parts])
    assert result["auroc"] > 0.97 and result["n"] == 120


# ------------------------------------------------------------------------------------------
# Segmentation probe
# ------------------------------------------------------------------------------------------


def test_patch_fractions_and_dice():
    masks = np.zeros((1, 4, 6), bool)
    masks[0, :2, :2] = True
    masks[0, 3, 5] = True
    np.testing.assert_allclose(
        segmentation.patch_fractions(masks, 2)[0], [[1.0, 0.0, 0.0], [0.0, 0.0, 0.25]]
    )
    assert segmentation.dice(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == 0.5
    assert np.isnan(segmentation.dice(np.zeros(3), np.zeros(3)))
    up = segmentation.upsample_patches(np.array([[[1, 0]]]), 2)
    np.testing.assert_array_equal(up[0], [[1, 1, 0, 0], [1, 1, 0, 0]])


def synthetic_segmentation(rng, n, grid=4, patch=2, dim=32):
    """Patch tokens that encode lesion presence in one direction; CLS only says 'has lesion'."""
    masks = np.zeros((n, grid * patch, grid * patch), bool)
    for i in range(n):
        row, col = rng.integers(0, grid, 2)
        masks[i, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = True
    presence = segmentation.patch_fractions(masks, patch) > 0
    tokens = rng.normal(size=(n, grid, grid, dim)).astype(np.float32)
    tokens[..., 0] += 8.0 * presence
    cls = rng.normal(size=(n, dim)).astype(np.float32)
    return tokens, cls, masks


def test_segmentation_probe_finds_lesions_in_patch_tokens_not_cls():
    rng = np.random.default_rng(8)
    parts = [synthetic_segmentation(rng, n) for n in (40, 10, 20)]
    result = segmentation.segmentation_probe(*parts, patch_size=2)
    assert result["patch_tokens"]["dice_patch"] > 0.95
    assert result["patch_tokens"]["dice_pixel"] > 0.95  # lesions are patch-aligned here
    assert result["dice_pixel_ceiling"] == 1.0
    # One lesion per image at a random place: CLS + position cannot localise it.
    assert result["cls_position"]["dice_patch"] < 0.5


# ------------------------------------------------------------------------------------------
# Data: preprocessing, labels, splits
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(90, 70), (64, 120), (56, 56)])
def test_uint8_crop_plus_normalise_equals_inference_preprocessing(shape):
    pre = checkpoint.Preprocessing(image_size=56, mean=0.5307, std=0.2583)
    image = np.random.default_rng(9).integers(0, 256, shape, dtype=np.uint8)
    got = np.asarray(feats.network_input(feats.crop_uint8(image, 56)[None], pre))[0]
    np.testing.assert_allclose(got, preprocess_uint8(image, pre), atol=1e-5)
    # The mask follows the same geometry: a mask equal to a thresholded image stays aligned.
    mask = (image > 127).astype(np.uint8) * 255
    cropped = feats.crop_mask(mask, 56)
    agreement = np.mean(cropped == (feats.crop_uint8(image, 56) > 127))
    assert cropped.shape == (56, 56) and agreement > 0.8


def test_uint16_records_map_to_uint8_like_preprocess():
    image = np.array([[0, 257, 65535, 32896]], np.uint16)
    np.testing.assert_array_equal(feats.to_uint8_image(image), [[0, 1, 255, 128]])


def test_encode_labels_drops_unknowns():
    codes, names = feats.encode_labels(np.array([1, -1, 0, 2, 1]))
    np.testing.assert_array_equal(codes, [1, -1, 0, 2, 1])
    assert names == ["0", "1", "2"]
    codes, names = feats.encode_labels(np.array([b"M", b"", b"F"], dtype=object))
    np.testing.assert_array_equal(codes, [1, -1, 0])
    codes, _ = feats.encode_labels(np.array([0.5, np.nan, 1.5]))
    np.testing.assert_array_equal(codes, [0, -1, 1])


def test_missing_splits_are_carved_by_patient():
    patients = np.array([f"P{i // 2}".encode() for i in range(60)], dtype=object)
    fields = {
        "patient_id": patients,
        "path": np.array([f"{i}.dcm".encode() for i in range(60)], dtype=object),
        "_split": np.array(["train"] * 60, dtype=object),
    }
    roles, info = splits.assign_roles(["train"], fields, seed=0)
    assert set(info["carved"]) == {"val", "test"}
    assert all(v == 0 for v in info["patient_overlap"].values())
    for patient in set(patients):
        assert len(set(roles[patients == patient])) == 1
    assert info["counts"]["val"] >= 2 and info["counts"]["test"] >= 2
    fields["_split"] = np.array(["train"] * 50 + ["test"] * 10, dtype=object)
    roles, info = splits.assign_roles(["test", "train"], fields, seed=0)
    assert list(info["carved"]) == ["val"] and info["counts"]["test"] == 10


# ------------------------------------------------------------------------------------------
# Bootstrap intervals
# ------------------------------------------------------------------------------------------


def _reference_interval(values):
    return list(np.percentile(np.asarray(values)[np.isfinite(values)], [2.5, 97.5]))


def test_bootstrap_intervals_match_a_numpy_reference():
    """Accuracy and AUROC intervals equal a per-resample loop with NumPy / scikit-learn."""
    rng = np.random.default_rng(3)
    n = 40
    labels = rng.integers(0, 2, n)
    scores = np.round(labels * 0.6 + rng.normal(size=n), 1)  # rounded: ties occur
    probabilities = np.stack([1 - scores, scores], axis=1)
    correct = rng.uniform(size=n) < 0.7
    indices = bootstrap.resample_indices(n, 300, seed=0, key="a")
    np.testing.assert_array_equal(indices, bootstrap.resample_indices(n, 300, seed=0, key="a"))
    assert not np.array_equal(indices, bootstrap.resample_indices(n, 300, seed=1, key="a"))
    assert not np.array_equal(indices, bootstrap.resample_indices(n, 300, seed=0, key="b"))

    got_acc = bootstrap.accuracy_samples(correct, indices)
    np.testing.assert_allclose(got_acc, [correct[i].mean() for i in indices])
    want_auc = [
        roc_auc_score(labels[i], scores[i]) if 0 < labels[i].sum() < n else np.nan for i in indices
    ]
    got_auc = bootstrap.auroc_samples(labels, probabilities, indices)
    np.testing.assert_allclose(got_auc, want_auc, rtol=1e-12)
    assert bootstrap.interval(got_auc) == pytest.approx(_reference_interval(want_auc))

    # Multi-class: macro one-vs-rest over the classes present in each resample.
    labels3 = rng.integers(0, 3, n)
    probs3 = rng.dirichlet(np.ones(3), n)
    idx3 = bootstrap.resample_indices(n, 50, seed=2)
    want3 = []
    for i in idx3:
        present = [c for c in range(3) if 0 < np.sum(labels3[i] == c) < n]
        want3.append(np.mean([roc_auc_score(labels3[i] == c, probs3[i, c]) for c in present]))
    np.testing.assert_allclose(bootstrap.auroc_samples(labels3, probs3, idx3), want3)


def test_balanced_accuracy_intervals_match_scikit_learn():
    """kNN balanced accuracy (the demo's bar, issue 23) is bootstrapped per resample exactly as
    sklearn's balanced_accuracy_score, paired across models by attach_intervals."""
    rng = np.random.default_rng(5)
    n = 50
    labels = rng.choice(3, n, p=[0.6, 0.3, 0.1])  # imbalanced: some resamples miss class 2
    pred_a = np.where(rng.uniform(size=n) < 0.7, labels, rng.integers(0, 3, n))
    pred_b = rng.integers(0, 3, n)
    indices = bootstrap.resample_indices(n, 200, seed=0, key="k")
    want = [balanced_accuracy_score(labels[i], pred_a[i]) for i in indices]
    got = bootstrap.balanced_accuracy_samples(labels, pred_a, indices)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    path = "knn/y/k20/balanced_accuracy"
    per_example = {
        "a": {path: ("balanced_accuracy", labels, pred_a)},
        "b": {path: ("balanced_accuracy", labels, pred_b)},
    }
    out = evaluate.attach_intervals(per_example, [("a", "b")], n_resamples=200, seed=1)
    idx = bootstrap.resample_indices(n, 200, seed=1, key=path)
    diff = [
        balanced_accuracy_score(labels[i], pred_a[i])
        - balanced_accuracy_score(labels[i], pred_b[i])
        for i in idx
    ]
    assert out["differences"]["a_minus_b"][path] == pytest.approx(_reference_interval(diff))


def test_attach_intervals_pairs_models_on_the_same_resamples():
    rng = np.random.default_rng(4)
    n = 60
    labels = rng.integers(0, 2, n)
    a = rng.uniform(size=(n, 2))
    b = rng.uniform(size=(n, 2))
    correct_a, correct_b = rng.uniform(size=n) < 0.8, rng.uniform(size=n) < 0.5
    per_example = {
        "a": {
            "knn/y/k20/accuracy": ("accuracy", correct_a),
            "linear/y/auroc": ("auroc", labels, a),
        },
        "b": {
            "knn/y/k20/accuracy": ("accuracy", correct_b),
            "linear/y/auroc": ("auroc", labels, b),
        },
    }
    out = evaluate.attach_intervals(per_example, [("a", "b")], n_resamples=400, seed=7)
    idx = bootstrap.resample_indices(n, 400, seed=7, key="knn/y/k20/accuracy")
    diff = [correct_a[i].mean() - correct_b[i].mean() for i in idx]
    got = out["differences"]["a_minus_b"]["knn/y/k20/accuracy"]
    assert got == pytest.approx(_reference_interval(diff))
    idx = bootstrap.resample_indices(n, 400, seed=7, key="linear/y/auroc")
    diff = [roc_auc_score(labels[i], a[i, 1]) - roc_auc_score(labels[i], b[i, 1]) for i in idx]
    assert out["differences"]["a_minus_b"]["linear/y/auroc"] == pytest.approx(
        _reference_interval(diff)
    )
    for model in ("a", "b"):
        low, high = out["models"][model]["knn/y/k20/accuracy"]
        assert 0.0 <= low <= high <= 1.0
    # The interval of a clearly better model lies above: a's accuracy ~0.8, b's ~0.5.
    assert out["models"]["a"]["knn/y/k20/accuracy"][0] > out["models"]["b"]["knn/y/k20/accuracy"][1]


# ------------------------------------------------------------------------------------------
# On a built dataset with a tiny model
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def samples_dataset(tmp_path_factory):
    """The built-in samples (6 real CRs + 40 phantoms with masks) built at 112 px."""
    from data_prep import build, samples

    root = tmp_path_factory.mktemp("eval_data")
    samples.generate_samples(root / "raw", n_phantoms=40, size=128, seed=0)
    build.main(
        [
            "--input", str(root / "raw" / "labels.csv"),
            "--output", str(root / "tfds"),
            "--name", "samples",
            "--size", "112",
            "--workers", "1",
        ]
    )  # fmt: skip
    return str(root / "tfds"), "samples"


TINY_SPEC = ModelSpec(vit_config("vit_small", embed_dim=32, depth=2, num_heads=2, img_size=56))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Two tiny random ViTs saved as parameter checkpoints (seeds 1 and 2)."""
    root = tmp_path_factory.mktemp("eval_ckpt")
    paths = []
    for seed in (1, 2):
        path = root / f"seed{seed}"
        checkpoint.save_params(
            path, TINY_SPEC, init_params(TINY_SPEC, seed), checkpoint.Preprocessing(image_size=56)
        )
        paths.append(str(path))
    return paths


def test_knn_evaluator_matches_independent_extraction(samples_dataset, tiny_checkpoints):
    """The hook's cached uint8 path equals preprocess_uint8 + extract.make_feature_fn + kNN."""
    from raddino_jax.data.images import decode_png
    from raddino_jax.data.records import open_split

    data_dir, name = samples_dataset
    spec, params = checkpoint.load_any_params(tiny_checkpoints[0])
    pre = checkpoint.load_preprocessing(tiny_checkpoints[0])
    evaluator = KnnEvaluator(data_dir, name, "effusion", pre, spec, batch_size=8)
    metrics = evaluator(params)
    assert set(metrics) == {f"knn/{m}_k{k}" for m in ("top1", "balanced_acc") for k in (10, 20)}
    assert evaluator(params) == metrics  # deterministic

    network = extract.make_feature_fn(spec)
    embedded = {}
    for split in ("train", "val"):
        records = [r for r in open_split(data_dir, name, split) if r["effusion"] >= 0]
        images = np.stack([preprocess_uint8(decode_png(r["image"]), pre) for r in records])
        embedded[split] = (
            np.asarray(network(params, images)["cls"]),
            np.array([r["effusion"] for r in records]),
        )
    np.testing.assert_array_equal(evaluator.train_labels, embedded["train"][1])
    np.testing.assert_array_equal(evaluator.eval_labels, embedded["val"][1])
    # The two extraction paths agree to float32 noise. A random tiny ViT's CLS tokens are nearly
    # identical across images (kNN weights all ~1/k), so that noise can reorder near-tied
    # neighbours: the kNN metrics are compared on the hook's own features, the features here.
    hook_features = {
        "train": np.asarray(evaluator._cls(params, evaluator.train_crops)),
        "val": np.asarray(evaluator._cls(params, evaluator.eval_crops)),
    }
    for split in ("train", "val"):
        np.testing.assert_allclose(hook_features[split], embedded[split][0], atol=1e-5)
    want = knn.knn_evaluate(
        hook_features["train"], embedded["train"][1], hook_features["val"], embedded["val"][1], 3,
        ks=(10, 20),
    )  # fmt: skip
    for k in (10, 20):
        assert metrics[f"knn/top1_k{k}"] == pytest.approx(want[f"k{k}"]["accuracy"])
        assert metrics[f"knn/balanced_acc_k{k}"] == pytest.approx(
            want[f"k{k}"]["balanced_accuracy"]
        )


def test_metadata_probes_on_phantoms(samples_dataset, tiny_checkpoints):
    data_dir, name = samples_dataset
    spec, params = checkpoint.load_any_params(tiny_checkpoints[0])
    pre = checkpoint.load_preprocessing(tiny_checkpoints[0])
    roles, info = splits.load_roles(data_dir, name, 56, max_examples=None, with_masks=False, seed=0)
    assert info["carved"] == {} and all(v == 0 for v in info["patient_overlap"].values())
    result = evaluate.evaluate_model(spec, params, pre, roles, ["nodule"], ["metadata"])
    sex, age = result["metadata"]["sex"], result["metadata"]["age"]
    known_sex = np.sum(metadata.encode_sex(roles["test"].fields["sex"]) >= 0)
    assert sex["n"] == known_sex > 0 and 0.0 <= sex["auroc"] <= 1.0
    known_age = np.sum(roles["test"].fields["age_years"] >= 0)
    assert age["n_test"] == known_age > 0
    # Phantom ages span 20-85: any sane regressor is within that range of error.
    assert 0.0 < age["mae"] < 40.0 and np.isfinite(age["r2"])


def test_cli_end_to_end_with_random_init_and_baseline(samples_dataset, tiny_checkpoints, tmp_path):
    data_dir, name = samples_dataset
    out = tmp_path / "report"
    argv = [
        "--checkpoint", tiny_checkpoints[0],
        "--data", f"{data_dir}/{name}",
        "--label", "nodule,effusion",
        "--out", str(out),
        "--baseline", tiny_checkpoints[0],
    ]  # fmt: skip
    assert evaluate.main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert set(report["models"]) == {"checkpoint", "random_init", "baseline", "pixels"}
    checkpoint_scores = eval_report.flatten_scores(report["models"]["checkpoint"])
    random_scores = eval_report.flatten_scores(report["models"]["random_init"])
    for key in ("knn/nodule/k20/accuracy", "linear/nodule/auroc", "linear/effusion/accuracy"):
        assert key in checkpoint_scores
    assert "metadata/sex/auroc" in checkpoint_scores and "metadata/age/mae" in checkpoint_scores
    assert "segmentation/patch_tokens/dice_patch" in checkpoint_scores
    # The baseline is the checkpoint itself: every difference is exactly 0 (determinism).
    assert report["differences"]["checkpoint_minus_baseline"]
    assert all(
        v in (0.0, None) for v in report["differences"]["checkpoint_minus_baseline"].values()
    )
    for key, value in report["differences"]["checkpoint_minus_random_init"].items():
        if value is not None:
            assert value == pytest.approx(checkpoint_scores[key] - random_scores[key])
    assert checkpoint_scores != random_scores  # seed 1 weights vs seed 0 random init
    assert report["models"]["checkpoint"]["knn"]["nodule"]["note"].startswith("only")
    table = (out / "eval.md").read_text()
    assert "| metric | checkpoint | random_init | baseline | pixels |" in table
    assert "linear/nodule/auroc" in table


def test_cli_other_baseline_and_single_task(samples_dataset, tiny_checkpoints, tmp_path):
    data_dir, name = samples_dataset
    argv = [
        "--checkpoint", tiny_checkpoints[0],
        "--data", f"{data_dir}/{name}",
        "--label", "label_sex",
        "--task", "knn",
        "--out", str(tmp_path),
        "--baseline", tiny_checkpoints[1],
    ]  # fmt: skip
    assert evaluate.main(argv) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["tasks"] == ["knn"] and set(report["models"]["baseline"]) == {"knn", "features"}
    diffs = report["differences"]["checkpoint_minus_baseline"]
    ours = eval_report.flatten_scores(report["models"]["checkpoint"])
    theirs = eval_report.flatten_scores(report["models"]["baseline"])
    assert set(diffs) == set(ours) and "knn/label_sex/k10/balanced_accuracy" in diffs
    for key, value in diffs.items():
        assert value == pytest.approx(ours[key] - theirs[key])
    argv[argv.index("label_sex")] = "no_such_field"
    assert evaluate.main(argv) == 1


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A training-run directory with teacher/student checkpoints at steps 10 and 20."""
    import orbax.checkpoint as ocp

    root = tmp_path_factory.mktemp("eval_run")
    (root / checkpoint.SPEC_FILE).write_text(TINY_SPEC.to_json())
    (root / checkpoint.PREPROCESSING_FILE).write_text(
        checkpoint.Preprocessing(image_size=56).to_json()
    )
    manager = ocp.CheckpointManager(
        (root / checkpoint.CHECKPOINTS_DIR).resolve(), item_names=checkpoint.MODEL_ITEMS
    )
    for step, seed in ((10, 1), (20, 2)):
        params = init_params(TINY_SPEC, seed)
        manager.save(
            step,
            args=ocp.args.Composite(
                teacher=ocp.args.StandardSave(params), student=ocp.args.StandardSave(params)
            ),
        )
    manager.wait_until_finished()
    manager.close()
    return str(root)


def test_cli_curve_and_intervals(samples_dataset, tiny_run, tmp_path):
    """--curve evaluates every kept step; the last step's point equals the main report's
    checkpoint (latest step) score and interval; the figure and curve.json are written."""
    data_dir, name = samples_dataset
    argv = [
        "--checkpoint", tiny_run,
        "--data", f"{data_dir}/{name}",
        "--label", "effusion_present,effusion",
        "--task", "knn",
        "--out", str(tmp_path),
        "--bootstrap", "200",
        "--curve",
    ]  # fmt: skip
    assert evaluate.main(argv) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    curve = json.loads((tmp_path / "curve.json").read_text())
    png = tmp_path / "curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert curve["steps"] == [10, 20]
    assert set(curve["models"]) == {"random_init", "step_10", "step_20", "pixels"}
    assert curve["paths"]["effusion"]["linear"] == "linear/effusion/auroc_macro_ovr"
    for model, points in curve["models"].items():
        assert len(points) == 4, model  # 2 labels x (kNN, probe)
        for point in points.values():
            low, high = point["ci95"]
            assert 0.0 <= low <= point["value"] <= high <= 1.0
    path = "knn/effusion_present/k20/accuracy"
    assert curve["models"]["step_20"][path]["value"] == pytest.approx(
        report["models"]["checkpoint"]["knn"]["effusion_present"]["k20"]["accuracy"]
    )
    assert curve["models"]["step_20"][path]["ci95"] == pytest.approx(
        report["intervals"]["models"]["checkpoint"][path]
    )
    assert curve["models"]["random_init"][path]["ci95"] == pytest.approx(
        report["intervals"]["models"]["random_init"][path]
    )
    low, high = curve["differences"]["step_10"][path]
    assert -1.0 <= low <= high <= 1.0
    assert "## 95% bootstrap intervals" in (tmp_path / "eval.md").read_text()


def test_cli_knn_only_curve_and_task_list(samples_dataset, tiny_run, tmp_path):
    """--curve-tasks knn: the curve holds kNN points only (no probe fit per step) and still
    plots; --task takes a comma-separated list and refuses unknown tasks."""
    data_dir, name = samples_dataset
    argv = [
        "--checkpoint", tiny_run,
        "--data", f"{data_dir}/{name}",
        "--label", "effusion_present",
        "--task", "knn",
        "--out", str(tmp_path),
        "--bootstrap", "100",
        "--curve", "--curve-tasks", "knn", "--curve-max-examples", "40",
    ]  # fmt: skip
    assert evaluate.main(argv) == 0
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert curve["tasks"] == ["knn"]
    assert curve["paths"] == {"effusion_present": {"knn": "knn/effusion_present/k20/accuracy"}}
    for points in curve["models"].values():
        assert list(points) == ["knn/effusion_present/k20/accuracy"]
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = ["--checkpoint", tiny_run, "--data", f"{data_dir}/{name}", "--label", "nodule"]
    assert evaluate.main([*bad, "--task", "knn,bogus", "--out", str(tmp_path / "x")]) == 2
    # A typo in --curve-tasks fails before any model is evaluated, not silently dropped.
    typo = ["--task", "knn", "--curve", "--curve-tasks", "knn,linaer", "--out", str(tmp_path / "y")]
    assert evaluate.main([*bad, *typo]) == 2
    assert not (tmp_path / "y").exists()
