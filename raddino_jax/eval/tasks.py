"""The evaluation driver behind `python -m raddino_jax.evaluate` (recipe s10): per-task glue
(labels per split -> the probes of `eval/`), the pixel reference, bootstrap intervals and
`run_evaluation`, the whole report of one checkpoint. The module docstring of
`raddino_jax/evaluate.py` describes the tasks and the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from raddino_jax import checkpoint
from raddino_jax.data.records import split_dataset_path
from raddino_jax.eval import bootstrap
from raddino_jax.eval import features as feats
from raddino_jax.eval.knn import KNN_KS, KNN_TEMPERATURE, knn_class_scores, knn_metrics
from raddino_jax.eval.linear import (
    DEFAULT_C_GRID,
    classification_metrics,
    select_and_fit,
)
from raddino_jax.eval.metadata import age_probe, sex_probe
from raddino_jax.eval.report import differences
from raddino_jax.eval.segmentation import segmentation_probe
from raddino_jax.eval.splits import load_roles
from raddino_jax.models import ModelSpec, init_params

TASKS = ("knn", "linear", "metadata", "segmentation")


# ------------------------------------------------------------------------------------------
# Evaluations of one model
# ------------------------------------------------------------------------------------------


def _labels_per_role(roles: dict[str, feats.SplitData], label: str):
    """Class codes per role (encoded jointly so the classes agree) and the class names."""
    values = np.concatenate([roles[r].fields[label] for r in feats.SPLIT_ROLES])
    codes, names = feats.encode_labels(values)
    sizes = np.cumsum([0] + [len(roles[r]) for r in feats.SPLIT_ROLES])
    return {r: codes[sizes[i] : sizes[i + 1]] for i, r in enumerate(feats.SPLIT_ROLES)}, names


def knn_task(features, roles, labels, ks, temperature, per_example=None) -> dict[str, Any]:
    """kNN per label: train split as memory, test split as queries.

    With a `per_example` dict, also records each test example's correctness under the score's
    path ("knn/<label>/k<k>/accuracy" -> ("accuracy", correct [N])) for bootstrap intervals.
    """
    out = {}
    for label in labels:
        codes, names = _labels_per_role(roles, label)
        train, test = codes["train"] >= 0, codes["test"] >= 0
        n_train, n_test = int(train.sum()), int(test.sum())
        if n_train == 0 or n_test == 0 or len(names) < 2:
            out[label] = {"skipped": "needs >= 2 classes and known labels in train and test"}
            continue
        test_codes = codes["test"][test]
        scores = knn_class_scores(
            features["train"]["cls"][train],
            codes["train"][train],
            features["test"]["cls"][test],
            len(names),
            ks,
            temperature,
        )
        result = knn_metrics(scores, test_codes, n_train)
        if per_example is not None:
            for k, class_scores in scores.items():
                predicted = class_scores.argmax(axis=1)
                per_example[f"knn/{label}/k{k}/accuracy"] = ("accuracy", predicted == test_codes)
                per_example[f"knn/{label}/k{k}/balanced_accuracy"] = (
                    "balanced_accuracy",
                    test_codes,
                    predicted,
                )
        result["n_train"], result["n_test"] = n_train, n_test
        if n_train < max(ks):
            result["note"] = f"only {n_train} training examples: k above that uses all of them"
        out[label] = result
    return out


def linear_task(probe_inputs, roles, labels, c_grid, per_example=None) -> dict[str, Any]:
    """Logistic probe per label, C chosen on val, metrics on test.

    With a `per_example` dict, also records the test labels and probabilities under the AUROC's
    path ("linear/<label>/auroc" or ".../auroc_macro_ovr" -> ("auroc", labels, probabilities)).
    """
    out = {}
    for label in labels:
        codes, names = _labels_per_role(roles, label)
        keep = {r: codes[r] >= 0 for r in feats.SPLIT_ROLES}
        x = {r: probe_inputs[r][keep[r]] for r in feats.SPLIT_ROLES}
        y = {r: codes[r][keep[r]] for r in feats.SPLIT_ROLES}
        if len(set(y["train"].tolist())) < 2 or len(y["val"]) == 0 or len(y["test"]) == 0:
            out[label] = {"skipped": "needs >= 2 classes in train and known labels in val/test"}
            continue
        probe = select_and_fit(x["train"], y["train"], x["val"], y["val"], len(names), c_grid)
        probabilities = probe.model.probabilities(x["test"])
        metrics = classification_metrics(y["test"], probabilities)
        out[label] = {**metrics, "c": probe.best_c, "classes": names}
        if per_example is not None:
            name = "auroc" if len(names) == 2 else "auroc_macro_ovr"
            per_example[f"linear/{label}/{name}"] = ("auroc", y["test"], probabilities)
    return out


def metadata_task(probe_inputs, roles, c_grid) -> dict[str, Any]:
    """Sex (AUROC) and age (MAE, R^2) probes from the stored DICOM metadata."""
    out = {}
    if "sex" in roles["train"].fields:
        out["sex"] = sex_probe(
            *[(probe_inputs[r], roles[r].fields["sex"]) for r in feats.SPLIT_ROLES], c_grid
        )
    if "age_years" in roles["train"].fields:
        out["age"] = age_probe(
            *[(probe_inputs[r], roles[r].fields["age_years"]) for r in feats.SPLIT_ROLES]
        )
    return out


def segmentation_task(features, roles, labels, patch_size) -> dict[str, Any]:
    """Patch probe on examples whose masks are trustworthy (a known value of some label)."""
    parts = []
    for role in feats.SPLIT_ROLES:
        known = np.zeros(len(roles[role]), bool)
        for label in labels:
            codes, _ = feats.encode_labels(roles[role].fields[label])
            known |= codes >= 0
        if known.sum() == 0:
            return {"skipped": f"no {role} example with a known label (masks untrusted)"}
        tokens = features[role]
        parts.append((tokens["patch"][known], tokens["cls"][known], roles[role].masks[known]))
    return segmentation_probe(*parts, patch_size=patch_size)


def evaluate_model(
    spec: ModelSpec,
    params: Any,
    pre: checkpoint.Preprocessing,
    roles: dict[str, feats.SplitData],
    labels: Sequence[str],
    tasks: Sequence[str],
    *,
    n_last_blocks: int = 1,
    avgpool: bool = True,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    batch_size: int = 32,
    per_example: dict | None = None,
) -> dict[str, Any]:
    """Every requested task for one model on the train / val / test SplitData of its size.

    `per_example` (optional) collects per-test-example outcomes for `attach_intervals`.
    """
    n_last_blocks = min(n_last_blocks, spec.backbone.depth)
    feature_fn = feats.make_uint8_feature_fn(
        spec, pre, n_layers=n_last_blocks, keep_patch="segmentation" in tasks
    )
    features = {
        r: feats.extract_features(feature_fn, params, roles[r].crops, batch_size)
        for r in feats.SPLIT_ROLES
    }
    probe_inputs = {
        r: feats.probe_features(features[r], n_last_blocks, avgpool) for r in feats.SPLIT_ROLES
    }
    result: dict[str, Any] = {}
    if "knn" in tasks:
        result["knn"] = knn_task(features, roles, labels, ks, temperature, per_example)
    if "linear" in tasks:
        result["linear"] = linear_task(probe_inputs, roles, labels, c_grid, per_example)
    if "metadata" in tasks:
        result["metadata"] = metadata_task(probe_inputs, roles, c_grid)
    if "segmentation" in tasks:
        result["segmentation"] = segmentation_task(
            features, roles, labels, spec.backbone.patch_size
        )
    result["features"] = {"n_last_blocks": n_last_blocks, "avgpool": avgpool}
    return result


PIXEL_SIZE = 28


def pixel_features(crops: np.ndarray, size: int = PIXEL_SIZE) -> np.ndarray:
    """uint8 crops [N, S, S] -> float32 [N, size * size]: area-downsampled pixels in [0, 1]."""
    import cv2

    return (
        np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in crops])
        .reshape(len(crops), -1)
        .astype(np.float32)
        / 255.0
    )


def evaluate_pixels(
    roles: dict[str, feats.SplitData],
    labels: Sequence[str],
    tasks: Sequence[str],
    *,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    per_example: dict | None = None,
) -> dict[str, Any]:
    """The supervised reference: the same kNN and logistic probe on the raw pixels.

    No network: the probe is a supervised model fitted to the labels on the image itself
    (28 x 28 area-downsampled), so it shows how much of a label is recoverable with labels and
    no representation learning; a pretrained backbone's probe should approach or pass it.
    """
    pixels = {r: pixel_features(roles[r].crops) for r in feats.SPLIT_ROLES}
    result: dict[str, Any] = {}
    if "knn" in tasks:
        features = {r: {"cls": pixels[r]} for r in feats.SPLIT_ROLES}
        result["knn"] = knn_task(features, roles, labels, ks, temperature, per_example)
    if "linear" in tasks:
        result["linear"] = linear_task(pixels, roles, labels, c_grid, per_example)
    result["features"] = {"pixels": f"{PIXEL_SIZE}x{PIXEL_SIZE}"}
    return result


def attach_intervals(
    per_example: dict[str, dict[str, tuple]],
    pairs: Sequence[tuple[str, str]],
    *,
    n_resamples: int = bootstrap.N_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """95% percentile-bootstrap intervals of every recorded score, per model and for each
    (a, b) pair of models the paired interval of a - b (same resamples for both models).

    `per_example` is model -> score path -> outcome tuple (from `knn_task` / `linear_task`).
    Returns {"level", "n_resamples", "seed", "models": {model: {path: [lo, hi]}},
    "differences": {"a_minus_b": {path: [lo, hi]}}}.
    """
    samplers = {
        "accuracy": bootstrap.accuracy_samples,
        "balanced_accuracy": bootstrap.balanced_accuracy_samples,
        "auroc": bootstrap.auroc_samples,
    }
    samples: dict[str, dict[str, np.ndarray]] = {}
    for model, outcomes in per_example.items():
        samples[model] = {}
        for path, (kind, *arrays) in outcomes.items():
            indices = bootstrap.resample_indices(len(arrays[0]), n_resamples, seed, key=path)
            samples[model][path] = samplers[kind](*arrays, indices)
    intervals = {
        model: {path: bootstrap.interval(values) for path, values in by_path.items()}
        for model, by_path in samples.items()
    }
    differences_ = {}
    for a, b in pairs:
        if a not in samples or b not in samples:
            continue
        differences_[f"{a}_minus_{b}"] = {
            path: bootstrap.interval(samples[a][path] - samples[b][path])
            for path in samples[a]
            if path in samples[b] and len(samples[a][path]) == len(samples[b][path])
        }
    return {
        "level": bootstrap.LEVEL,
        "n_resamples": n_resamples,
        "seed": seed,
        "models": intervals,
        "differences": differences_,
    }


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


def run_evaluation(
    checkpoint_path: str,
    data: str,
    labels: Sequence[str],
    tasks: Sequence[str],
    *,
    baseline: str | None = None,
    max_examples: int | None = None,
    n_last_blocks: int = 1,
    avgpool: bool = True,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    seed: int = 0,
    batch_size: int = 32,
    n_resamples: int = bootstrap.N_RESAMPLES,
) -> dict[str, Any]:
    """The whole evaluation (checkpoint, random init, the pixel reference, optional baseline)
    as the eval.json dict, with paired bootstrap intervals of the kNN accuracies and AUROCs."""
    from raddino_jax.data.records import dataset_contents  # tensorflow_datasets: only here

    data_dir, name = split_dataset_path(data)
    tasks = list(tasks)
    if "segmentation" in tasks and "mask" not in dataset_contents(data_dir, name)[0]:
        tasks.remove("segmentation")
    spec, params = checkpoint.load_any_params(checkpoint_path, which="teacher")
    pre = checkpoint.load_preprocessing(checkpoint_path)
    models = [
        ("checkpoint", spec, params, pre),
        ("random_init", spec, init_params(spec, seed), pre),
    ]
    if baseline:
        base_spec, base_params = checkpoint.load_any_params(baseline, which="teacher")
        models.append(("baseline", base_spec, base_params, checkpoint.load_preprocessing(baseline)))
    roles_by_size: dict[int, dict[str, feats.SplitData]] = {}
    split_info = None
    results, timings, per_example = {}, {}, {}
    for model_name, model_spec, model_params, model_pre in models:
        size = model_pre.image_size
        if size not in roles_by_size:
            roles_by_size[size], info = load_roles(
                data_dir,
                name,
                size,
                max_examples=max_examples,
                with_masks="segmentation" in tasks,
                seed=seed,
            )
            split_info = split_info or info
        for label in labels:
            if label not in roles_by_size[size]["train"].fields:
                raise ValueError(f"{data} has no field {label!r}")
        start = time.perf_counter()
        results[model_name] = evaluate_model(
            model_spec,
            model_params,
            model_pre,
            roles_by_size[size],
            labels,
            tasks,
            n_last_blocks=n_last_blocks,
            avgpool=avgpool,
            c_grid=c_grid,
            batch_size=batch_size,
            per_example=per_example.setdefault(model_name, {}),
        )
        timings[model_name] = round(time.perf_counter() - start, 2)
    if {"knn", "linear"} & set(tasks):
        start = time.perf_counter()
        results["pixels"] = evaluate_pixels(
            roles_by_size[pre.image_size],
            labels,
            tasks,
            c_grid=c_grid,
            per_example=per_example.setdefault("pixels", {}),
        )
        timings["pixels"] = round(time.perf_counter() - start, 2)
    others = [model[0] for model in models[1:]]  # random_init [, baseline]
    pairs = [("checkpoint", other) for other in [*others, "pixels"]]
    intervals = attach_intervals(per_example, pairs, n_resamples=n_resamples, seed=seed)
    diffs = {
        f"checkpoint_minus_{other}": differences(results["checkpoint"], results[other])
        for other in others
    }
    return {
        "checkpoint": str(checkpoint_path),
        "baseline": baseline,
        "data": data,
        "labels": list(labels),
        "tasks": tasks,
        "splits": split_info,
        "settings": {
            "knn_ks": list(KNN_KS),
            "knn_temperature": KNN_TEMPERATURE,
            "c_grid": list(c_grid),
            "n_last_blocks": n_last_blocks,
            "avgpool": avgpool,
            "max_examples_per_split": max_examples,
            "seed": seed,
            "preprocessing": {m[0]: json.loads(m[3].to_json()) for m in models},
        },
        "models": results,
        "differences": diffs,
        "intervals": intervals,
        "seconds": timings,
    }
