"""Periodic kNN evaluation during training (recipe s10 protocol on a held-out labelled split).

    evaluator = KnnEvaluator(data_dir, "samples", "nodule", preprocessing, spec)
    metrics = evaluator(teacher_params)   # {"knn/top1_k20": ..., "knn/balanced_acc_k20": ...}

The images of both splits are decoded, resized and centre-cropped once at construction and kept
on the host as uint8 [N, S, S] (4x smaller than float32 input, a few hundred MB for thousands
of 518 px images); each call only runs the jitted feature extraction (one compiled shape thanks
to padded batches) and the kNN. Examples whose label is unknown are dropped at construction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from etils import epath

from raddino_jax import config as config_lib
from raddino_jax.checkpoint import Preprocessing
from raddino_jax.data.sources import training_datasets
from raddino_jax.eval.features import (
    encode_labels,
    extract_features,
    load_split,
    make_uint8_feature_fn,
)
from raddino_jax.eval.knn import KNN_TEMPERATURE, knn_evaluate
from raddino_jax.models import ModelSpec

HOOK_KS = (10, 20)


class KnnEvaluator:
    """kNN accuracy of the (teacher) backbone's CLS features, train split -> eval split."""

    def __init__(
        self,
        data_dir: epath.PathLike,
        name: str,
        label: str,
        preprocessing: Preprocessing,
        spec: ModelSpec,
        train_split: str = "train",
        eval_split: str = "val",
        max_examples: int | None = None,
        ks: Sequence[int] = HOOK_KS,
        temperature: float = KNN_TEMPERATURE,
        batch_size: int = 32,
    ):
        """Load and preprocess both splits (at most `max_examples` records each) once."""
        if preprocessing.image_size % spec.backbone.patch_size:
            raise ValueError(
                f"image size {preprocessing.image_size} is not a multiple of the patch size "
                f"{spec.backbone.patch_size}"
            )
        self.ks, self.temperature, self.batch_size = tuple(ks), temperature, batch_size
        train, held_out = (
            load_split(data_dir, name, split, preprocessing.image_size, max_examples=max_examples)
            for split in (train_split, eval_split)
        )
        if label not in train.fields:
            raise KeyError(f"{name} has no field {label!r}; fields: {sorted(train.fields)}")
        codes, self.class_names = encode_labels(
            np.concatenate([train.fields[label], held_out.fields[label]])
        )
        train_codes, eval_codes = codes[: len(train)], codes[len(train) :]
        self.train_crops = train.crops[train_codes >= 0]
        self.train_labels = train_codes[train_codes >= 0]
        self.eval_crops = held_out.crops[eval_codes >= 0]
        self.eval_labels = eval_codes[eval_codes >= 0]
        if len(self.train_labels) == 0 or len(self.eval_labels) == 0:
            raise ValueError(f"no known {label!r} labels in {train_split} or {eval_split}")
        self._features = make_uint8_feature_fn(spec, preprocessing, n_layers=1)

    def _cls(self, params, crops: np.ndarray) -> np.ndarray:
        return extract_features(self._features, params, crops, self.batch_size)["cls"]

    def __call__(self, params) -> dict[str, float]:
        """Metrics of `params` (the pure parameter dict of the model spec, e.g. the teacher):
        {"knn/top1_k{k}", "knn/balanced_acc_k{k}"} for each k, as Python floats."""
        result = knn_evaluate(
            self._cls(params, self.train_crops),
            self.train_labels,
            self._cls(params, self.eval_crops),
            self.eval_labels,
            n_classes=len(self.class_names),
            ks=self.ks,
            temperature=self.temperature,
        )
        metrics = {}
        for k in self.ks:
            metrics[f"knn/top1_k{k}"] = result[f"k{k}"]["accuracy"]
            metrics[f"knn/balanced_acc_k{k}"] = result[f"k{k}"]["balanced_accuracy"]
        return metrics


def periodic_eval_datasets(
    config, data, say: Callable[[str], None] = print
) -> list[tuple[str, str, str]]:
    """Periodic kNN's datasets (`eval_datasets`) for the run's training data
    (`sources.TrainingData`), said on the console; [] when off."""
    if not config.eval.every:
        return []
    training = training_datasets(config, builtin=(data.data_dir, data.name))
    chosen = eval_datasets(config, training)
    skipped = [t[0] for t in training if t not in chosen] if not config.eval.data else []
    say(
        f"eval: kNN on {config.eval.label!r} every {config.eval.every} steps on "
        + ", ".join(f"{data_dir}/{name}" for _, data_dir, name in chosen)
        + (f" (not {', '.join(skipped)}: no such label or split)" if skipped else "")
    )
    return chosen


class PeriodicKnn:
    """Periodic kNN (`eval/hook.py`) on each chosen dataset at one global crop size; metric
    keys get a `/<source>` suffix when there are several datasets."""

    def __init__(self, config, spec: ModelSpec, datasets: list[tuple[str, str, str]], size: int):
        self.size = size
        pre = Preprocessing(image_size=size, mean=config.data.mean, std=config.data.std)
        self.evaluators = {
            report_name: KnnEvaluator(
                data_dir,
                name,
                config.eval.label,
                pre,
                spec,
                train_split=config.eval.train_split,
                eval_split=config.eval.eval_split,
                max_examples=config.eval.max_examples or None,
            )
            for report_name, data_dir, name in datasets
        }

    def __call__(self, params) -> dict[str, float]:
        several = len(self.evaluators) > 1
        return {
            f"{key}/{report_name}" if several else key: value
            for report_name, evaluator in self.evaluators.items()
            for key, value in evaluator(params).items()
        }


def eval_datasets(
    config: ml_collections.ConfigDict, training: list[tuple[str, str, str]]
) -> list[tuple[str, str, str]]:
    """The datasets periodic kNN (`eval.every`) evaluates on, as (report name, data_dir, name).

    `eval.data` ("DATA_DIR/NAME") if set, which must have `eval.label` and both eval splits;
    else each of `training` (`training_datasets`) that has them. Raises ConfigError naming the
    keys when none does, so a run fails at startup, not at its first evaluation.
    """
    from raddino_jax.data.records import dataset_contents, split_dataset_path

    e = config.eval
    splits = (e.train_split, e.eval_split)

    def missing(data_dir: str, name: str) -> str:
        try:
            fields, have = dataset_contents(data_dir, name)
        except (OSError, ValueError) as err:
            return f"cannot be read ({err})"
        if e.label not in fields:
            return f"has no field {e.label!r} (fields: {', '.join(sorted(fields))})"
        absent = [split for split in splits if split not in have]
        if absent:
            return f"has no split {', '.join(absent)} (splits: {', '.join(sorted(have))})"
        return ""

    if e.data:
        try:
            data_dir, name = split_dataset_path(e.data, "config.eval.data")
        except ValueError as err:
            raise config_lib.ConfigError(str(err)) from err
        problem = missing(data_dir, name)
        config_lib.require(
            not problem,
            "eval.data",
            f"{e.data} {problem}; set eval.label and eval.train_split/eval_split to what it has",
        )
        return [(name, data_dir, name)]
    usable = [t for t in training if not missing(t[1], t[2])]
    config_lib.require(
        bool(usable),
        "eval.label",
        "periodic kNN (eval.every) needs a dataset with this label and splits "
        f"{e.train_split}/{e.eval_split}: "
        + "; ".join(f"{d}/{name} {missing(d, name)}" for _, d, name in training)
        + ". Set eval.data=DATA_DIR/NAME to a labelled dataset, or eval.label to a field",
    )
    return usable
