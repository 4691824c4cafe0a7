"""The training loop: build everything from the config, resume, step, log, checkpoint, evaluate.

One batch's path: Grain iterator (host batch, crop-major, crops as uint8 levels by default;
`config.data.num_workers` processes prepare batches ahead) -> `prefetch.DevicePrefetcher`
(`to_global_batch`: global jax.Arrays sharded over data x fsdp, `config.data.device_prefetch`
of them kept ready by a background thread) -> jitted `train_step` (normalises the crops on
the device) -> metrics (read on the host one step late) -> metrics.jsonl / TensorBoard /
progress bar.

Where the host waits for the devices, each step:
- The step count is a Python counter (the device value is read once, at the start), so the
  host prepares batch N+1 and puts it on the devices while step N runs; with
  `data.device_prefetch` >= 2 a thread does that, also while the loop waits below.
- After dispatching step N the host reads step N-1's metrics (all of them, for the NaN guard);
  that waits for step N-1, never for step N, so the host runs at most one step ahead.
- On checkpoint steps (and the last step) it waits for step N's metrics before saving, so a
  checkpoint never holds an update the NaN guard rejected; the save itself is asynchronous.
- The preemption check is an all-gather across processes when there are several; it runs
  every `config.preemption_check_every` steps and on checkpoint steps, so a SIGTERM/SIGINT is
  honoured (checkpoint saved, exit) within that many steps (`preemption_check_due`). One
  process reads its own flag every step.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from raddino_jax import checkpoint, flops
from raddino_jax import config as config_lib
from raddino_jax.data import layout, pipeline, prefetch, sources
from raddino_jax.models import ModelSpec, abstract_params, init_params
from raddino_jax.parallel import sharding
from raddino_jax.train import stages as stages_lib
from raddino_jax.train.build import build
from raddino_jax.train.metrics import MetricsWriter

BATCH_KEYS = layout.BATCH_KEYS  # defined with the batch layout, in data/layout.py


def say(message: str) -> None:
    """Console line from process 0 (absl INFO is left to the libraries' chatter)."""
    if jax.process_index() == 0:
        print(message, flush=True)


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint of the current step was written."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"received {signal.Signals(signum).name}: saved checkpoint at step {step}")


class _SignalFlag:
    """Records SIGTERM / SIGINT instead of dying mid-step (preemption, Ctrl-C)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def raised(self) -> int | None:
        """The signal, agreed across processes (any process preempted -> all save).

        With several processes this is a collective: every process must call it on the same
        step (`preemption_check_due`)."""
        flag = np.int32(self.signum or 0)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = np.max(multihost_utils.process_allgather(flag))
        return int(flag) or None


def preemption_check_due(
    steps_done: int, every: int, process_count: int, checkpoint_step: bool
) -> bool:
    """Whether the loop checks for a signal after its `steps_done`-th step.

    One process reads its own flag: free, so every step. Several agree on it with an
    all-gather that every process must enter on the same step; they do so every `every` steps
    (`config.preemption_check_every`) and on checkpoint steps. The decision depends only on
    the step count and the config, so all processes take it alike; a signal is honoured
    within `every` steps.
    """
    return process_count == 1 or checkpoint_step or steps_done % every == 0


def initial_params(config: ml_collections.ConfigDict, spec: ModelSpec) -> dict | None:
    """Pretrained weights from `config.init` merged with fresh heads where none are given."""
    path = config.init.checkpoint
    if not path:
        return None
    if checkpoint.is_param_checkpoint(path) or checkpoint.is_run_dir(path):
        _, loaded = checkpoint.load_any_params(path, which=config.init.which)
    else:
        from raddino_jax.convert.from_torch import read_torch_weights

        _, loaded = read_torch_weights(
            path,
            config.init.heads or None,
            which=config.init.which,
            num_heads=spec.backbone.num_heads,
        )
    expected = abstract_params(spec)
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)  # noqa: E731
    if shapes(loaded["backbone"]) != shapes(expected["backbone"]):
        raise config_lib.ConfigError(
            f"config.init.checkpoint: the backbone in {path} does not match config.model "
            f"(e.g. pos_embed {loaded['backbone']['pos_embed'].shape} vs "
            f"{expected['backbone']['pos_embed'].shape}, depth/width/patch); set config.model "
            "(arch, img_size, patch_size, num_register_tokens) to the checkpoint's architecture"
        )
    fresh = init_params(spec, config.seed)
    params = {"backbone": loaded["backbone"]}
    for head in ("dino_head", "ibot_head"):
        if head not in expected:
            continue
        if head in loaded and shapes(loaded[head]) == shapes(expected[head]):
            params[head] = loaded[head]
            say(f"init: {head} from {path}")
        else:
            params[head] = fresh[head]
            say(f"init: fresh {head} (none matching in {path})")
    return params


def _write_run_files(workdir: epath.Path, config, spec: ModelSpec) -> None:
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / checkpoint.SPEC_FILE).write_text(spec.to_json())
    # features are taken at the resolution the run ends with (its last stage)
    final_size = stages_lib.stage_table(config)[-1].global_size
    pre = checkpoint.Preprocessing(
        image_size=final_size, mean=config.data.mean, std=config.data.std
    )
    (workdir / checkpoint.PREPROCESSING_FILE).write_text(pre.to_json())
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    data: sources.TrainingData | None = None,
    *,
    check_memory: Callable | None = None,
) -> dict[str, float]:
    """Run (or resume) training to `config.total_steps`; returns the last logged metrics.

    `data`: the run's training data when the caller has opened it already
    (`sources.open_training_data(config, workdir)`; raddino_jax.scaling counts its images), so
    a patient subset's scan of the records runs once per run.
    `check_memory([(label, the stage's `build.Run`), ...], config, say)` runs before any data
    is built or read; the driver passes `sweep.preflight.check_training_memory` (which
    compiles each step and raises when it does not fit), tests that call `train` directly
    leave it out.
    """
    workdir = epath.Path(workdir)
    devices = jax.devices()
    config_lib.validate(config, n_devices=len(devices), process_count=jax.process_count())
    run = build(config, devices)
    mesh, spec, objective = run.mesh, run.spec, run.objective
    is_main = jax.process_index() == 0
    say(f"run: {config_lib.describe(config)}")
    say(
        f"mesh {dict(mesh.shape)} over {len(devices)} {devices[0].device_kind} device(s), "
        f"{jax.process_count()} process(es)"
    )
    batch_shardings = sharding.batch_shardings(BATCH_KEYS, mesh)
    stage_table = stages_lib.stage_table(config)
    # one jitted step per resolution stage (one compile each)
    stage_runs = {
        stage.index: run if len(stage_table) == 1 else run.for_stage(stage.config)
        for stage in stage_table
    }
    # Memory preflight, before any data is built or read: every stage's step compiled for these
    # devices (the loop's first call of each reuses the executable) against their capacity.
    if check_memory is not None:
        check_memory(
            [
                (f"stage {stage.index} ({_stage_shape(stage, mesh)})", stage_runs[stage.index])
                for stage in stage_table
            ],
            config,
            say,
        )

    # Data: one dataset per resolution stage (train/stages.py), each continuing the stream
    data = data or sources.open_training_data(config, workdir)
    data_dir, name = data.data_dir, data.name
    if config.data.builtin:
        say(f"data.builtin: training on the built-in samples at {data_dir}/{name}")
    if data.source_names:
        shares = data.records.shares
        say("mixture: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(data.source_names, shares)))
    # periodic kNN's datasets, checked now (label, splits): a run fails before its state exists
    eval_data = _eval_datasets(config, data)

    def stage_iterator(stage: stages_lib.Stage, start_position: int | None = None):
        return iter(
            pipeline.make_dataset(
                data.records,
                seed=config.seed,
                per_process_batch=stage.batch_size // jax.process_count(),
                crop_cfg=config_lib.crop_config(stage.config),
                mask_group_size=config_lib.mask_group_size(stage.config, len(devices)),
                patch_size=spec.backbone.patch_size,
                mask_ratio_min_max=tuple(config.data.mask_ratio_min_max),
                mask_sample_probability=config.data.mask_sample_probability,
                num_workers=config.data.num_workers,
                read_threads=config.data.read_threads,
                prefetch_buffer=config.data.prefetch,
                start_position=stage.start_position if start_position is None else start_position,
                count_skipped=True,
            )
        )

    # State: resume from the newest intact checkpoint, or start from pretrained / random weights
    checkpointer = checkpoint.TrainCheckpointer(workdir, config.keep_checkpoints)
    latest, state = checkpointer.restore_latest_valid(
        run.abstract_state,
        # a checkpoint from before Gram was on: fine while the first copy is still ahead
        gram_teacher_from_teacher=lambda step: (
            objective.gram_teacher == "ema" and step <= objective.gram_start_step
        ),
        say=say,
    )
    # The checkpoint of step S holds the iterator of the stage that ran step S - 1 (at a stage
    # boundary, the previous stage's); the loop switches to the next stage's when it gets there.
    stage = stages_lib.stage_at(stage_table, max((latest or 0) - 1, 0))
    data_iterator = stage_iterator(stage)
    skipped_before = 0  # undecodable records passed over by the steps before this run's first
    if latest is not None:
        data_iterator = _resume_data(
            checkpointer, latest, data_iterator, stage_table, stage, stage_iterator
        )
        skipped_before = checkpointer.restore_counters(latest).get(layout.RECORDS_SKIPPED, 0)
        say(f"resumed from {checkpointer.directory} at step {latest}")
    else:
        state = run.create_state(config.seed, params=initial_params(config, spec))
    _write_run_files(workdir, config, spec)
    writer = MetricsWriter(workdir, enabled=is_main)
    writer.truncate_after(int(state.step))

    peak = flops.peak_flops_per_device(
        devices[0].device_kind,
        spec.backbone.dtype,
        override=config.peak_tflops_per_device * 1e12 or None,
    )
    evaluator = None  # built per stage: kNN runs at the current stage's global size
    profile = (
        tuple(int(x) for x in config.profile_steps.split(":")) if config.profile_steps else None
    )

    base_key = jax.random.key(config.seed)
    progress = _progress(is_main, int(state.step), config.total_steps)
    log = _StepLog(config, writer, progress, peak, len(devices), stage_table, data)
    log.skipped_before = skipped_before
    skipped_here = 0  # undecodable records behind this process's batches of this run
    step_fn = None
    saved_step = latest
    # Global batches ahead of the step; checkpoints hold the iterator at the first one unused.
    batches = prefetch.DevicePrefetcher(data_iterator, batch_shardings, config.data.device_prefetch)
    try:
        with _SignalFlag() as signals:
            step = int(state.step)  # the one device read of the step count: then a host counter
            while step < config.total_steps:
                if step_fn is None or step >= stage.end_step:  # the first step of a stage
                    if step >= stage.end_step:
                        batches.close()
                        stage = stages_lib.stage_at(stage_table, step)
                        batches = prefetch.DevicePrefetcher(
                            stage_iterator(stage), batch_shardings, config.data.device_prefetch
                        )
                    if len(stage_table) > 1:
                        say(
                            f"stage {stage.index}: steps {stage.start_step}-{stage.end_step}, "
                            f"{stage.global_size}/{stage.local_size}px, batch {stage.batch_size}"
                        )
                    log.flush()
                    step_fn = stage_runs[stage.index].step_fn
                    if eval_data and (evaluator is None or evaluator.size != stage.global_size):
                        evaluator = _Evaluator(config, spec, eval_data, stage.global_size)
                    log.enter(
                        stage,
                        *(
                            config_lib.step_flops(stage.config, spec, len(devices), gram_active=g)
                            for g in (False, True)
                        ),
                    )
                if profile and step == profile[0] and is_main:
                    jax.profiler.start_trace(str(workdir / "profile"))
                batch = next(batches)
                skipped_here += batches.last_records_skipped
                state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
                log.flush()  # the previous step's metrics (finished: see the loop's top)
                log.pending = (step + 1, metrics, skipped_here)
                if profile and step + 1 == profile[1] and is_main:
                    jax.block_until_ready(metrics)
                    jax.profiler.stop_trace()
                done = step + 1  # steps finished once this one has run
                checkpoint_step = done % config.checkpoint_every == 0 or done == config.total_steps
                if checkpoint_step:
                    # finish this step's metrics first: a checkpoint never holds a bad update,
                    # and metrics.jsonl has its line if the process dies right after
                    log.flush()
                    checkpointer.save(state, batches, counters=log.counters(skipped_here))
                    saved_step = step + 1
                    checkpointer.check()
                if evaluator is not None and (step + 1) % config.eval.every == 0:
                    results = evaluator(state.teacher)
                    writer.write(step + 1, {**results, "eval_image_size": evaluator.size})
                    say(
                        f"step {step + 1} eval "
                        + ", ".join(f"{k}={v:.3f}" for k, v in results.items())
                    )
                due = preemption_check_due(
                    done, config.preemption_check_every, jax.process_count(), checkpoint_step
                )
                signum = signals.raised() if due else None
                if signum:
                    log.flush()
                    if saved_step != step + 1:
                        counters = log.counters(skipped_here)
                        checkpointer.save(state, batches, force=True, counters=counters)
                    checkpointer.wait()
                    raise Preempted(signum, step + 1)
                step += 1
            log.flush()
        checkpointer.wait()
        checkpointer.check()
    finally:
        batches.close()
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        if progress is not None:
            progress.close()
    return log.last


def _stage_shape(stage: stages_lib.Stage, mesh) -> str:
    """ "vit_small 56/28px, batch 16, remat none, mesh data 8 x fsdp 1 x tensor 1": what the
    memory preflight names."""
    c = stage.config
    layout = " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items())
    return (
        f"{c.model.arch} {stage.global_size}/{stage.local_size}px, batch {stage.batch_size}, "
        f"remat {c.model.remat}, mesh {layout}"
    )


def _resume_data(checkpointer, step: int, iterator, stage_table, stage, stage_iterator):
    """The data iterator at the first image that the steps before `step` have not used.

    A checkpoint written by as many processes as this run has holds each process's Grain
    iterator: restored exactly (the same batches, crops and masks as an uninterrupted run).
    Otherwise (another process count: preemptible capacity coming back smaller or larger), or
    when that item does not restore, the position follows from the step: the steps before it
    consumed global stream positions [0, `stages.images_before(step)`) exactly, every process
    taking its stride of them, so the stream continues at that position on any number of
    processes with no image repeated or skipped. Crops are keyed by the global position and
    come out the same; the iBOT masks are drawn from the new layout's stream.
    """
    count = checkpointer.data_process_count(step)
    reason = f"written by {count} process(es), this run has {jax.process_count()}"
    ok = count == jax.process_count()
    if ok:
        try:
            checkpointer.restore_data(step, iterator)
        except Exception as err:  # noqa: BLE001 - any failure falls back to the step's position
            ok, reason = False, f"data iterator does not restore ({checkpoint.one_line(err)})"
    if checkpoint.all_processes_ok(ok):
        return iterator
    position = stages_lib.images_before(stage_table, step)
    say(
        f"data: checkpoint {step} {reason}: the stream continues at global position "
        f"{position} (the images of steps 0-{step - 1})"
    )
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
    return stage_iterator(stage, start_position=position)


class _StepLog:
    """Turns each step's device metrics into log records, one step late.

    `flush()` reads the pending step's metrics to the host (every step, for the NaN guard) and
    writes a record every `config.log_every` steps and at the last. The loop calls it after
    dispatching the next step. Step time and images/s are wall-clock averages over the steps
    since the previous log line.
    """

    def __init__(self, config, writer, progress, peak, n_devices, stage_table, data):
        self.config, self.writer, self.progress = config, writer, progress
        self.peak, self.n_devices = peak, n_devices
        self.stage_table, self.data = stage_table, data
        self.stage, self.flops_per_step, self.gram_flops_per_step = stage_table[0], 0.0, 0.0
        # (step number after the update, device metrics, this process's records_skipped)
        self.pending = None
        self.skipped_before = 0  # records_skipped (global) of the steps before this run
        self.last: dict[str, float] = {}
        self.window_start, self.window_steps = time.perf_counter(), 0

    def enter(self, stage, flops_per_step: float, gram_flops_per_step: float) -> None:
        """A new stage: its batch size and analytic FLOPs (of a step before and from
        `ssl.gram_start_step`: the Gram teacher's forward runs only from there); the timing
        window restarts."""
        self.stage, self.flops_per_step = stage, flops_per_step
        self.gram_flops_per_step = gram_flops_per_step
        self.window_start, self.window_steps = time.perf_counter(), 0

    def images_seen(self, step: int) -> dict[str, float]:
        """Global images consumed by steps [0, step), in total and per mixture source."""
        seen = stages_lib.images_before(self.stage_table, step)
        out = {"images_seen": seen}
        if self.data.source_names:
            counts = pipeline.source_counts(self.data.records, self.config.seed, seen)
            out.update({f"images_seen/{n}": int(c) for n, c in zip(self.data.source_names, counts)})
        return out

    def records_skipped(self, skipped_here: int) -> int:
        """Undecodable records passed over since step 0, by all processes (with several,
        a collective: every process calls it on the same steps)."""
        total = np.int64(skipped_here)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            total = np.sum(multihost_utils.process_allgather(total))
        return self.skipped_before + int(total)

    def counters(self, skipped_here: int) -> dict[str, int]:
        """What a checkpoint keeps besides the state (restored by `restore_counters`)."""
        return {layout.RECORDS_SKIPPED: self.records_skipped(skipped_here)}

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
        step, metrics, skipped_here = self.pending
        self.pending = None
        _check_finite(step, metrics)
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
        values.update(self.images_seen(step))
        values[layout.RECORDS_SKIPPED] = self.records_skipped(skipped_here)
        self.check_bad_fraction(step, values[layout.RECORDS_SKIPPED], values["images_seen"])
        if self.peak:
            values["mfu"] = step_flops / step_time / (self.peak * self.n_devices)
        self.writer.write(step, values)
        if self.progress is not None:
            self.progress.set_postfix(
                loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}"
            )
        self.last = values
        self.window_start, self.window_steps = time.perf_counter(), 0


def _check_finite(step: int, metrics) -> None:
    values = jax.device_get(metrics)
    if values["finite"]:
        return
    names = [k for k in values if k == "loss" or k.startswith("grad_norm/")]
    bad = [k for k in names if not np.isfinite(values[k])]
    raise NonFiniteError(
        f"non-finite {', '.join(bad)} at step {step} "
        f"({', '.join(f'{k}={values[k]}' for k in bad)}); the update was not applied and the "
        "last good checkpoint is kept. Lower optim.base_lr, raise optim.warmup_steps or use "
        "model.dtype=float32 to investigate."
    )


def _progress(enabled: bool, initial: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _eval_datasets(config, data: sources.TrainingData) -> list[tuple[str, str, str]]:
    """Periodic kNN's datasets (`config.eval_datasets`), said on the console; [] when off."""
    if not config.eval.every:
        return []
    training = config_lib.training_datasets(config, builtin=(data.data_dir, data.name))
    chosen = config_lib.eval_datasets(config, training)
    skipped = [t[0] for t in training if t not in chosen] if not config.eval.data else []
    say(
        f"eval: kNN on {config.eval.label!r} every {config.eval.every} steps on "
        + ", ".join(f"{data_dir}/{name}" for _, data_dir, name in chosen)
        + (f" (not {', '.join(skipped)}: no such label or split)" if skipped else "")
    )
    return chosen


class _Evaluator:
    """Periodic kNN (`eval/hook.py`) on each chosen dataset at one global crop size; metric
    keys get a `/<source>` suffix when there are several datasets."""

    def __init__(self, config, spec: ModelSpec, datasets: list[tuple[str, str, str]], size: int):
        from raddino_jax.eval.hook import KnnEvaluator

        self.size = size
        pre = checkpoint.Preprocessing(image_size=size, mean=config.data.mean, std=config.data.std)
        self.evaluators = {
            report_name: KnnEvaluator(
                data_dir,
                name,
                config.eval.label,
                pre,
                spec,
                train_split=config.eval.train_split,
                eval_split=config.eval.eval_split,
                max_examples=config.eval.max_examples or None,
            )
            for report_name, data_dir, name in datasets
        }

    def __call__(self, params) -> dict[str, float]:
        several = len(self.evaluators) > 1
        return {
            f"{key}/{report_name}" if several else key: value
            for report_name, evaluator in self.evaluators.items()
            for key, value in evaluator(params).items()
        }
