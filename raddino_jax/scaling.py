"""`python -m raddino_jax.scaling`: the data-scaling sweep (and leave-one-source-out mixtures).

  python -m raddino_jax.scaling --config=CONFIG --fractions=0.1,0.25,0.5,1.0 [--sources=...] \
      --steps=N --eval-data=DATA_DIR/NAME --label=F[,F...] --workdir=DIR [--mixtures] \
      [--config.key=value ...]

One pretraining run per fraction (`DIR/runs/fraction_<f>`), each on a subset of the training
data: the patients whose fixed hash rank is below f (`data/sources.patient_subset`), so the
subsets are deterministic, patient-disjoint (a patient's images are all in or all out) and
nested (a smaller fraction's subset is contained in every larger one's). Every run trains for
the same N steps (`--steps`, so each sees N x batch images, batch per stage); the x axis of the
results is the number of distinct pretraining images in the subset. Each teacher is then
evaluated with the evaluation CLI's tasks (`evaluate.run_evaluation`: kNN, logistic probes
with AUROC, metadata probes, with paired bootstrap intervals) on DATA_DIR/NAME, and the sweep
writes
DIR/scaling.csv, scaling.json, scaling.md and scaling.png (metric vs pretraining images, per
label, with the 95% intervals; a random initialisation as the reference line).

--sources=DATA_DIR/NAME[:WEIGHT],... trains on that mixture instead of the config's data
(weights default to "proportional"). --mixtures compares the full mixture with each
leave-one-source-out mixture at the largest fraction (the paper's diversity question); runs
are `DIR/runs/all` and `DIR/runs/without_<name>`.

Run length: every run's step-denominated schedules (warm-ups, the last layer's freeze, the
teacher temperature warm-up, Gram start/refresh, stage starts) are scaled from the config's
total_steps to --steps by `train.stages.scale_to_steps`, and the sweep prints each scaled value
before the first run; `images_seen` counts each stage's batch.

Every run's config and the evaluation labels are checked before the first run trains.
Resuming: a run with `DIR/runs/<run>/scaling_run.json` is finished and skipped when its
recorded steps, fraction, data, batch, stages and seed match this command (else the sweep
stops, naming the differences); an interrupted run resumes from its last checkpoint. Config
overrides (`--config.optim.base_lr=1e-3`) apply to every run; a mistyped key is an error.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from etils import epath

RESULT_FILE = "scaling_run.json"
OUTPUTS = ("scaling.csv", "scaling.json", "scaling.md", "scaling.png")
CSV_FIELDS = (
    "run",
    "fraction",
    "images",
    "images_seen",
    "label",
    "metric",
    "value",
    "ci_low",
    "ci_high",
)


def parse_sources(text: str) -> tuple[tuple[str, str, Any], ...]:
    """ "DIR/NAME[:WEIGHT],..." -> config.data.sources entries (weights all given or none)."""
    from raddino_jax.data.records import split_dataset_path

    entries = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        path, _, weight = item.partition(":")
        data_dir, name = split_dataset_path(path, "--sources")
        entries.append((name, data_dir, float(weight) if weight else "proportional"))
    if not entries:
        raise ValueError("--sources: no source given")
    return tuple(entries)


def run_configs(
    base: ml_collections.ConfigDict,
    fractions: Sequence[float],
    steps: int,
    mixtures: bool,
) -> list[tuple[str, float, ml_collections.ConfigDict]]:
    """(run name, fraction, config) of every run of the sweep."""

    from raddino_jax.train.stages import scale_to_steps

    def with_data(fraction: float, sources=None) -> ml_collections.ConfigDict:
        # every step-denominated schedule follows the run length (train.stages.scale_to_steps)
        config, _ = scale_to_steps(base, steps)
        config.unlock()
        config.data.fraction = fraction
        if sources is not None:
            config.data.sources = tuple(sources)
        config.lock()
        return config

    if not mixtures:
        return [(f"fraction_{f:g}", f, with_data(f)) for f in fractions]
    sources = tuple(tuple(s) for s in base.data.sources)
    if len(sources) < 2:
        raise ValueError("--mixtures needs at least two sources (--sources or data.sources)")
    fraction = max(fractions)
    names = [name for name, _, _ in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"--mixtures needs distinct source names, got {names}")
    runs = [("all", fraction, with_data(fraction, sources))]
    for i, name in enumerate(names):
        rest = sources[:i] + sources[i + 1 :]
        runs.append((f"without_{name}", fraction, with_data(fraction, rest)))
    return runs


def check_runs(
    runs: Sequence[tuple[str, float, ml_collections.ConfigDict]],
    eval_data: str,
    labels: Sequence[str],
) -> None:
    """Everything that can fail before the first run trains: each run's config (as the
    training loop validates it, on this machine's devices) and the evaluation dataset's labels.
    Raises ConfigError / ValueError naming the run, key or label."""
    import jax

    from raddino_jax import config as config_lib
    from raddino_jax.data.records import dataset_contents, split_dataset_path

    for name, _, config in runs:
        try:
            config_lib.validate(
                config, n_devices=len(jax.devices()), process_count=jax.process_count()
            )
        except config_lib.ConfigError as err:
            raise config_lib.ConfigError(f"run {name}: {err}") from err
    data_dir, dataset = split_dataset_path(eval_data, "--eval-data")
    try:
        fields, _ = dataset_contents(data_dir, dataset)
    except (OSError, ValueError) as err:
        raise ValueError(f"--eval-data: cannot read {eval_data} ({err})") from err
    absent = [label for label in labels if label not in fields]
    if absent:
        raise ValueError(
            f"--label: {eval_data} has no field {', '.join(map(repr, absent))}; fields: "
            + ", ".join(sorted(fields))
        )


def training_images(data) -> int:
    """Distinct images of a run's (subset of its) training data (`sources.TrainingData`)."""
    parts = getattr(data.records, "sources", [data.records])  # a mixture's, or the one source
    return sum(len(part) for part in parts)


def run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What makes two runs of the sweep the same run: recorded in RESULT_FILE and compared
    before a finished run is reused."""
    d = config.data
    return {
        "steps": int(config.total_steps),
        "fraction": float(d.fraction),
        "data": [d.dir, d.name] if not d.sources else [],
        "sources": [list(s) for s in d.sources],
        "batch_size": int(config.batch_size),
        "stages": [list(s) for s in config.stages],
        "seed": int(config.seed),
    }


def check_same_run(done: epath.Path, record: dict[str, Any], config) -> None:
    """Raise ValueError naming every difference between a finished run's record and the run
    this command asks for (reporting the old run as the new one would be silent and wrong)."""
    wanted = json.loads(json.dumps(run_identity(config)))
    differences = [
        f"{key} {record.get(key, 'not recorded')!r} (asked: {value!r})"
        for key, value in wanted.items()
        if record.get(key) != value
    ]
    if differences:
        raise ValueError(
            f"{done} is a finished run of a different command: "
            + "; ".join(differences)
            + f". Use another --workdir, or delete {done.parent} to train it again"
        )


def run_one(
    name: str,
    fraction: float,
    config: ml_collections.ConfigDict,
    run_dir: epath.Path,
    eval_data: str,
    labels: Sequence[str],
    tasks: Sequence[str],
    *,
    max_examples: int | None,
    n_resamples: int,
) -> dict[str, Any]:
    """Train (or resume) one run, evaluate its teacher, write RESULT_FILE; returns its record."""
    from raddino_jax import evaluate
    from raddino_jax.data import sources
    from raddino_jax.train import loop, stages

    done = run_dir / RESULT_FILE
    if done.exists():
        record = json.loads(done.read_text())
        check_same_run(done, record, config)
        print(f"scaling: {name} finished earlier, skipped ({done})", flush=True)
        return record
    print(f"scaling: {name}: training {config.total_steps} steps in {run_dir}", flush=True)
    # Opened once: the patient subset's scan of the records serves the count and the training.
    data = sources.open_training_data(config, run_dir)
    loop.train(config, str(run_dir), data=data)
    report = evaluate.run_evaluation(
        str(run_dir),
        eval_data,
        labels,
        tasks,
        max_examples=max_examples,
        seed=config.seed,
        n_resamples=n_resamples,
    )
    record = {
        "run": name,
        **run_identity(config),
        "fraction": fraction,
        "images": training_images(data),
        # global images consumed in the run's steps, stage by stage
        "images_seen": stages.images_before(stages.stage_table(config), config.total_steps),
        "scores": _scores(report, "checkpoint"),
        "random_init": _scores(report, "random_init"),
        "eval": report,
    }
    done.write_text(json.dumps(record, indent=2, default=str))
    return record


def _scores(report: dict[str, Any], model: str) -> dict[str, dict[str, Any]]:
    """{score path: {"value", "ci95"}} of one model of an eval.json dict (ci95 where the
    evaluation bootstrapped it: kNN accuracies and probe AUROCs)."""
    from raddino_jax.eval.report import flatten_scores

    flat = flatten_scores(report["models"][model])
    intervals = report.get("intervals", {}).get("models", {}).get(model, {})
    return {
        path: {"value": float(value), "ci95": intervals.get(path)}
        for path, value in flat.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def headline_paths(labels: Sequence[str], scores: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, metric name, score path) of the numbers the table and plot show: kNN accuracy
    at k=20 and the probe AUROC per label, then the metadata probes."""
    out = []
    for label in labels:
        for metric, path in (
            ("knn_top1_k20", f"knn/{label}/k20/accuracy"),
            ("probe_auroc", f"linear/{label}/auroc"),
            ("probe_auroc", f"linear/{label}/auroc_macro_ovr"),
        ):
            if path in scores:
                out.append((label, metric, path))
    for label, metric, path in (
        ("sex", "probe_auroc", "metadata/sex/auroc"),
        ("age", "mae_years", "metadata/age/mae"),
    ):
        if path in scores:
            out.append((label, metric, path))
    return out


def rows(records: Sequence[dict[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """The table's rows: one random-init reference (the same architecture and seed for every
    run), then each run's headline scores."""
    models = [("random_init", None, records[0]["random_init"])] if records else []
    models += [(record["run"], record, record["scores"]) for record in records]
    out = []
    for run, record, scores in models:
        for label, metric, path in headline_paths(labels, scores):
            ci = scores[path]["ci95"] or [math.nan, math.nan]
            out.append(
                {
                    "run": run,
                    "fraction": record["fraction"] if record else 0.0,
                    "images": record["images"] if record else 0,
                    "images_seen": record["images_seen"] if record else 0,
                    "label": label,
                    "metric": metric,
                    "value": scores[path]["value"],
                    "ci_low": ci[0],
                    "ci_high": ci[1],
                }
            )
    return out


def write_outputs(out: epath.Path, table: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """scaling.csv / .json / .md / .png under `out`."""
    with open(out / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(table)
    (out / "scaling.json").write_text(json.dumps({**meta, "rows": table}, indent=2, default=str))
    lines = [
        f"# Data scaling: {meta['eval_data']}",
        "",
        f"{meta['steps']} steps per run; images = distinct pretraining images of the subset; "
        "95% percentile-bootstrap intervals over the test examples.",
        "",
        "| run | fraction | images | label | metric | value | 95% interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        ci = (
            f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]" if not math.isnan(row["ci_low"]) else "-"
        )
        lines.append(
            f"| {row['run']} | {row['fraction']:g} | {row['images']} | {row['label']} | "
            f"{row['metric']} | {row['value']:.3f} | {ci} |"
        )
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    plot(out / "scaling.png", table)


def plot(path: epath.Path, table: list[dict[str, Any]]) -> None:
    """One panel per (label, metric): value vs pretraining images with the intervals; the
    random initialisation as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["label"], r["metric"]) for r in table})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4 * max(len(panels), 1), 3.4))
    axes = [axes] if len(panels) <= 1 else list(axes)
    for ax, (label, metric) in zip(axes, panels, strict=False):
        points = sorted(
            (r for r in table if (r["label"], r["metric"]) == (label, metric)),
            key=lambda r: r["images"],
        )
        runs = [r for r in points if r["run"] != "random_init"]
        x = [r["images"] for r in runs]
        y = [r["value"] for r in runs]
        low = [r["value"] - r["ci_low"] if not math.isnan(r["ci_low"]) else 0 for r in runs]
        high = [r["ci_high"] - r["value"] if not math.isnan(r["ci_high"]) else 0 for r in runs]
        ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label="pretrained")
        for r in runs:
            if not r["run"].startswith("fraction_"):
                ax.annotate(r["run"], (r["images"], r["value"]), fontsize=7)
        for r in points:
            if r["run"] == "random_init":
                ax.axhline(r["value"], ls="--", color="grey", label="random init")
        if len(set(x)) > 1 and min(x) > 0:
            ax.set_xscale("log")
        ax.set_xlabel("pretraining images")
        ax.set_title(f"{label}: {metric}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m raddino_jax.scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="configs/<name>.py (get_config())")
    parser.add_argument("--fractions", default="1.0", help="comma-separated, in (0, 1]")
    parser.add_argument("--sources", default="", help="DATA_DIR/NAME[:WEIGHT],... (a mixture)")
    parser.add_argument("--steps", type=int, required=True, help="training steps per run")
    parser.add_argument("--eval-data", required=True, help="DATA_DIR/NAME to evaluate on")
    parser.add_argument("--label", required=True, help="label field(s), comma-separated")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--mixtures", action="store_true", help="leave-one-source-out runs")
    parser.add_argument("--task", default="knn,linear,metadata", help="evaluation tasks")
    parser.add_argument("--max-examples", type=int, default=None, help="per evaluation split")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    return parser.parse_known_args(argv)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sweep as the command line asks for it, checked before anything trains."""

    runs: list[tuple[str, float, ml_collections.ConfigDict]]
    labels: list[str]
    tasks: list[str]
    schedule_changes: dict[str, tuple[Any, Any]]  # train.stages.scale_to_steps's, for the console


def plan(args: argparse.Namespace, overrides: Sequence[str]) -> Plan:
    """The runs of the sweep from its parsed command line; raises ConfigError / ValueError
    (naming the flag, run or key) for anything wrong, before any run trains."""
    from raddino_jax import config as config_lib
    from raddino_jax.train import stages as stages_lib

    fractions = sorted({float(f) for f in args.fractions.split(",") if f.strip()})
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"--fractions must be in (0, 1], got {args.fractions!r}")
    if args.steps <= 0:
        raise ValueError(f"--steps must be > 0, got {args.steps}")
    labels = [label.strip() for label in args.label.split(",") if label.strip()]
    tasks = [task.strip() for task in args.task.split(",") if task.strip()]
    base = config_lib.load_config(args.config, overrides)
    workdir = epath.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.sources:
        base.data.dir, base.data.name, base.data.builtin = "", "", False
        base.data.sources = parse_sources(args.sources)
    elif base.data.builtin:  # the built-in samples (data.builtin), built once, shared by the runs
        from data_prep.samples.builtin import builtin_dataset

        base.data.dir, base.data.name = builtin_dataset(
            workdir, base.data.builtin_phantoms, base.data.builtin_size
        )
        base.data.builtin = False
    runs = run_configs(base, fractions, args.steps, args.mixtures)
    check_runs(runs, args.eval_data, labels)
    _, changes = stages_lib.scale_to_steps(base, args.steps)
    return Plan(runs, labels, tasks, changes)


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    from raddino_jax.config import ConfigError
    from raddino_jax.train import stages as stages_lib

    workdir = epath.Path(args.workdir)
    try:
        sweep = plan(args, overrides)
        print(
            f"scaling: {len(sweep.runs)} run(s) of {args.steps} steps; step schedules scaled "
            "with the run length (train.stages.scale_to_steps): "
            + stages_lib.describe_changes(sweep.schedule_changes),
            flush=True,
        )
        records = []
        for name, fraction, config in sweep.runs:
            records.append(
                run_one(
                    name,
                    fraction,
                    config,
                    workdir / "runs" / name,
                    args.eval_data,
                    sweep.labels,
                    sweep.tasks,
                    max_examples=args.max_examples,
                    n_resamples=args.bootstrap,
                )
            )
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    labels = sweep.labels
    table = rows(records, labels)
    meta = {
        "command": "python -m raddino_jax.scaling " + " ".join(argv or sys.argv[1:]),
        "eval_data": args.eval_data,
        "labels": labels,
        "steps": args.steps,
        "schedule_changes": {k: list(v) for k, v in sweep.schedule_changes.items()},
        "mixtures": args.mixtures,
        "runs": [{k: v for k, v in r.items() if k != "eval"} for r in records],
    }
    write_outputs(workdir, table, meta)
    print((workdir / "scaling.md").read_text())
    print("wrote " + ", ".join(str(workdir / name) for name in OUTPUTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
