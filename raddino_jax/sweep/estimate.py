"""Estimates read from XLA's compiled program of a sweep point: nothing here is measured.

`measure.run_point` compiles the train step (`jax.jit(...).lower(...).compile()`) and this module
reads what XLA reports about the compiled, per-device (partitioned) program:
- `memory_analysis()`: argument / output / temp / generated-code / alias bytes per device;
  peak = argument + output + temp - alias, compared with the device's HBM (`fits`);
- `cost_analysis()`: "flops", "bytes accessed" and, from the TPU compiler only,
  "optimal_seconds": its cost model's step time, from which the *estimated* images/s and MFU
  follow (`fill_estimates`).

A scanned step (`model.scan_blocks`) needs the depth extrapolation: XLA's cost analysis counts a
while loop's body once, so a scanned D-block step reports one block's FLOPs and time plus the
rest. The blocks are identical, so every cost is affine in the depth and two small unscanned
compiles (depth 1 and 2) give the unrolled step's cost (`extrapolate_by_depth`); the memory
analysis of the scanned compile itself is right as it is.

The measured step time is `measure.time_steps`. The Pallas splash-attention kernel carries no
cost estimate, so where the step uses it the estimated time is a lower bound
(`SPLASH_NOT_COSTED`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import ml_collections

from raddino_jax import flops
from raddino_jax.models import ModelSpec, attention
from raddino_jax.sweep.row import SweepRow
from raddino_jax.sweep.topology import per_device_share

ESTIMATE_BY_DEPTH = (
    "scan_blocks: XLA FLOPs and estimates extrapolated from unscanned depth-1 and depth-2 "
    "compiles (XLA's cost analysis counts a loop body once); memory from the scanned compile"
)
SCANNED_COST_SKIPPED = (
    "scan_blocks: no XLA FLOPs or estimate (its cost analysis counts a loop body once and the "
    "depth extrapolation runs only with --compile-only); the time is measured"
)
_LINEAR_COSTS = ("flops", "bytes accessed", "optimal_seconds")
SPLASH_NOT_COSTED = (
    "XLA's FLOPs and estimate leave out the Pallas splash-attention kernel (it carries no "
    "cost estimate): the estimated step time is a lower bound"
)


class PointView(Protocol):
    """The parts of a built sweep point (`Run`) that the estimates read."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    spec: ModelSpec


def memory_fields(compiled) -> dict[str, int | None]:
    """Per-device bytes from `compiled.memory_analysis()`; all None where the backend lacks it."""
    names = {
        "argument_bytes": "argument_size_in_bytes",
        "output_bytes": "output_size_in_bytes",
        "temp_bytes": "temp_size_in_bytes",
        "generated_code_bytes": "generated_code_size_in_bytes",
        "alias_bytes": "alias_size_in_bytes",
    }
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        stats = None
    if stats is None:
        return {key: None for key in [*names, "peak_bytes_per_device"]}
    out = {key: int(getattr(stats, attr, 0) or 0) for key, attr in names.items()}
    out["peak_bytes_per_device"] = (
        out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    )
    return out


def cost_fields(compiled) -> dict:
    """XLA's cost analysis of the compiled (per-device, partitioned) program (the keys used
    here: module docstring); {} if absent."""
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return {}
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else None
    return dict(cost or {})


def uses_splash(point: PointView) -> bool:
    """Whether the step's global crops go through the splash kernel (attention.attention)."""
    platform = point.mesh.devices.flat[0].platform
    backbone = point.spec.for_platform(platform).backbone
    grid = point.config.data.global_size // backbone.patch_size
    tokens = 1 + backbone.num_register_tokens + grid**2
    return backbone.attention_impl == "splash" and tokens >= attention.SPLASH_MIN_TOKENS


def extrapolate_by_depth(depth: int, compiled_at_depth: Callable[[int], object]) -> dict:
    """XLA's cost analysis of a `depth`-block step as if its blocks were unrolled (why: module
    docstring): cost(D) = cost(1) + (D - 1) * (cost(2) - cost(1)), with cost(1) and cost(2) from
    `compiled_at_depth(1)` and `compiled_at_depth(2)`, unscanned compiles of the same point
    (small programs: they compile in a fraction of the full step's time and fit where it does
    not). `measure.depth_extrapolated_cost` builds and compiles them.
    """
    one, two = (cost_fields(compiled_at_depth(d)) for d in (1, 2))
    return {
        k: float(one[k]) + (depth - 1) * (float(two[k]) - float(one[k]))
        for k in _LINEAR_COSTS
        if k in one and k in two
    }


def xla_flops(compiled) -> float | None:
    """XLA's flop count of the compiled (per-device, partitioned) program, if reported."""
    cost = cost_fields(compiled)
    return float(cost["flops"]) if "flops" in cost else None


def device_peak_and_hbm(point: PointView, peak: float | None) -> tuple[float | None, int | None]:
    """(peak FLOP/s, HBM bytes) of one mesh device; v4 topologies' per-core devices get half
    of the chip's (`topology.per_device_share`)."""
    devices = list(point.mesh.devices.flat)
    kind = devices[0].device_kind
    share = per_device_share(devices) if devices[0].platform == "tpu" else 1.0
    if peak is None:
        override = point.config.peak_tflops_per_device * 1e12 or None
        peak = flops.peak_flops_per_device(kind, point.spec.backbone.dtype, override=override)
        peak = peak * share if peak and not override else peak
    hbm = flops.hbm_bytes_per_device(kind)
    if not hbm and devices[0].platform != "tpu":  # e.g. CPU: the RAM it may use
        hbm, _ = device_capacity(devices[0])
    return peak, int(hbm * share) if hbm else None


def _available_ram_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:  # a local file, never a URL
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def device_capacity(device: jax.Device, override_gib: float = 0.0) -> tuple[int | None, str]:
    """(bytes one device can hold, where that figure comes from); (None, why) if unknown.

    In order: `override_gib` (config.device_memory_gib) when > 0; the runtime's
    `memory_stats()["bytes_limit"]` (GPU, TPU); on CPU the host's available RAM
    (/proc/meminfo MemAvailable) divided among this process's CPU devices, which share it;
    else the device kind's HBM (`flops.hbm_bytes_per_device`, e.g. a deviceless TPU topology).
    """
    if override_gib > 0:
        return int(override_gib * 2**30), "config.device_memory_gib"
    try:
        stats = device.memory_stats()
    except (NotImplementedError, RuntimeError, jax.errors.JaxRuntimeError):
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} bytes_limit"
    if device.platform == "cpu":
        available = _available_ram_bytes()
        if available:
            shared = max(1, sum(d.platform == "cpu" for d in jax.local_devices()))
            return available // shared, f"MemAvailable / {shared} CPU device(s)"
    hbm = flops.hbm_bytes_per_device(device.device_kind)
    if hbm:
        return hbm, f"{device.device_kind} HBM"
    return None, f"unknown for {device.device_kind}"


def fill_estimates(row: SweepRow, point: PointView, cost: dict, peak: float | None) -> None:
    """HBM fit and XLA's step-time estimate (with the images/s and MFU it implies)."""
    peak, hbm = device_peak_and_hbm(point, peak)
    row.device_kind = point.mesh.devices.flat[0].device_kind
    row.hbm_bytes_per_device = hbm
    if hbm and row.peak_bytes_per_device is not None:
        row.hbm_fraction = row.peak_bytes_per_device / hbm
        row.fits = row.peak_bytes_per_device <= hbm
    if "bytes accessed" in cost:
        row.xla_bytes_accessed_per_device = float(cost["bytes accessed"])
    seconds = float(cost.get("optimal_seconds", 0.0) or 0.0)
    if seconds > 0:
        row.estimated_step_time_s = seconds
        row.estimated_images_per_s = row.batch_size / seconds
        row.estimated_mfu = flops.mfu(row.analytic_flops_per_step, seconds, row.n_devices, peak)
