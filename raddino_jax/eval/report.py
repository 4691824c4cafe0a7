"""The evaluation report: eval.json (every number, strict JSON) and eval.md (a table).

Scores are compared between models by flattening the nested per-task dicts into paths such as
"knn/nodule/k20/accuracy"; settings and counts (`NOT_COMPARED`) are left out of the
differences. NaN scores are written as null in eval.json and "nan" in eval.md.
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
    notes = [f"- {k}: {v}" for k, v in _collect_notes(models).items()]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


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
