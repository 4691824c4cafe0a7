"""Memory preflight of a training run: the compiled step's peak per device against the device.

`train.loop.train` calls `check_training_memory` (passed in by the driver, `raddino_jax.main`)
before any data is built or read, with the jitted step of every resolution stage it will run.
Each is compiled for the run's own devices with the sweep's AOT path (`measure.compile_step`:
the loop's later call reuses the executable, so this costs no second compile), and its peak
per device is XLA's memory analysis
(`estimate.memory_fields`: arguments, the state included, + outputs + temporaries - donated
aliases) plus the global batches the prefetcher keeps on the devices
(`config.data.device_prefetch`). The capacity is `estimate.device_capacity`: the device's
`bytes_limit`, or on CPU the available RAM shared by the local devices, or
`config.device_memory_gib`.

Over the capacity, the nearest layouts are compiled too (`measure.run_point` in "compile"
mode, at most four: the next stronger remat policy, half the images per device, all
data-parallel devices as FSDP, and the three together) and printed with their measured peaks,
then the run stops (`MemoryPreflightError`, exit code 4) unless `config.allow_over_memory`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from raddino_jax.sweep import measure
from raddino_jax.sweep.estimate import device_capacity, memory_fields
from raddino_jax.train.build import Run

GiB = 2**30
# The candidates' compiles only need the memory analysis: on CPU, LLVM's optimisation level 0
# leaves XLA's buffer assignment (and so the peak) unchanged and compiles ~1/3 faster.
CANDIDATE_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}
REMAT_ORDER = ("none", "dots", "full")  # less memory to the right


class MemoryPreflightError(RuntimeError):
    """The run's step needs more memory per device than the device has."""


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes per device of one compiled step: XLA's peak plus the prefetched batches."""

    label: str
    xla_peak_bytes: int | None  # None where the backend has no memory analysis
    prefetch_bytes: int

    @property
    def peak_bytes(self) -> int | None:
        return None if self.xla_peak_bytes is None else self.xla_peak_bytes + self.prefetch_bytes


def _gib(n: int | None) -> str:
    """Bytes as GiB (MiB under 1 GiB); "?" for None."""
    if n is None:
        return "?"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def batch_bytes_per_device(point: Run) -> int:
    """Bytes of one global batch on one device (its shard of every batch array)."""
    return measure.state_bytes(point.batch)[1]


def step_memory(point: Run, label: str, device_prefetch: int) -> StepMemory:
    """Compile the point's step (the jitted function the loop then calls) and read its peak."""
    compiled, _ = measure.compile_step(point, point.config.seed)
    peak = memory_fields(compiled)["peak_bytes_per_device"]
    return StepMemory(label, peak, max(device_prefetch, 1) * batch_bytes_per_device(point))


def nearest_layouts(
    config: ml_collections.ConfigDict, layout: tuple[int, int, int]
) -> list[tuple[str, tuple[int, int, int], int, str]]:
    """(description, layout, global batch, remat) of the candidates, nearest first."""
    data, fsdp, tensor = layout
    remat = config.model.remat if isinstance(config.model.remat, str) else "full"
    stronger = REMAT_ORDER[min(REMAT_ORDER.index(remat) + 1, len(REMAT_ORDER) - 1)]
    half = config.batch_size // 2
    sharded = (1, data * fsdp, tensor)
    per_device = lambda batch, lay: batch // (lay[0] * lay[1])  # noqa: E731
    out = []
    if stronger != remat:
        out.append((f"--config.model.remat={stronger}", layout, config.batch_size, stronger))
    if half > 0:
        note = f"--config.batch_size={half} ({per_device(half, layout)} images per device)"
        out.append((note, layout, half, remat))
    if data > 1:
        note = f"--config.mesh.data=1 --config.mesh.fsdp={data * fsdp}"
        out.append((note, sharded, config.batch_size, remat))
    if len(out) > 1:
        out.append(("all of the above", sharded if data > 1 else layout, max(half, 1), "full"))
    return out


def _all_over(over: bool) -> bool:
    """Whether any process is over its capacity (all stop together)."""
    if jax.process_count() == 1:
        return over
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(over))))


def check_training_memory(
    points: Sequence[tuple[str, Run]],
    config: ml_collections.ConfigDict,
    say: Callable[[str], None] = print,
) -> list[StepMemory]:
    """Compile each (label, point) step (`train.build.Run`: the loop's stages, or sweep points)
    and compare its peak per device with the capacity, as the module docstring describes."""
    device = points[0][1].mesh.devices.flat[0]
    capacity, source = device_capacity(device, config.device_memory_gib)
    prefetch = config.data.device_prefetch
    results = [step_memory(point, label, prefetch) for label, point in points]
    over = [r for r in results if capacity and r.peak_bytes is not None and r.peak_bytes > capacity]
    for r in results:
        if r.peak_bytes is None:
            say(f"memory: {r.label}: no XLA memory analysis on {device.platform}; not checked")
    if not capacity:
        say(f"memory: device capacity {source}; not checked")
    if not _all_over(bool(over)):
        if capacity and results[0].peak_bytes is not None:
            worst = max(r.peak_bytes for r in results if r.peak_bytes is not None)
            say(f"memory: peak {_gib(worst)} per device of {_gib(capacity)} ({source})")
        return results
    lines = []
    for r, (_, point) in zip(results, points, strict=True):
        if r not in over:
            continue
        lines.append(
            f"memory: {r.label} needs {_gib(r.peak_bytes)} per device (XLA peak "
            f"{_gib(r.xla_peak_bytes)} + {_gib(r.prefetch_bytes)} of prefetched batches) but "
            f"the device has {_gib(capacity)} ({source})"
        )
        lines += _candidate_lines(point, r, capacity)
    message = "\n".join(lines)
    if config.allow_over_memory:
        say(message + "\nconfig.allow_over_memory: running anyway")
        return results
    raise MemoryPreflightError(
        message + "\nchange the config as above, or set --config.allow_over_memory=true to "
        "run anyway (--config.device_memory_gib sets the capacity by hand)"
    )


def _candidate_lines(point: Run, step: StepMemory, capacity: int) -> list[str]:
    """The nearest layouts compiled, one line each, with their peaks and fit."""
    layout = tuple(int(point.mesh.shape[axis]) for axis in ("data", "fsdp", "tensor"))
    images = point.config.batch_size // (layout[0] * layout[1])
    devices = list(point.mesh.devices.flat)
    lines = ["  nearest layouts (compiled; peak per device incl. prefetched batches):"]
    for description, cand_layout, batch, remat in nearest_layouts(point.config, layout):
        row = measure.run_point(
            point.config,
            cand_layout,
            batch,
            remat,
            devices=devices,
            mode="compile",
            compiler_options=CANDIDATE_COMPILER_OPTIONS.get(devices[0].platform),
        )
        if row.peak_bytes_per_device is None:
            lines.append(f"    {description}: {row.reason or row.status}")
            continue
        cand_images = batch // (cand_layout[0] * cand_layout[1])
        peak = row.peak_bytes_per_device + step.prefetch_bytes * cand_images // max(images, 1)
        verdict = "fits" if peak <= capacity else "over"
        lines.append(f"    {description}: {_gib(peak)} ({verdict})")
    return lines
