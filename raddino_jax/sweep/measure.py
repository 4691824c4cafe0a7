"""Measuring one sweep point: build, compile (and time) the SSL train step for a layout.

A point is (layout DATAxFSDPxTENSOR, global batch, remat); it uses the first data*fsdp*tensor
devices. `run_point` fills a `row.SweepRow`: the state's exact bytes per device from its
shardings (`state_bytes`, nothing allocated); the compile time and XLA's memory and cost
analysis (`estimate.py`: peak bytes and fit, XLA FLOPs, the estimated images/s and MFU, a
scanned step's costs extrapolated over its depth); in mode "run", the median time of steps on
a synthetic batch of the run's `Run.batch` (`host_batch`), images/s, analytic TFLOP/s
(`config.step_flops`) and MFU.
Mode "compile" stops after compiling (no state allocated, no step run: an AOT memory check for
a topology); mode "state" compiles nothing (exact state bytes and analytic FLOPs only).
A point that cannot run is a row with status "failed" and the reason; `sweep` never raises for
one. Single process only: the host batch is the global batch.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from raddino_jax import config as config_lib
from raddino_jax import flops
from raddino_jax.data import pipeline, prefetch
from raddino_jax.data.layout import CROP_KEYS
from raddino_jax.models.vit import normalize_remat
from raddino_jax.parallel import sharding
from raddino_jax.sweep.estimate import (
    ESTIMATE_BY_DEPTH,
    SCANNED_COST_SKIPPED,
    SPLASH_NOT_COSTED,
    cost_fields,
    device_peak_and_hbm,
    extrapolate_by_depth,
    fill_estimates,
    memory_fields,
    uses_splash,
)
from raddino_jax.sweep.row import SweepRow, describe_row, layout_name
from raddino_jax.train import build as build_lib
from raddino_jax.train import state as train_state
from raddino_jax.train.build import Run, build

MODES = ("run", "compile", "state")


# ----------------------------------------------------------------------------------------------
# Building one point
# ----------------------------------------------------------------------------------------------


def point_config(
    config: ml_collections.ConfigDict,
    layout: tuple[int, int, int],
    batch_size: int,
    remat: str | bool,
) -> ml_collections.ConfigDict:
    """A copy of `config` with the mesh, the global batch and remat policy of one sweep point."""
    c = config.copy_and_resolve_references()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = layout
    c.batch_size = batch_size
    c.model.remat = normalize_remat(remat)
    return c


def infeasible_reason(
    config: ml_collections.ConfigDict, layout: tuple[int, int, int], n_available: int
) -> str:
    """Why a point cannot run before building anything ("" when it can)."""
    data, fsdp, tensor = layout
    n_devices = data * fsdp * tensor
    if n_devices > n_available:
        return f"mesh {layout_name(layout)} needs {n_devices} devices, {n_available} available"
    if config.batch_size % (data * fsdp):
        return f"batch {config.batch_size} not divisible by the {data * fsdp} batch shards"
    heads = build_lib.model_spec(config).backbone.num_heads
    if heads % tensor:
        return f"{heads} attention heads not divisible by tensor={tensor}"
    try:
        config_lib.validate(config, n_devices=n_devices, process_count=1, data=False)
    except config_lib.ConfigError as err:
        return f"config: {err}"
    return ""


def state_bytes(abstract_state) -> tuple[int, int]:
    """(total bytes, bytes on one device) of a state whose leaves carry NamedShardings.

    Per device = sum over leaves of prod(sharding.shard_shape(shape)) * itemsize; every device
    holds the same shard shapes, so any device's count is the per-device count.
    """
    total = per_device = 0
    for leaf in jax.tree.leaves(abstract_state):
        itemsize = np.dtype(leaf.dtype).itemsize
        total += math.prod(leaf.shape) * itemsize
        per_device += math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize
    return total, per_device


def step_flops(point: Run) -> float:
    """Analytic FLOPs of one step: `config.step_flops`, the same count the loop logs."""
    return build_lib.step_flops(point.config, point.spec, point.mesh.devices.size)


# ----------------------------------------------------------------------------------------------
# Batch, compile, run
# ----------------------------------------------------------------------------------------------


def _random_crops(rng: np.random.Generator, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """Random crops: uniform pixel levels of an integer dtype, or standard-normal float32
    (what normalised crops look like)."""
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape, dtype=np.float32)


def host_batch(point: Run, seed: int) -> dict[str, np.ndarray]:
    """A synthetic global batch of the point's `Run.batch` (`data.layout.batch_spec`).

    Random crops in `config.data.transfer_dtype` (levels, or standard-normal float32), so the
    step compiled for it is the one the loop runs; the masks from the pipeline's own
    AddIbotMasks, i.e. the real sampler and the real static buffer U.
    """
    rng = np.random.default_rng(seed)
    crops = {
        key: _random_crops(rng, point.batch[key].shape, point.batch[key].dtype) for key in CROP_KEYS
    }
    return pipeline.AddIbotMasks(point.mask_spec).random_map(crops, rng)


def step_keys(point: Run, n: int, seed: int) -> list[jax.Array]:
    """n replicated step keys (stochastic depth), made before timing starts."""
    base = jax.random.key(seed)
    replicated = sharding.replicated(point.mesh)
    return [jax.device_put(jax.random.fold_in(base, i), replicated) for i in range(n)]


def compile_step(point: Run, seed: int = 0, compiler_options: dict | None = None):
    """(compiled executable, seconds spent lowering + compiling) on abstract inputs.

    `compiler_options` go to `Lowered.compile`, e.g. {"xla_backend_optimization_level": 0}
    halves CPU compile time when only memory or a smoke run matters (tests).
    """
    start = time.perf_counter()
    lowered = point.step_fn.lower(point.abstract_state, point.batch, jax.random.key(seed))
    compiled = lowered.compile(compiler_options)
    return compiled, time.perf_counter() - start


def depth_extrapolated_cost(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device], compiler_options=None
) -> dict:
    """XLA's cost analysis of the step as if its blocks were unrolled, for a scanned config.

    `estimate.extrapolate_by_depth` (why it is needed and how) over unscanned compiles of the
    same point at depth 1 and 2.
    """

    def compiled_at_depth(depth: int):
        c = config.copy_and_resolve_references()
        c.model.depth, c.model.scan_blocks = depth, False
        compiled, _ = compile_step(build(c, devices), c.seed, compiler_options)
        return compiled

    depth = build_lib.model_spec(config).backbone.depth
    return extrapolate_by_depth(depth, compiled_at_depth)


def initial_state(point: Run, seed: int) -> train_state.TrainState:
    """A fresh train state for `point`, created in its shardings (Gram teacher included)."""
    return point.create_state(seed)


def device_batch(point: Run, seed: int) -> dict[str, jax.Array]:
    """`host_batch(point, seed)` as global arrays in the step's batch shardings."""
    shardings = {key: leaf.sharding for key, leaf in point.batch.items()}
    return prefetch.to_global_batch(host_batch(point, seed), shardings)


def time_steps(point: Run, compiled, *, steps: int, warmup: int, seed: int) -> list[float]:
    """Seconds of each of `steps` timed steps after `warmup` untimed ones (state donated)."""
    state = initial_state(point, seed)
    batch = device_batch(point, seed)
    keys = step_keys(point, warmup + steps, seed)
    times = []
    for i, key in enumerate(keys):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    del state, batch
    return times


# ----------------------------------------------------------------------------------------------
# One point, the sweep
# ----------------------------------------------------------------------------------------------


def failure_reason(err: BaseException) -> str:
    """A one-line reason; XLA's RESOURCE_EXHAUSTED becomes "out of memory"."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower():
        return f"out of memory: {text[:300]}"
    return f"{type(err).__name__}: {text[:300]}"


def run_point(
    config: ml_collections.ConfigDict,
    layout: tuple[int, int, int],
    batch_size: int,
    remat: str | bool,
    *,
    devices: Sequence[jax.Device],
    mode: str = "run",
    steps: int = 5,
    warmup: int = 2,
    peak_flops: float | None = None,
    compiler_options: dict | None = None,
) -> SweepRow:
    """Measure one sweep point; never raises for a point that cannot run (status "failed")."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    remat = normalize_remat(remat)
    row = SweepRow(layout_name(layout), batch_size, remat)
    c = point_config(config, layout, batch_size, remat)
    row.reason = infeasible_reason(c, layout, len(devices))
    if row.reason:
        return row
    n_devices = math.prod(layout)
    row.n_devices = n_devices
    try:
        point = build(c, devices[:n_devices])
        row.state_bytes_total, row.state_bytes_per_device = state_bytes(point.abstract_state)
        row.analytic_flops_per_step = step_flops(point)
        if mode == "state":
            row.status = "state"
            return row
        compiled, row.compile_time_s = compile_step(point, c.seed, compiler_options)
        for key, value in memory_fields(compiled).items():
            setattr(row, key, value)
        cost = cost_fields(compiled)
        if c.model.scan_blocks and point.spec.backbone.depth > 2:
            if mode == "compile":
                cost = depth_extrapolated_cost(c, devices[:n_devices], compiler_options)
                row.reason = ESTIMATE_BY_DEPTH
            else:  # the step is timed: two more compiles for an estimate would be wasted
                cost = {}
                row.reason = SCANNED_COST_SKIPPED
        row.xla_flops_per_device = float(cost["flops"]) if "flops" in cost else None
        fill_estimates(row, point, cost, peak_flops)
        if row.estimated_step_time_s and uses_splash(point):
            row.reason = "; ".join(filter(None, [row.reason, SPLASH_NOT_COSTED]))
        if row.xla_flops_per_device is not None:
            row.replication = row.xla_flops_per_device * n_devices / row.analytic_flops_per_step
        if mode == "compile":
            row.status = "compiled"
            return row
        times = time_steps(point, compiled, steps=steps, warmup=warmup, seed=c.seed)
    except Exception as err:  # noqa: BLE001 - a sweep reports every failure as a row
        row.reason = failure_reason(err)
        return row
    row.step_time_s = statistics.median(times)
    row.images_per_s = row.batch_size / row.step_time_s
    row.tflops_per_s = row.analytic_flops_per_step / row.step_time_s / 1e12
    peak, _ = device_peak_and_hbm(point, peak_flops)
    row.mfu = flops.mfu(row.analytic_flops_per_step, row.step_time_s, row.n_devices, peak)
    row.status = "ok"
    return row


def sweep(
    config: ml_collections.ConfigDict,
    layouts: Sequence[tuple[int, int, int]],
    *,
    batch_sizes: Sequence[int] = (),
    remats: Sequence[str | bool] = (),
    devices: Sequence[jax.Device] | None = None,
    log=print,
    **point_options,
) -> list[SweepRow]:
    """Every (layout, batch size, remat) combination, in that nesting order.

    Empty `batch_sizes` / `remats` mean the config's own value; `point_options` are
    `run_point`'s (mode, steps, warmup, peak_flops, compiler_options).
    """
    if jax.process_count() > 1:
        raise RuntimeError("the sweep builds the whole batch on one host: run one process")
    devices = list(devices) if devices is not None else jax.devices()
    rows = []
    for layout in layouts:
        for batch_size in batch_sizes or [config.batch_size]:
            for remat in remats or [config.model.remat]:
                row = run_point(config, layout, batch_size, remat, devices=devices, **point_options)
                log(describe_row(row))
                rows.append(row)
    return rows
