"""The evaluation report: eval.json (every number, strict JSON) and eval.md (a table).

Scores are compared between models by flattening the nested per-task dicts into paths such as
"knn/nodule/k20/accuracy"; settings and counts (`NOT_COMPARED`) are left out of the
differences. NaN scores are written as null in eval.json and "nan" in eval.md. Bootstrap
intervals (`report["intervals"]`, from `evaluate.attach_intervals`) get their own table.

The learning curve (`evaluate.learning_curve`) is written as curve.json and curve.png: kNN
accuracy and probe AUROC against the training step, one row of panels per label, the teacher's
points with their 95% bootstrap band, random init and the pixel reference as horizontal bands.
"""

from __future__ import annotations

import json
import math
from typing import Any

from etils import epath

# Settings and counts, not scores: left out of the differences.
NOT_COMPARED = ("c", "alpha", "n", "n_test", "n_train", "effective_k")


def flatten_scores(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics -> {"knn/nodule/k20/accuracy": value} for numeric scores only."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_scores(value, path + "/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if key not in NOT_COMPARED and key != "n_last_blocks":
                flat[path] = float(value)
    return flat


def differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """a - b for every score both reports have (NaN where either is NaN)."""
    flat_a, flat_b = flatten_scores(a), flatten_scores(b)
    return {key: flat_a[key] - flat_b[key] for key in flat_a if key in flat_b}


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return "nan" if math.isnan(value) else f"{value:.4f}"


def markdown_report(report: dict[str, Any]) -> str:
    """eval.md: one row per score, one column per model, and the differences."""
    models = report["models"]
    flat = {name: flatten_scores(metrics) for name, metrics in models.items()}
    diffs = report["differences"]
    columns = list(models) + list(diffs)
    keys = list(dict.fromkeys(k for name in models for k in flat[name]))
    lines = [
        f"# Frozen-feature evaluation of `{report['checkpoint']}`",
        "",
        f"Data `{report['data']}`, labels {', '.join(report['labels'])}; split sizes "
        + ", ".join(f"{k} {v}" for k, v in report["splits"]["counts"].items())
        + f"; patient overlap {report['splits']['patient_overlap']}.",
        "",
        "| metric | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for key in keys:
        cells = [_cell(flat[name].get(key)) for name in models]
        cells += [_cell(diffs[name].get(key)) for name in diffs]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += _interval_lines(report.get("intervals"), flat)
    notes = [f"- {k}: {v}" for k, v in _collect_notes(models).items()]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def _interval_text(value: float | None, ci: list[float] | None) -> str:
    if ci is None:
        return ""
    head = "" if value is None else _cell(value) + " "
    return f"{head}[{_cell(ci[0])}, {_cell(ci[1])}]"


def _interval_lines(intervals: dict[str, Any] | None, flat: dict[str, dict]) -> list[str]:
    """The bootstrap table: score [95% interval] per model, the paired differences, and
    whether the checkpoint's interval lies wholly above random init's."""
    if not intervals or "checkpoint" not in intervals["models"]:
        return []
    models = list(intervals["models"])
    diffs = list(intervals["differences"])
    lines = [
        "",
        f"## {intervals['level']:.0%} bootstrap intervals",
        "",
        f"Percentile bootstrap over the test examples, {intervals['n_resamples']} resamples "
        f"(seed {intervals['seed']}), the same resamples for every model (differences are "
        "paired). `separated`: the checkpoint's interval lies wholly above random init's.",
        "",
        "| metric | " + " | ".join(models + diffs) + " | separated |",
        "|---|" + "---|" * (len(models) + len(diffs) + 1),
    ]
    for path, ci in intervals["models"]["checkpoint"].items():
        cells = [
            _interval_text(flat.get(m, {}).get(path), intervals["models"][m].get(path))
            for m in models
        ]
        cells += [_interval_text(None, intervals["differences"][d].get(path)) for d in diffs]
        random_ci = intervals["models"].get("random_init", {}).get(path)
        separated = random_ci is not None and ci[0] > random_ci[1]
        lines.append(f"| {path} | " + " | ".join(cells) + f" | {'yes' if separated else 'no'} |")
    return lines


def _collect_notes(models: dict[str, Any]) -> dict[str, str]:
    """`skipped` / `note` strings anywhere in the reports, keyed by their path."""
    notes = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}/")
            elif key in ("skipped", "note"):
                notes[f"{prefix}{key}"] = str(value)

    for name, metrics in models.items():
        walk(metrics, f"{name}/")
    return notes


def _json_safe(tree: Any) -> Any:
    """NaN -> None so eval.json is strict JSON."""
    if isinstance(tree, dict):
        return {k: _json_safe(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_json_safe(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def write_report(report: dict[str, Any], out: str | epath.Path) -> tuple[epath.Path, epath.Path]:
    """Write eval.json and eval.md into `out`; returns their paths."""
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "eval.json", out / "eval.md"
    json_path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    md_path.write_text(markdown_report(report))
    return json_path, md_path


def plot_curve(curve: dict[str, Any], png: str | epath.Path) -> None:
    """curve.png: per label, kNN accuracy (k=20) and probe AUROC against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, steps = curve["labels"], curve["steps"]
    tasks = curve.get("tasks", ["knn", "linear"])
    fig, axes = plt.subplots(
        len(labels),
        len(tasks),
        figsize=(4.5 * len(tasks), 2.8 * len(labels)),
        squeeze=False,
        sharex=True,
    )
    titles = {"knn": "kNN accuracy (k=20)", "linear": "linear-probe AUROC"}
    for row, label in enumerate(labels):
        for col, task in enumerate(tasks):
            ax, path = axes[row][col], curve["paths"][label][task]
            for name, colour in (("random_init", "tab:gray"), ("pixels", "tab:green")):
                point = curve["models"].get(name, {}).get(path)
                if point is None:
                    continue
                ax.axhline(point["value"], color=colour, lw=1, ls="--", label=name)
                ax.axhspan(*point["ci95"], color=colour, alpha=0.15)
            points = [curve["models"][f"step_{s}"].get(path) for s in steps]
            kept = [(s, p) for s, p in zip(steps, points, strict=True) if p is not None]
            if kept:
                xs = [s for s, _ in kept]
                ax.plot(xs, [p["value"] for _, p in kept], "o-", color="tab:blue", label="teacher")
                ax.fill_between(
                    xs,
                    [p["ci95"][0] for _, p in kept],
                    [p["ci95"][1] for _, p in kept],
                    color="tab:blue",
                    alpha=0.2,
                )
            ax.set_title(f"{label}: {titles[task]}", fontsize=9)
            ax.grid(alpha=0.3)
            if row == len(labels) - 1:
                ax.set_xlabel("training step")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(
        "pretrained teacher vs random init and the pixel reference (95% bootstrap)",
        fontsize=10 if len(tasks) > 1 else 7,
    )
    fig.tight_layout()
    fig.savefig(str(png), dpi=80)
    plt.close(fig)


def write_curve(curve: dict[str, Any], out: str | epath.Path) -> tuple[epath.Path, epath.Path]:
    """Write curve.json and curve.png into `out`; returns their paths."""
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "curve.json", out / "curve.png"
    json_path.write_text(json.dumps(_json_safe(curve), indent=2) + "\n")
    plot_curve(curve, png_path)
    return json_path, png_path
