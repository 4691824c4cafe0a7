"""Mesh-layout sweeps: compile (and time) the SSL train step for each (layout, batch, remat).

  python -m raddino_jax.sweep --config=configs/demo.py \
      --meshes=8x1x1,4x2x1,2x4x1,1x8x1,2x2x2 --batch-sizes=32,64 --remat=false,true \
      --steps=5 --out=runs/sweep

Layouts are DATAxFSDPxTENSOR; each uses the first data*fsdp*tensor devices. Per combination:
- `state_bytes_per_device`: the train state's bytes on one device, exact from its shardings
  (sum over leaves of prod(shard_shape) * itemsize), computed on the abstract state (nothing is
  allocated);
- compile with `jax.jit(...).lower(...).compile()` (`compile_time_s`) and read XLA's
  `memory_analysis()` (argument / output / temp / generated-code bytes per device; peak =
  argument + output + temp - alias) and `cost_analysis()` flops;
- unless --compile-only: warm-up steps, then --steps timed steps on a synthetic batch (random
  normalised crops, masks from the real iBOT mask sampler so the static buffer size is right):
  median step time, images/s, analytic TFLOP/s (`flops.ssl_step_flops`) and MFU.
A combination that cannot run is a row with status "failed" and the reason.

Modes: default (compile + time), --compile-only (no state allocated, no step run: AOT memory
check for a topology, e.g. ViT-g/14 under FSDP) and --state-only (no compilation at all: only
the exact state bytes per device and the analytic FLOPs; ~8 s for ViT-g/14 over five layouts,
whose 40-block step took 12.6 min and 3.8 GB of host RAM to compile for 1x8x1 on a 2-core
CPU host: see benchmarks/RESULTS.md).

Writes OUT/sweep.csv, OUT/sweep.json, OUT/sweep.md (sorted by images/s, or by memory without
timing; the best row marked) and OUT/sweep.png (images/s and per-device memory per layout).
Config overrides work as in raddino_jax.main: `--config.model.depth=2`. Single process only.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import statistics
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from raddino_jax import config as config_lib
from raddino_jax import flops
from raddino_jax.data import pipeline
from raddino_jax.models import ModelSpec, abstract_params, init_params
from raddino_jax.parallel import sharding
from raddino_jax.parallel.mesh import make_mesh, parse_layout
from raddino_jax.train import state as train_state
from raddino_jax.train.loop import BATCH_KEYS
from raddino_jax.train.optim import build_optimizer
from raddino_jax.train.step import compile_train_step

MODES = ("run", "compile", "state")
MiB = 2**20


@dataclasses.dataclass
class SweepRow:
    """One (layout, batch, remat) result; byte counts are per device, FLOPs per step (global).

    status: "ok" (timed), "compiled" (--compile-only), "state" (--state-only) or "failed"
    (then `reason` says why). Fields a mode does not measure stay None (NaN in the CSV).
    """

    layout: str
    batch_size: int
    remat: bool
    status: str = "failed"
    reason: str = ""
    n_devices: int = 0
    state_bytes_total: int | None = None
    state_bytes_per_device: int | None = None
    compile_time_s: float | None = None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    temp_bytes: int | None = None
    generated_code_bytes: int | None = None
    alias_bytes: int | None = None
    peak_bytes_per_device: int | None = None
    xla_flops_per_device: float | None = None
    analytic_flops_per_step: float | None = None
    # xla_flops_per_device * n_devices / analytic: ~1 when the batch's compute is split over the
    # devices, ~n_devices when every device computes the whole batch (XLA also counts
    # elementwise work, a few % at tiny widths).
    replication: float | None = None
    step_time_s: float | None = None
    images_per_s: float | None = None
    tflops_per_s: float | None = None
    mfu: float | None = None

    @property
    def label(self) -> str:
        return f"{self.layout} b{self.batch_size}" + (" remat" if self.remat else "")

    @property
    def memory_bytes(self) -> int | None:
        """Best available per-device memory: XLA's peak estimate, else the state alone."""
        return self.peak_bytes_per_device or self.state_bytes_per_device


# ----------------------------------------------------------------------------------------------
# Building one point
# ----------------------------------------------------------------------------------------------


def point_config(
    config: ml_collections.ConfigDict, layout: tuple[int, int, int], batch_size: int, remat: bool
) -> ml_collections.ConfigDict:
    """A copy of `config` with the mesh, the global batch and remat of one sweep point."""
    c = config.copy_and_resolve_references()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = layout
    c.batch_size = batch_size
    c.model.remat = remat
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
    heads = config_lib.model_spec(config).backbone.num_heads
    if heads % tensor:
        return f"{heads} attention heads not divisible by tensor={tensor}"
    try:
        config_lib.validate(config, n_devices=n_devices, process_count=1)
    except config_lib.ConfigError as err:
        return f"config: {err}"
    return ""


@dataclasses.dataclass
class Point:
    """Everything built for one sweep point (no device memory allocated yet)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    spec: ModelSpec
    optimizer: object
    abstract_state: train_state.TrainState
    shardings: object
    step_fn: object
    mask_spec: pipeline.MaskSpec


@functools.lru_cache(maxsize=8)
def _param_shapes(spec: ModelSpec) -> dict:
    """`abstract_params`, cached: tracing a 40-block init takes seconds, layouts share it."""
    return abstract_params(spec)


_STATE_SHAPES: dict = {}


def _state_shapes(spec: ModelSpec, optimizer_config, optimizer) -> train_state.TrainState:
    """Unsharded ShapeDtypeStruct train state (traced as `train_state.abstract_state` does).

    Cached per (spec, optimizer config): the optimizer state's shapes follow the parameter tree
    and the config, not the schedules' values (which change with the batch size), so the first
    optimizer seen stands for all.
    """
    key = (spec, optimizer_config)
    if key not in _STATE_SHAPES:
        _STATE_SHAPES[key] = jax.eval_shape(
            lambda: train_state.new_state(init_params(spec, 0), optimizer, spec)
        )
    return _STATE_SHAPES[key]


def abstract_state(spec: ModelSpec, optimizer, optimizer_config, mesh: jax.sharding.Mesh):
    """(ShapeDtypeStruct state carrying its shardings, shardings): `train_state.abstract_state`
    with the layout-independent tracing cached across the sweep's layouts."""
    shapes = _state_shapes(spec, optimizer_config, optimizer)
    shardings = train_state.state_shardings(shapes, mesh)
    with_shardings = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    return with_shardings, shardings


def build_point(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> Point:
    """Mesh, spec, optimizer, abstract state and the jitted step for `config` on `devices`."""
    n_devices = len(devices)
    mesh = make_mesh(dict(config.mesh), devices)
    spec = config_lib.model_spec(config)
    schedules = config_lib.schedules(config)
    optimizer_config = config_lib.optimizer_config(config)
    optimizer = build_optimizer(
        _param_shapes(spec),
        optimizer_config,
        lr_schedule=schedules.lr,
        last_layer_lr_schedule=schedules.last_layer_lr,
        wd_schedule=schedules.weight_decay,
    )
    abstract, shardings = abstract_state(spec, optimizer, optimizer_config, mesh)
    step_fn = compile_train_step(
        mesh,
        shardings,
        BATCH_KEYS,
        spec=spec,
        objective=config_lib.objective_config(config, n_devices),
        optimizer=optimizer,
        schedules=schedules,
    )
    # single process: the host batch is the global batch
    mask_spec = config_lib.mask_spec(config, n_devices, spec.backbone.patch_size)
    return Point(config, mesh, spec, optimizer, abstract, shardings, step_fn, mask_spec)


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


def step_flops(point: Point) -> float:
    """Analytic FLOPs of one step: `config.step_flops`, the same count the loop logs."""
    return config_lib.step_flops(point.config, point.spec, point.mesh.devices.size)


# ----------------------------------------------------------------------------------------------
# Batch, compile, run
# ----------------------------------------------------------------------------------------------


def host_batch(point: Point, seed: int) -> dict[str, np.ndarray]:
    """A synthetic host batch in the pipeline's layout (pipeline module docstring).

    global_crops [2, B, G, G, 1] and local_crops [n_local, B, L, L, 1]: standard-normal float32
    (what normalised crops look like); masks / mask_indices / mask_weights / mask_valid from the
    pipeline's own AddIbotMasks, i.e. the real sampler and the real static buffer U.
    """
    c, rng = point.config, np.random.default_rng(seed)
    b, g, loc = c.batch_size, c.data.global_size, c.data.local_size
    crops = {
        "global_crops": rng.standard_normal((2, b, g, g, 1), dtype=np.float32),
        "local_crops": rng.standard_normal((c.data.n_local, b, loc, loc, 1), dtype=np.float32),
    }
    return pipeline.AddIbotMasks(point.mask_spec).random_map(crops, rng)


def batch_shapes(point: Point) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch as sharded ShapeDtypeStructs, for compiling without building a batch."""
    c, spec = point.config, point.mask_spec
    b, g, loc = c.batch_size, c.data.global_size, c.data.local_size
    shapes = {
        "global_crops": ((2, b, g, g, 1), np.float32),
        "local_crops": ((c.data.n_local, b, loc, loc, 1), np.float32),
        "masks": ((2, b, spec.n_tokens), np.bool_),
        "mask_indices": ((spec.n_groups, spec.upper_bound), np.int32),
        "mask_weights": ((spec.n_groups, spec.upper_bound), np.float32),
        "mask_valid": ((spec.n_groups, spec.upper_bound), np.bool_),
    }
    shardings = sharding.batch_shardings(BATCH_KEYS, point.mesh)
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
        for k, (shape, dtype) in shapes.items()
    }


def step_keys(point: Point, n: int, seed: int) -> list[jax.Array]:
    """n replicated step keys (stochastic depth), made before timing starts."""
    base = jax.random.key(seed)
    replicated = sharding.replicated(point.mesh)
    return [jax.device_put(jax.random.fold_in(base, i), replicated) for i in range(n)]


def compile_step(point: Point, seed: int = 0, compiler_options: dict | None = None):
    """(compiled executable, seconds spent lowering + compiling) on abstract inputs.

    `compiler_options` go to `Lowered.compile`, e.g. {"xla_backend_optimization_level": 0}
    halves CPU compile time when only memory or a smoke run matters (tests).
    """
    start = time.perf_counter()
    lowered = point.step_fn.lower(point.abstract_state, batch_shapes(point), jax.random.key(seed))
    compiled = lowered.compile(compiler_options)
    return compiled, time.perf_counter() - start


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


def xla_flops(compiled) -> float | None:
    """XLA's flop count of the compiled (per-device, partitioned) program, if reported."""
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def time_steps(point: Point, compiled, *, steps: int, warmup: int, seed: int) -> list[float]:
    """Seconds of each of `steps` timed steps after `warmup` untimed ones (state donated)."""
    state = train_state.create_state(point.spec, point.optimizer, point.mesh, seed=seed)
    batch = pipeline.to_global_batch(
        host_batch(point, seed), sharding.batch_shardings(BATCH_KEYS, point.mesh)
    )
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
    remat: bool,
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
    row = SweepRow(layout_name(layout), batch_size, remat)
    c = point_config(config, layout, batch_size, remat)
    row.reason = infeasible_reason(c, layout, len(devices))
    if row.reason:
        return row
    n_devices = math.prod(layout)
    row.n_devices = n_devices
    try:
        point = build_point(c, devices[:n_devices])
        row.state_bytes_total, row.state_bytes_per_device = state_bytes(point.abstract_state)
        row.analytic_flops_per_step = step_flops(point)
        if mode == "state":
            row.status = "state"
            return row
        compiled, row.compile_time_s = compile_step(point, c.seed, compiler_options)
        for key, value in memory_fields(compiled).items():
            setattr(row, key, value)
        row.xla_flops_per_device = xla_flops(compiled)
        if row.xla_flops_per_device is not None:
            row.replication = row.xla_flops_per_device * n_devices / row.analytic_flops_per_step
        if mode == "compile":
            row.status = "compiled"
            return row
        times = time_steps(point, compiled, steps=steps, warmup=warmup, seed=c.seed)
    except Exception as err:  # noqa: BLE001 - a sweep reports every failure as a row
        row.reason = failure_reason(err)
        return row
    _fill_throughput(row, point, statistics.median(times), peak_flops)
    row.status = "ok"
    return row


def _fill_throughput(row: SweepRow, point: Point, step_time: float, peak: float | None) -> None:
    device = point.mesh.devices.flat[0]
    if peak is None:
        override = point.config.peak_tflops_per_device * 1e12 or None
        peak = flops.peak_flops_per_device(
            device.device_kind, point.spec.backbone.dtype, override=override
        )
    row.step_time_s = step_time
    row.images_per_s = row.batch_size / step_time
    row.tflops_per_s = row.analytic_flops_per_step / step_time / 1e12
    row.mfu = flops.mfu(row.analytic_flops_per_step, step_time, row.n_devices, peak)


def sweep(
    config: ml_collections.ConfigDict,
    layouts: Sequence[tuple[int, int, int]],
    *,
    batch_sizes: Sequence[int] = (),
    remats: Sequence[bool] = (),
    devices: Sequence[jax.Device] | None = None,
    mode: str = "run",
    steps: int = 5,
    warmup: int = 2,
    peak_flops: float | None = None,
    compiler_options: dict | None = None,
    log=print,
) -> list[SweepRow]:
    """Every (layout, batch size, remat) combination, in that nesting order.

    Empty `batch_sizes` / `remats` mean the config's own value.
    """
    if jax.process_count() > 1:
        raise RuntimeError("the sweep builds the whole batch on one host: run one process")
    devices = list(devices) if devices is not None else jax.devices()
    rows = []
    for layout in layouts:
        for batch_size in batch_sizes or [config.batch_size]:
            for remat in remats or [bool(config.model.remat)]:
                row = run_point(
                    config,
                    layout,
                    batch_size,
                    remat,
                    devices=devices,
                    mode=mode,
                    steps=steps,
                    warmup=warmup,
                    peak_flops=peak_flops,
                    compiler_options=compiler_options,
                )
                log(describe_row(row))
                rows.append(row)
    return rows


def layout_name(layout: tuple[int, int, int]) -> str:
    return "x".join(str(n) for n in layout)


def describe_row(row: SweepRow) -> str:
    """One console line per point."""
    if row.status == "failed":
        return f"{row.label}: failed ({row.reason})"
    parts = [f"{row.label}: {row.status}", f"state {_mib(row.state_bytes_per_device)} MiB/dev"]
    if row.peak_bytes_per_device is not None:
        parts.append(f"peak {_mib(row.peak_bytes_per_device)} MiB/dev")
    if row.compile_time_s is not None:
        parts.append(f"compile {row.compile_time_s:.1f} s")
    if row.images_per_s is not None:
        parts.append(f"{row.step_time_s * 1e3:.0f} ms/step, {row.images_per_s:.1f} img/s")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def ranked(rows: Sequence[SweepRow]) -> list[SweepRow]:
    """Working rows first, fastest first (or least memory first without timings); then failures."""
    good = [r for r in rows if r.status != "failed"]
    if any(r.images_per_s is not None for r in good):
        good.sort(key=lambda r: -(r.images_per_s or 0.0))
    else:
        good.sort(key=lambda r: r.memory_bytes or 0)
    return good + [r for r in rows if r.status == "failed"]


def write_csv(rows: Sequence[SweepRow], path: epath.Path) -> None:
    fields = [f.name for f in dataclasses.fields(SweepRow)]
    with path.open("w") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: ("" if v is None else v) for k, v in dataclasses.asdict(row).items()}
            )


def write_json(rows: Sequence[SweepRow], path: epath.Path, meta: dict) -> None:
    payload = {**meta, "rows": [_finite_or_none(dataclasses.asdict(r)) for r in rows]}
    path.write_text(json.dumps(payload, indent=2, allow_nan=False, default=_json_default))


def _finite_or_none(record: dict) -> dict:
    """NaN (e.g. MFU without a known peak) becomes null: strict JSON has no NaN."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }


def _json_default(value):
    return float(value) if isinstance(value, np.floating) else str(value)


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / MiB:.1f}"


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def markdown_table(rows: Sequence[SweepRow]) -> str:
    """The ranked table; the first working row is marked best."""
    header = (
        "| | layout (d x f x t) | batch | remat | status | state MiB/dev | peak MiB/dev "
        "| temp MiB/dev | compile s | XLA/analytic FLOPs | step ms | img/s | TFLOP/s | MFU "
        "| reason |"
    )
    lines = [header, "|" + "---|" * 15]
    ordered = ranked(rows)
    for i, r in enumerate(ordered):
        best = "**best**" if i == 0 and r.status != "failed" else ""
        lines.append(
            f"| {best} | {r.layout} | {r.batch_size} | {'yes' if r.remat else 'no'} | {r.status} "
            f"| {_mib(r.state_bytes_per_device)} | {_mib(r.peak_bytes_per_device)} "
            f"| {_mib(r.temp_bytes)} | {_fmt(r.compile_time_s, '.1f')} "
            f"| {_fmt(r.replication, '.2f')} "
            f"| {_fmt(r.step_time_s and r.step_time_s * 1e3, '.0f')} "
            f"| {_fmt(r.images_per_s, '.2f')} | {_fmt(r.tflops_per_s, '.4f')} "
            f"| {_fmt(r.mfu, '.3f')} | {r.reason} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[SweepRow], path: epath.Path, title: str) -> None:
    """Two panels per point: images/s and per-device memory (peak, else state), in MiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.label for r in rows]
    speed = [r.images_per_s or 0.0 for r in rows]
    memory = [(r.memory_bytes or 0) / MiB for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(rows) + 4), 4.5))
    for ax, values, name in ((axes[0], speed, "images/s"), (axes[1], memory, "MiB per device")):
        bars = ax.bar(range(len(rows)), values, color="tab:blue")
        for bar, row in zip(bars, rows):
            if row.status == "failed":
                bar.set_color("tab:red")
                ax.annotate(
                    "failed",
                    (bar.get_x() + bar.get_width() / 2, 0),
                    ha="center",
                    va="bottom",
                    rotation=90,
                    fontsize=8,
                )
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(name)
    axes[0].set_title("throughput" if any(speed) else "throughput (not timed)")
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
    (out / "sweep.md").write_text(f"# Sweep: {title}\n\n{markdown_table(rows)}")
    plot(rows, out / "sweep.png", title)
    return out


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"--remat values must be true/false, got {text!r}")


@dataclasses.dataclass(frozen=True)
class _Flags:
    """The CLI's absl flag holders (defined only when run as a program, so importing this
    module never registers a second --config next to raddino_jax.main's)."""

    config: object
    meshes: object
    batch_sizes: object
    remat: object
    steps: object
    warmup: object
    compile_only: object
    state_only: object
    peak_tflops: object
    out: object


def define_flags() -> _Flags:
    from absl import flags
    from ml_collections import config_flags

    return _Flags(
        config=config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)"),
        meshes=flags.DEFINE_list(
            "meshes", ["8x1x1", "4x2x1", "2x4x1", "1x8x1", "2x2x2"], "DATAxFSDPxTENSOR layouts"
        ),
        batch_sizes=flags.DEFINE_list("batch-sizes", [], "global batch sizes (default: config's)"),
        remat=flags.DEFINE_list("remat", [], "remat values, e.g. false,true (default: config's)"),
        steps=flags.DEFINE_integer("steps", 5, "timed steps per point"),
        warmup=flags.DEFINE_integer("warmup", 2, "untimed steps before timing"),
        compile_only=flags.DEFINE_bool(
            "compile-only", False, "compile and report memory; allocate and run nothing"
        ),
        state_only=flags.DEFINE_bool(
            "state-only", False, "no compilation: exact state bytes per device + analytic FLOPs"
        ),
        peak_tflops=flags.DEFINE_float(
            "peak-tflops", 0.0, "peak TFLOP/s per device for MFU (0: look up the device kind)"
        ),
        out=flags.DEFINE_string("out", None, "output folder (local or gs://)", required=True),
    )


def main(cli: _Flags, argv: Sequence[str]) -> None:
    """Run the sweep the flags describe and write its four files."""
    del argv
    from absl import app, flags
    from ml_collections import config_flags

    config = cli.config.value
    if config is None:
        raise app.UsageError("--config=configs/<name>.py is required")
    if cli.compile_only.value and cli.state_only.value:
        raise app.UsageError("--compile-only and --state-only exclude each other")
    mode = "state" if cli.state_only.value else "compile" if cli.compile_only.value else "run"
    devices = jax.devices()
    rows = sweep(
        config,
        [parse_layout(text) for text in cli.meshes.value],
        batch_sizes=[int(b) for b in cli.batch_sizes.value or []],
        remats=[_parse_bool(r) for r in cli.remat.value or []],
        devices=devices,
        mode=mode,
        steps=cli.steps.value,
        warmup=cli.warmup.value,
        peak_flops=cli.peak_tflops.value * 1e12 or None,
    )
    meta = {
        "config": config_flags.get_config_filename(flags.FLAGS["config"]),
        "mode": mode,
        "device": devices[0].device_kind,
        "platform": devices[0].platform,
        "n_devices": len(devices),
        "steps": cli.steps.value,
        "warmup": cli.warmup.value,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "jax": jax.__version__,
    }
    out = write_outputs(rows, cli.out.value, meta)
    print(markdown_table(rows))
    print(f"wrote {out}/sweep.{{csv,json,md,png}}")


if __name__ == "__main__":
    import functools

    from absl import app

    app.run(functools.partial(main, define_flags()))
