"""Writing a sweep's rows: sweep.csv, sweep.json, sweep.md and sweep.png (local or gs://).

The rows are ranked working-first: fastest first when timed, else least per-device memory
first; failures last. sweep.md marks the first working row best; sweep.json is strict JSON
(a NaN such as MFU without a known peak is written as null) with the run's metadata next to
the rows; sweep.png shows images/s and per-device memory (XLA's peak, else the state) per point.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Sequence

import numpy as np
from etils import epath

from raddino_jax.sweep.row import MiB, SweepRow, mib


def ranked(rows: Sequence[SweepRow]) -> list[SweepRow]:
    """Working rows first, fastest first (measured, else XLA's estimate; else least memory
    first); then failures. Rows that do not fit the device's HBM come after those that do."""
    good = [r for r in rows if r.status != "failed"]
    if any(r.images_per_s is not None for r in good):
        good.sort(key=lambda r: -(r.images_per_s or 0.0))
    elif any(r.estimated_images_per_s is not None for r in good):
        good.sort(key=lambda r: (r.fits is False, -(r.estimated_images_per_s or 0.0)))
    else:
        good.sort(key=lambda r: r.memory_bytes or 0)
    return good + [r for r in rows if r.status == "failed"]


def write_csv(rows: Sequence[SweepRow], path: epath.Path) -> None:
    fields = [f.name for f in dataclasses.fields(SweepRow)]
    with path.open("w") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in dataclasses.asdict(row).items()})


def write_json(rows: Sequence[SweepRow], path: epath.Path, meta: dict) -> None:
    payload = {**meta, "rows": [_finite_or_none(dataclasses.asdict(r)) for r in rows]}
    path.write_text(json.dumps(payload, indent=2, allow_nan=False, default=_json_default))


def _finite_or_none(record: dict) -> dict:
    """NaN (e.g. MFU without a known peak) becomes null: strict JSON has no NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


def _json_default(value):
    return float(value) if isinstance(value, np.floating) else str(value)


def cell(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`; "" for None or NaN (an empty table cell)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def markdown_table(rows: Sequence[SweepRow]) -> str:
    """The ranked table; the first working row is marked best."""
    header = (
        "| | layout (d x f x t) | batch | remat | status | state MiB/dev | peak MiB/dev "
        "| temp MiB/dev | peak/HBM | fits | compile s | XLA/analytic FLOPs | step ms | img/s "
        "| TFLOP/s | MFU | estimated step ms | estimated img/s | estimated MFU | reason |"
    )
    lines = [header, "|" + "---|" * 20]
    ordered = ranked(rows)
    for i, r in enumerate(ordered):
        best = "**best**" if i == 0 and r.status != "failed" else ""
        lines.append(
            f"| {best} | {r.layout} | {r.batch_size} | {r.remat} | {r.status} "
            f"| {mib(r.state_bytes_per_device)} | {mib(r.peak_bytes_per_device)} "
            f"| {mib(r.temp_bytes)} | {cell(r.hbm_fraction, '.0%')} "
            f"| {'' if r.fits is None else 'yes' if r.fits else 'NO'} "
            f"| {cell(r.compile_time_s, '.1f')} "
            f"| {cell(r.replication, '.2f')} "
            f"| {cell(r.step_time_s and r.step_time_s * 1e3, '.0f')} "
            f"| {cell(r.images_per_s, '.2f')} | {cell(r.tflops_per_s, '.4f')} "
            f"| {cell(r.mfu, '.3f')} "
            f"| {cell(r.estimated_step_time_s and r.estimated_step_time_s * 1e3, '.0f')} "
            f"| {cell(r.estimated_images_per_s, '.1f')} | {cell(r.estimated_mfu, '.3f')} "
            f"| {r.reason} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[SweepRow], path: epath.Path, title: str) -> None:
    """Two panels per point: images/s and per-device memory (peak, else state), in MiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.label for r in rows]
    speed = [r.images_per_s or 0.0 for r in rows]
    speed_name = "images/s"
    if not any(speed):
        speed = [r.estimated_images_per_s or 0.0 for r in rows]
        speed_name = "estimated images/s (XLA cost model)"
    memory = [(r.memory_bytes or 0) / MiB for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(rows) + 4), 4.5))
    hbm = [r.hbm_bytes_per_device for r in rows if r.hbm_bytes_per_device]
    if hbm:
        axes[1].axhline(min(hbm) / MiB, color="tab:red", linestyle="--", label="HBM per device")
        axes[1].legend(fontsize=8)
    for ax, values, name in ((axes[0], speed, speed_name), (axes[1], memory, "MiB per device")):
        bars = ax.bar(range(len(rows)), values, color="tab:blue")
        for bar, row in zip(bars, rows):
            if row.status == "failed":
                bar.set_color("tab:red")
                where = (bar.get_x() + bar.get_width() / 2, 0)
                ax.annotate("failed", where, ha="center", va="bottom", rotation=90, fontsize=8)
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(name)
    if not any(speed):
        axes[0].set_title("throughput (not timed)")
    elif speed_name == "images/s":
        axes[0].set_title("throughput")
    else:
        axes[0].set_title("estimated throughput (XLA cost model, not measured)")
    axes[1].set_title("memory (XLA peak estimate, else train state)")
    fig.suptitle(title)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def write_outputs(rows: Sequence[SweepRow], out_dir: str, meta: dict) -> epath.Path:
    """sweep.csv, sweep.json, sweep.md and sweep.png under `out_dir` (local or gs://)."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "sweep.csv")
    write_json(rows, out / "sweep.json", meta)
    title = f"{meta.get('config', '')} on {meta.get('n_devices', '')} x {meta.get('device', '')}"
    if meta.get("topology"):
        title += f" (topology {meta['topology']}, compiled without a TPU)"
    note = (
        "\n`estimated` columns: XLA's cost-model step time (`cost_analysis()` optimal_seconds) "
        "and the images/s and MFU it implies; an estimate, not a measurement.\n"
    )
    (out / "sweep.md").write_text(f"# Sweep: {title}\n\n{markdown_table(rows)}{note}")
    plot(rows, out / "sweep.png", title)
    return out
