"""Learning curve of a training run: kNN accuracy and probe AUROC of the teacher at every kept
checkpoint, of random init and of the pixel reference, with bootstrap intervals
(`python -m raddino_jax.evaluate --curve`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from etils import epath

from raddino_jax import checkpoint
from raddino_jax.data.records import split_dataset_path
from raddino_jax.eval import bootstrap
from raddino_jax.eval.linear import (
    DEFAULT_C_GRID,
)
from raddino_jax.eval.splits import load_roles
from raddino_jax.eval.tasks import (
    _labels_per_role,
    attach_intervals,
    evaluate_model,
    evaluate_pixels,
)
from raddino_jax.models import init_params

CURVE_KNN_K = 20


def run_steps(run_dir: str | epath.Path) -> list[int]:
    """The finished checkpoint steps of a training run directory, ascending."""
    import orbax.checkpoint as ocp

    if not checkpoint.is_run_dir(run_dir):
        raise FileNotFoundError(
            f"--curve needs a training run directory (checkpoints/), got {run_dir}"
        )
    root = (epath.Path(run_dir) / checkpoint.CHECKPOINTS_DIR).resolve()
    manager = ocp.CheckpointManager(root, item_names=checkpoint.MODEL_ITEMS)
    steps = sorted(int(step) for step in manager.all_steps())
    manager.close()
    return steps


CURVE_TASKS = ("knn", "linear")


def curve_paths(
    labels: Sequence[str], classes: dict[str, int], tasks: Sequence[str] = CURVE_TASKS
) -> dict[str, dict[str, str]]:
    """label -> {"knn": score path of the kNN accuracy at k=20, "linear": of the probe AUROC},
    for the `tasks` asked for."""
    paths = {
        label: {
            "knn": f"knn/{label}/k{CURVE_KNN_K}/accuracy",
            "linear": f"linear/{label}/" + ("auroc" if classes[label] == 2 else "auroc_macro_ovr"),
        }
        for label in labels
    }
    return {
        label: {t: p for t, p in by_task.items() if t in tasks} for label, by_task in paths.items()
    }


def curve_tasks(tasks: Sequence[str]) -> list[str]:
    """`tasks` in CURVE_TASKS order; an unknown name, or none at all, is a ValueError (a typo
    must not silently drop a score from the curve)."""
    unknown = sorted(set(tasks) - set(CURVE_TASKS))
    if unknown or not tasks:
        raise ValueError(f"curve tasks must be among {CURVE_TASKS}, got {list(tasks)}")
    return [t for t in CURVE_TASKS if t in tasks]


def learning_curve(
    run_dir: str,
    data: str,
    labels: Sequence[str],
    *,
    max_examples: int | None = None,
    n_last_blocks: int = 1,
    avgpool: bool = True,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    seed: int = 0,
    batch_size: int = 32,
    n_resamples: int = bootstrap.N_RESAMPLES,
    tasks: Sequence[str] = CURVE_TASKS,
) -> dict[str, Any]:
    """kNN accuracy (k=20) and probe AUROC of the teacher at every kept checkpoint of a run,
    of a random initialisation and of the pixel reference, each with its 95% bootstrap
    interval and, per step, the paired interval of step minus random init. `tasks` ("knn",
    "linear" or both) picks the curves; kNN alone is the cheap one (no probe fits per step).

    Returns the curve.json dict: {"steps", "labels", "paths", "models": {"step_<N>" |
    "random_init" | "pixels": {path: {"value", "ci95"}}}, "differences": {"step_<N>":
    {path: [lo, hi]}}, "splits"}.
    """
    data_dir, name = split_dataset_path(data)
    steps = run_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no finished checkpoint yet")
    tasks = curve_tasks(tasks)
    spec = checkpoint.load_spec(run_dir)
    pre = checkpoint.load_preprocessing(run_dir)
    roles, split_info = load_roles(
        data_dir, name, pre.image_size, max_examples=max_examples, with_masks=False, seed=seed
    )
    options = dict(n_last_blocks=n_last_blocks, avgpool=avgpool, c_grid=c_grid)
    results, per_example = {}, {}
    models = [("random_init", init_params(spec, seed))] + [(f"step_{step}", None) for step in steps]
    for model_name, params in models:
        if params is None:
            _, params = checkpoint.load_run_params(run_dir, "teacher", int(model_name[5:]))
        results[model_name] = evaluate_model(
            spec,
            params,
            pre,
            roles,
            labels,
            tasks,
            batch_size=batch_size,
            per_example=per_example.setdefault(model_name, {}),
            **options,
        )
    results["pixels"] = evaluate_pixels(
        roles, labels, tasks, c_grid=c_grid, per_example=per_example.setdefault("pixels", {})
    )
    pairs = [(f"step_{step}", "random_init") for step in steps]
    intervals = attach_intervals(per_example, pairs, n_resamples=n_resamples, seed=seed)
    classes = {label: len(_labels_per_role(roles, label)[1]) for label in labels}
    paths = curve_paths(labels, classes, tasks)
    wanted = [p for by_task in paths.values() for p in by_task.values()]
    from raddino_jax.eval.report import flatten_scores

    points = {}
    for model_name, metrics in results.items():
        flat = flatten_scores(metrics)
        points[model_name] = {
            path: {"value": flat[path], "ci95": intervals["models"][model_name][path]}
            for path in wanted
            if path in flat and path in intervals["models"][model_name]
        }
    return {
        "run": str(run_dir),
        "data": data,
        "steps": steps,
        "labels": list(labels),
        "tasks": tasks,
        "paths": paths,
        "models": points,
        "differences": {
            pair.split("_minus_")[0]: {p: v for p, v in by_path.items() if p in wanted}
            for pair, by_path in intervals["differences"].items()
        },
        "splits": split_info,
        "n_resamples": n_resamples,
        "seed": seed,
    }
