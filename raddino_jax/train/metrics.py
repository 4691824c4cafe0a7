"""Metric sinks of the training loop: `WORKDIR/metrics.jsonl`, TensorBoard events.

Only process 0 writes (the loop passes `enabled=False` elsewhere). Every record is one JSON
object on one line, `{"step": int, name: value, ...}`; non-finite values are written as strings
("nan", "inf") so the file stays strict JSON. Each write costs O(1 line), whatever the length
of the run, in one of two layouts chosen from the work directory:

- Filesystems that can append (local disks, NFS, FUSE mounts): one file, `metrics.jsonl`,
  opened once in append mode on the first write and kept open; each record is written and
  flushed, so it survives the process being killed right after.
- Object stores (`gs://`, `s3://`), which cannot append to an object: numbered part files
  `metrics/part-000000.jsonl`, `part-000001.jsonl`, ... of at most `part_lines` records. A write
  replaces the current part (at most `part_lines` lines uploaded, so a run of N records costs
  O(N * part_lines), not the O(N^2) of rewriting one growing object), and each record is durable
  as soon as its write returns (an object replacement is atomic). A restarted writer starts a new
  part after the last existing one and never rereads old parts. Keeping the whole file open in
  one upload was rejected: nothing is visible until it is closed, so a preempted run would lose
  its metrics.

Exact resume: `truncate_after(step)` drops the records of steps past the restored checkpoint
(written before the process died, recomputed after the restart), so the records read as one
uninterrupted run with no step logged twice. The loop calls it once, before the first write.
A last line torn by a crash mid-write is dropped there too.

`read_metrics(workdir)` reads either layout (both, single file first, if a run has both).

`StepLog` turns the loop's per-step device metrics into those records (one step late, with
step time, images/s, analytic TFLOP/s and MFU, images seen per source, records skipped) and is
the NaN guard (`check_finite`: `NonFiniteError`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping

import jax
import numpy as np
from etils import epath

from raddino_jax import flops
from raddino_jax.data import pipeline
from raddino_jax.data.layout import RECORDS_SKIPPED, SOURCE_IDS
from raddino_jax.train import stages as stages_lib

METRICS_FILE = "metrics.jsonl"
PARTS_DIR = "metrics"  # object stores: WORKDIR/metrics/part-NNNNNN.jsonl
PART_LINES = 200  # records per part file: bounds the bytes uploaded per write
OBJECT_STORE_PREFIXES = ("gs://", "s3://")


def _clean(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


def can_append(path: epath.Path) -> bool:
    """Whether `path` lives on a filesystem with a real append (not an object store)."""
    return not str(path).startswith(OBJECT_STORE_PREFIXES)


def _part_paths(workdir: epath.Path) -> list[epath.Path]:
    """The part files in write order (zero-padded names sort numerically)."""
    parts_dir = workdir / PARTS_DIR
    if not parts_dir.exists():
        return []
    return sorted(parts_dir.glob("part-*.jsonl"), key=lambda p: p.name)


def _metric_files(workdir: epath.Path) -> list[epath.Path]:
    """metrics.jsonl if it exists, then the part files: a run's records in write order."""
    path = workdir / METRICS_FILE
    return ([path] if path.exists() else []) + _part_paths(workdir)


def _parse_lines(text: str) -> tuple[list[tuple[str, dict]], bool]:
    """([(line, record)] for every complete line, whether a torn last line was skipped).

    Only the last line may be torn (a crash mid-write); a bad line elsewhere raises.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = []
    for i, line in enumerate(lines):
        try:
            parsed.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
            return parsed, True
    return parsed, False


class MetricsWriter:
    """Appends metric records to metrics.jsonl (or its part files) and to TensorBoard.

    Args:
      workdir: the run directory (local or gs://).
      enabled: False makes every method a no-op (processes other than 0).
      tensorboard: also write TensorBoard events (tensorboardX: no TensorFlow needed).
      append: force the layout (True: one appended file; False: part files); None picks it
        from `workdir` with `can_append`.
      part_lines: records per part file in the part layout.
    """

    def __init__(
        self,
        workdir: str | epath.Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        append: bool | None = None,
        part_lines: int = PART_LINES,
    ):
        self.enabled = enabled
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.append = can_append(self.workdir) if append is None else append
        self.part_lines = part_lines
        self._handle = None  # append layout: the open file
        self._part: tuple[epath.Path, list[str]] | None = None  # part layout: path, its lines
        self._next_part: int | None = None
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records with step > `step` (written after the checkpoint we resume from).

        Rewrites only files that lose records; call before the first `write`.
        """
        if not self.enabled:
            return
        self._close_handle()
        self._part, self._next_part = None, None
        for path in _metric_files(self.workdir):
            parsed, torn = _parse_lines(path.read_text())
            kept = [line for line, record in parsed if record["step"] <= step]
            if len(kept) == len(parsed) and not torn:
                continue
            if kept or path == self.path:
                _replace_text(path, "".join(line + "\n" for line in kept))
            else:
                path.unlink()

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """One record `{"step": step, **metrics}`, durable when this returns."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        line = json.dumps(record)
        if self.append:
            if self._handle is None:
                self.workdir.mkdir(parents=True, exist_ok=True)
                self._handle = self.path.open("a")
            self._handle.write(line + "\n")
            self._handle.flush()
        else:
            self._write_part(line)
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, float):  # the finite metrics (`_clean`), not the step
                    self._tb.add_scalar(key, value, int(step))
            self._tb.flush()

    def _write_part(self, line: str) -> None:
        if self._part is None or len(self._part[1]) >= self.part_lines:
            if self._next_part is None:  # first write of this writer: after existing parts
                existing = _part_paths(self.workdir)
                self._next_part = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
                (self.workdir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
            self._part = (self.workdir / PARTS_DIR / f"part-{self._next_part:06d}.jsonl", [])
            self._next_part += 1
        path, lines = self._part
        lines.append(line)
        path.write_text("".join(text + "\n" for text in lines))

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        self._close_handle()
        if self._tb is not None:
            self._tb.close()


def _replace_text(path: epath.Path, text: str) -> None:
    """Write `text` to a sibling and rename it over `path` (no half-written file on a crash)."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_metrics(workdir: str | epath.Path) -> list[dict]:
    """Every record of a run, in write order, from either layout (see the module docstring)."""
    files = _metric_files(epath.Path(workdir))
    return [record for file in files for _, record in _parse_lines(file.read_text())[0]]


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


class StepLog:
    """Turns each step's device metrics into log records, one step late.

    The loop hands it each dispatched step (`dispatched`: the device metrics and the host-side
    entries of the step's batch, `layout.HOST_KEYS`). `flush()` reads the pending step's
    `finite` flag every step (the NaN guard) and all of its metrics only on log steps (every
    `config.log_every` steps and the last), where it writes a record. The loop calls it after
    dispatching the next step. Step time and images/s are wall-clock averages over the steps
    since the previous log line.

    Host counts: this process's records skipped and images per mixture source (from the
    batches' `source_ids`), summed over processes only on log and checkpoint steps (one
    all-gather of a few integers), plus the global counts of the steps before this run
    (the checkpoint's `counters`, `restore_counters`). Exact on resume with any process count:
    each step's images are counted once, by the process that read them.
    """

    def __init__(self, config, writer, progress, peak, n_devices, stage_table, data):
        self.config, self.writer, self.progress = config, writer, progress
        self.peak, self.n_devices = peak, n_devices
        self.stage_table, self.data = stage_table, data
        self.stage, self.flops_per_step, self.gram_flops_per_step = stage_table[0], 0.0, 0.0
        # (step number after the update, device metrics, this process's host counts then)
        self.pending = None
        # [records_skipped, images of source 0, 1, ...]: this process's since the run started,
        # and the global counts of the steps before it (restore_counters)
        self.counted_here = np.zeros(1 + max(len(data.source_names), 1), np.int64)
        self.counted_before = np.zeros_like(self.counted_here)
        self.last: dict[str, float] = {}
        self.window_start, self.window_steps = time.perf_counter(), 0

    def _counter_names(self) -> list[str]:
        """The names of the host counts in a checkpoint's `counters` and the metrics."""
        return [RECORDS_SKIPPED, *(f"images_seen/{n}" for n in self.data.source_names)]

    def restore_counters(self, counters: dict[str, int]) -> None:
        """The global host counts of the steps before this run, from a checkpoint's `counters`
        (a checkpoint written before the per-source counts existed restarts them from 0)."""
        for i, name in enumerate(self._counter_names()):
            self.counted_before[i] = counters.get(name, 0)

    def dispatched(self, step: int, metrics, host: dict[str, np.ndarray]) -> None:
        """Step `step` (numbered after its update) was dispatched with `metrics`, on a batch
        whose host-side entries are `host`: count them and hold the metrics for `flush`."""
        self.counted_here[0] += int(host.get(RECORDS_SKIPPED, 0))
        if SOURCE_IDS in host:
            ids = np.asarray(host[SOURCE_IDS])
            self.counted_here[1:] += np.bincount(ids, minlength=len(self.counted_here) - 1)
        self.pending = (step, metrics, self.counted_here.copy())

    def enter(self, stage, flops_per_step: float, gram_flops_per_step: float) -> None:
        """A new stage: its batch size and analytic FLOPs (of a step before and from
        `ssl.gram_start_step`: the Gram teacher's forward runs only from there); the timing
        window restarts."""
        self.stage, self.flops_per_step = stage, flops_per_step
        self.gram_flops_per_step = gram_flops_per_step
        self.window_start, self.window_steps = time.perf_counter(), 0

    def global_counts(self, counted_here: np.ndarray) -> dict[str, int]:
        """Records skipped and images per mixture source since step 0, by all processes, from
        this process's `counted_here` (with several, a collective: every process calls it on
        the same steps)."""
        total = counted_here
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            total = np.sum(multihost_utils.process_allgather(counted_here), axis=0)
        total = self.counted_before + total
        return {name: int(n) for name, n in zip(self._counter_names(), total)}

    def counters(self) -> dict[str, int]:
        """What a checkpoint keeps besides the state (read back by `restore_counters`)."""
        return self.global_counts(self.counted_here)

    def check_bad_fraction(self, step: int, skipped: int, seen: int) -> None:
        """Stops the run when more than `config.data.max_bad_fraction` of the images read so
        far were undecodable records (counted, skipped and replaced by `DecodedStream`)."""
        limit = self.config.data.max_bad_fraction
        if skipped > limit * seen:
            raise pipeline.BadDataError(
                f"step {step}: {skipped} of the {seen} records read so far do not decode "
                f"({skipped / seen:.2%} > config.data.max_bad_fraction={limit}); check or "
                "rebuild the dataset (`python -m data_prep.build`), or raise the fraction"
            )

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics, counted_here = self.pending
        self.pending = None
        check_finite(step, metrics)
        self.window_steps += 1
        if self.progress is not None:
            self.progress.update(1)
        if step % self.config.log_every and step != self.config.total_steps:
            return
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
        step_time = (time.perf_counter() - self.window_start) / self.window_steps
        values["step_time_s"] = step_time
        values["images_per_s"] = self.stage.batch_size / step_time
        # analytic, this stage's shapes; record `step` ran state.step = step - 1
        gram_on = step - 1 >= self.config.ssl.gram_start_step
        step_flops = self.gram_flops_per_step if gram_on else self.flops_per_step
        values["step_tflops"] = step_flops / 1e12
        values["model_tflops_per_s"] = step_flops / step_time / 1e12
        if len(self.stage_table) > 1:
            values["stage"] = self.stage.index
        values["images_seen"] = stages_lib.images_before(self.stage_table, step)
        values.update(self.global_counts(counted_here))
        self.check_bad_fraction(step, values[RECORDS_SKIPPED], values["images_seen"])
        if self.peak:
            values["mfu"] = flops.mfu(step_flops, step_time, self.n_devices, self.peak)
        self.writer.write(step, values)
        if self.progress is not None:
            self.progress.set_postfix(
                loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}"
            )
        self.last = values
        self.window_start, self.window_steps = time.perf_counter(), 0


def check_finite(step: int, metrics) -> None:
    """The NaN guard: raises `NonFiniteError` when the step's update was refused. Only the
    one `finite` scalar is read from the devices (every step); the rest on failure."""
    if bool(jax.device_get(metrics["finite"])):
        return
    values = jax.device_get(metrics)
    names = [k for k in values if k == "loss" or k.startswith("grad_norm/")]
    bad = [k for k in names if not np.isfinite(values[k])]
    raise NonFiniteError(
        f"non-finite {', '.join(bad)} at step {step} "
        f"({', '.join(f'{k}={values[k]}' for k in bad)}); the update was not applied and the "
        "last good checkpoint is kept. Lower optim.base_lr, raise optim.warmup_steps or use "
        "model.dtype=float32 to investigate."
    )


def progress_bar(enabled: bool, initial: int, total: int):
    """The tqdm bar of the loop (process 0), or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
