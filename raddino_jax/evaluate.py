"""`python -m raddino_jax.evaluate`: frozen-feature evaluation of a checkpoint (recipe s10).

  python -m raddino_jax.evaluate --checkpoint PATH --data DATA_DIR/NAME --label F[,F...] \
      [--task knn|linear|metadata|segmentation|all] [--out DIR] [--baseline PATH]

The teacher backbone of PATH (a parameter checkpoint or a training run directory) embeds every
image of the `data_prep` dataset DATA_DIR/NAME with the checkpoint's inference preprocessing
(resize shorter side, centre crop, normalise: the exported preprocessor_config.json). Then:
- knn: weighted kNN on L2-normalised CLS, T = 0.07, k in {10, 20, 100, 200}: accuracy and
  balanced accuracy per label (train -> test);
- linear: logistic regression on the concat of the last --n-last-blocks CLS tokens (+ mean patch
  token unless --no-avgpool), C chosen on val: AUROC / AUPRC for binary labels, accuracy /
  balanced accuracy (+ macro one-vs-rest AUROC) for multi-class labels;
- metadata: RAD-DINO's probes of patient sex (AUROC) and age (ridge: MAE, R^2) from the
  metadata data_prep stores (`sex`, `age_years`);
- segmentation: a linear probe on patch tokens against the lesion masks (Dice), with a CLS +
  position control (datasets with a `mask` feature; only examples with a known value of some
  --label, since records without a mask file carry an all-zero mask).
Labels equal to -1 / NaN / '' are unknown and dropped per label. Splits: the dataset's train /
val / test (data_prep splits by patient); a missing val or test split is carved out of train by
patient (patient_id, else the file), and overlaps between given splits are reported
(`eval/splits.py`).

The same report is produced for a random initialisation of the same architecture and, with
--baseline, for another checkpoint (e.g. imported DINOv2 or RAD-DINO weights); eval.json holds
every number and the differences, eval.md a table of them (`eval/report.py`). This module holds
the per-task glue (labels per split -> the probes of `eval/`), the driver and the CLI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from raddino_jax import checkpoint
from raddino_jax.eval import features as feats
from raddino_jax.eval.knn import KNN_KS, KNN_TEMPERATURE, knn_evaluate
from raddino_jax.eval.linear import (
    DEFAULT_C_GRID,
    FULL_C_GRID,
    classification_metrics,
    select_and_fit,
)
from raddino_jax.eval.metadata import age_probe, sex_probe
from raddino_jax.eval.report import differences, write_report
from raddino_jax.eval.segmentation import segmentation_probe
from raddino_jax.eval.splits import load_roles
from raddino_jax.models import ModelSpec, init_params

TASKS = ("knn", "linear", "metadata", "segmentation")


def has_masks(data_dir: str, name: str) -> bool:
    """Whether the dataset's records carry a `mask` feature."""
    import tensorflow_datasets as tfds

    from raddino_jax.data.records import dataset_dir

    return "mask" in tfds.builder_from_directory(dataset_dir(data_dir, name)).info.features


# ------------------------------------------------------------------------------------------
# Evaluations of one model
# ------------------------------------------------------------------------------------------


def _labels_per_role(roles: dict[str, feats.SplitData], label: str):
    """Class codes per role (encoded jointly so the classes agree) and the class names."""
    values = np.concatenate([roles[r].fields[label] for r in feats.SPLIT_ROLES])
    codes, names = feats.encode_labels(values)
    sizes = np.cumsum([0] + [len(roles[r]) for r in feats.SPLIT_ROLES])
    return {r: codes[sizes[i] : sizes[i + 1]] for i, r in enumerate(feats.SPLIT_ROLES)}, names


def knn_task(features, roles, labels, ks, temperature) -> dict[str, Any]:
    """kNN per label: train split as memory, test split as queries."""
    out = {}
    for label in labels:
        codes, names = _labels_per_role(roles, label)
        train, test = codes["train"] >= 0, codes["test"] >= 0
        if train.sum() == 0 or test.sum() == 0 or len(names) < 2:
            out[label] = {"skipped": "needs >= 2 classes and known labels in train and test"}
            continue
        result = knn_evaluate(
            features["train"]["cls"][train],
            codes["train"][train],
            features["test"]["cls"][test],
            codes["test"][test],
            len(names),
            ks,
            temperature,
        )
        result["n_train"] = int(train.sum())
        result["n_test"] = int(test.sum())
        if train.sum() < max(ks):
            result["note"] = (
                f"only {int(train.sum())} training examples: k above that uses all of them"
            )
        out[label] = result
    return out


def linear_task(probe_inputs, roles, labels, c_grid) -> dict[str, Any]:
    """Logistic probe per label, C chosen on val, metrics on test."""
    out = {}
    for label in labels:
        codes, names = _labels_per_role(roles, label)
        keep = {r: codes[r] >= 0 for r in feats.SPLIT_ROLES}
        train_classes = set(codes["train"][keep["train"]].tolist())
        if len(train_classes) < 2 or keep["val"].sum() == 0 or keep["test"].sum() == 0:
            out[label] = {"skipped": "needs >= 2 classes in train and known labels in val/test"}
            continue
        probe = select_and_fit(
            probe_inputs["train"][keep["train"]],
            codes["train"][keep["train"]],
            probe_inputs["val"][keep["val"]],
            codes["val"][keep["val"]],
            len(names),
            c_grid,
        )
        probabilities = probe.model.probabilities(probe_inputs["test"][keep["test"]])
        metrics = classification_metrics(codes["test"][keep["test"]], probabilities)
        out[label] = {**metrics, "c": probe.best_c, "classes": names}
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
        parts.append(
            (
                features[role]["patch"][known],
                features[role]["cls"][known],
                roles[role].masks[known],
            )
        )
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
) -> dict[str, Any]:
    """Every requested task for one model on the train / val / test SplitData of its size."""
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
        result["knn"] = knn_task(features, roles, labels, ks, temperature)
    if "linear" in tasks:
        result["linear"] = linear_task(probe_inputs, roles, labels, c_grid)
    if "metadata" in tasks:
        result["metadata"] = metadata_task(probe_inputs, roles, c_grid)
    if "segmentation" in tasks:
        result["segmentation"] = segmentation_task(
            features, roles, labels, spec.backbone.patch_size
        )
    result["features"] = {"n_last_blocks": n_last_blocks, "avgpool": avgpool}
    return result


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


def split_data_argument(data: str) -> tuple[str, str]:
    """DATA_DIR/NAME -> (DATA_DIR, NAME)."""
    data = data.rstrip("/")
    if "/" not in data:
        raise ValueError(f"--data must be DATA_DIR/NAME, got {data!r}")
    data_dir, name = data.rsplit("/", 1)
    return data_dir, name


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
) -> dict[str, Any]:
    """The whole evaluation (checkpoint, random init, optional baseline) as the eval.json dict."""
    data_dir, name = split_data_argument(data)
    tasks = list(tasks)
    if "segmentation" in tasks and not has_masks(data_dir, name):
        tasks.remove("segmentation")
    spec, params = checkpoint.load_any_params(checkpoint_path, which="teacher")
    pre = checkpoint.load_any_preprocessing(checkpoint_path)
    models = [
        ("checkpoint", spec, params, pre),
        ("random_init", spec, init_params(spec, seed), pre),
    ]
    if baseline:
        base_spec, base_params = checkpoint.load_any_params(baseline, which="teacher")
        models.append(
            ("baseline", base_spec, base_params, checkpoint.load_any_preprocessing(baseline))
        )
    roles_by_size: dict[int, dict[str, feats.SplitData]] = {}
    split_info = None
    results, timings = {}, {}
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
        )
        timings[model_name] = round(time.perf_counter() - start, 2)
    diffs = {
        "checkpoint_minus_random_init": differences(results["checkpoint"], results["random_init"])
    }
    if baseline:
        diffs["checkpoint_minus_baseline"] = differences(results["checkpoint"], results["baseline"])
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
        "seconds": timings,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m raddino_jax.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="params checkpoint or training run")
    parser.add_argument("--data", required=True, help="DATA_DIR/NAME of a data_prep dataset")
    parser.add_argument("--label", required=True, help="label field(s), comma-separated")
    parser.add_argument("--task", default="all", choices=[*TASKS, "all"])
    parser.add_argument("--out", default=None, help="output folder (default CHECKPOINT/eval)")
    parser.add_argument("--baseline", default=None, help="another checkpoint to compare with")
    parser.add_argument("--max-examples", type=int, default=None, help="per split")
    parser.add_argument("--n-last-blocks", type=int, default=1, help="CLS of the last N blocks")
    parser.add_argument("--no-avgpool", action="store_true", help="no mean patch token")
    parser.add_argument(
        "--c-grid",
        default="short",
        choices=["short", "full"],
        help="C sweep: full = 10^linspace(-6,5,45) (recipe s10), short = every other value",
    )
    parser.add_argument("--seed", type=int, default=0, help="random init and carved splits")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    labels = [label.strip() for label in args.label.split(",") if label.strip()]
    tasks = list(TASKS) if args.task == "all" else [args.task]
    try:
        report = run_evaluation(
            args.checkpoint,
            args.data,
            labels,
            tasks,
            baseline=args.baseline,
            max_examples=args.max_examples,
            n_last_blocks=args.n_last_blocks,
            avgpool=not args.no_avgpool,
            c_grid=FULL_C_GRID if args.c_grid == "full" else DEFAULT_C_GRID,
            seed=args.seed,
            batch_size=args.batch_size,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = args.out or str(epath.Path(args.checkpoint) / "eval")
    json_path, md_path = write_report(report, out)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
