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
- After dispatching step N the host reads step N-1's `finite` flag (the NaN guard; all of its
  metrics only on log steps); that waits for step N-1, never for step N, so the host runs at
  most one step ahead.
- On checkpoint steps (and the last step) it waits for step N's metrics before saving, so a
  checkpoint never holds an update the NaN guard rejected; the save itself is asynchronous.
- The preemption check is an all-gather across processes when there are several; it runs
  every `config.preemption_check_every` steps and on checkpoint steps, so a SIGTERM/SIGINT is
  honoured (checkpoint saved, exit) within that many steps (`preemption_check_due`). One
  process reads its own flag every step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
from etils import epath

from raddino_jax import checkpoint, flops
from raddino_jax import config as config_lib
from raddino_jax.data import pipeline, prefetch, sources
from raddino_jax.eval.hook import PeriodicKnn, periodic_eval_datasets
from raddino_jax.models import ModelSpec
from raddino_jax.train import build as build_lib
from raddino_jax.train import stages as stages_lib
from raddino_jax.train.metrics import MetricsWriter, StepLog, progress_bar
from raddino_jax.train.preemption import Preempted, SignalFlag, preemption_check_due
from raddino_jax.train.weights import initial_params


def say(message: str) -> None:
    """Console line from process 0 (absl INFO is left to the libraries' chatter)."""
    if jax.process_index() == 0:
        print(message, flush=True)


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
    make_builtin: sources.MakeBuiltin | None = None,
) -> dict[str, float]:
    """Run (or resume) training to `config.total_steps`; returns the last logged metrics.

    `data`: the run's training data when the caller has opened it already
    (`sources.open_training_data(config, workdir)`; raddino_jax.scaling counts its images), so
    a patient subset's scan of the records runs once per run.
    `check_memory([(label, the stage's `build.Run`), ...], config, say)` runs before any data
    is built or read; the driver passes `sweep.preflight.check_training_memory` (which
    compiles each step and raises when it does not fit), tests that call `train` directly
    leave it out. `make_builtin` makes the built-in samples (data.builtin): the driver passes
    `data_prep.samples.builtin.builtin_dataset`.
    """
    workdir = epath.Path(workdir)
    devices = jax.devices()
    config_lib.validate(config, n_devices=len(devices), process_count=jax.process_count())
    run = build_lib.build(config, devices)
    mesh, spec, objective = run.mesh, run.spec, run.objective
    is_main = jax.process_index() == 0
    say(f"run: {config_lib.describe(config)}")
    say(
        f"mesh {dict(mesh.shape)} over {len(devices)} {devices[0].device_kind} device(s), "
        f"{jax.process_count()} process(es)"
    )
    stage_table = stages_lib.stage_table(config)
    # one jitted step per resolution stage (one compile each); stage 0 has the config's sizes
    stage_runs = {
        stage.index: run if stage.index == 0 else run.for_stage(stage.config)
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
    data = data or sources.open_training_data(config, workdir, make_builtin)
    data_dir, name = data.data_dir, data.name
    if config.data.builtin:
        say(f"data.builtin: training on the built-in samples at {data_dir}/{name}")
    if data.source_names:
        shares = data.records.shares
        say("mixture: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(data.source_names, shares)))
    # periodic kNN's datasets, checked now (label, splits): a run fails before its state exists
    eval_data = periodic_eval_datasets(config, data, say)

    def stage_iterator(stage: stages_lib.Stage, start_position: int | None = None):
        return iter(
            pipeline.make_dataset(
                data.records,
                seed=config.seed,
                per_process_batch=stage.batch_size // jax.process_count(),
                crop_cfg=build_lib.crop_config(stage.config),
                mask_group_size=build_lib.mask_group_size(stage.config, len(devices)),
                patch_size=spec.backbone.patch_size,
                mask_ratio_min_max=tuple(config.data.mask_ratio_min_max),
                mask_sample_probability=config.data.mask_sample_probability,
                num_workers=config.data.num_workers,
                read_threads=config.data.read_threads,
                prefetch_buffer=config.data.prefetch,
                start_position=stage.start_position if start_position is None else start_position,
                host_counts=True,
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
    counters = {}  # host counts of the steps before this run's first (records skipped, sources)
    if latest is not None:
        data_iterator = _resume_data(
            checkpointer, latest, data_iterator, stage_table, stage, stage_iterator
        )
        counters = checkpointer.restore_counters(latest)
        say(f"resumed from {checkpointer.directory} at step {latest}")
    else:
        state = run.create_state(config.seed, params=initial_params(config, spec, say))
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
    progress = progress_bar(is_main, int(state.step), config.total_steps)
    log = StepLog(config, writer, progress, peak, len(devices), stage_table, data)
    log.restore_counters(counters)
    saved_step = latest
    # Global batches ahead of the step; checkpoints hold the iterator at the first one unused.
    # The restored iterator is `stage`'s; a later stage opens its own where the stream is.
    batches = prefetch.DevicePrefetcher(
        data_iterator, stage_runs[stage.index].batch, config.data.device_prefetch
    )
    try:
        with SignalFlag() as signals:
            step = int(state.step)  # the one device read of the step count: then a host counter
            for stage_now in stage_table:
                if step >= stage_now.end_step:
                    continue
                if stage_now is not stage:
                    batches.close()
                    stage = stage_now
                    batches = prefetch.DevicePrefetcher(
                        stage_iterator(stage),
                        stage_runs[stage.index].batch,
                        config.data.device_prefetch,
                    )
                if len(stage_table) > 1:
                    say(
                        f"stage {stage.index}: steps {stage.start_step}-{stage.end_step}, "
                        f"{stage.global_size}/{stage.local_size}px, batch {stage.batch_size}"
                    )
                log.flush()
                step_fn = stage_runs[stage.index].step_fn
                if eval_data and (evaluator is None or evaluator.size != stage.global_size):
                    evaluator = PeriodicKnn(config, spec, eval_data, stage.global_size)
                log.enter(
                    stage,
                    *(
                        build_lib.step_flops(stage.config, spec, len(devices), gram_active=g)
                        for g in (False, True)
                    ),
                )
                while step < stage.end_step:
                    if profile and step == profile[0] and is_main:
                        jax.profiler.start_trace(str(workdir / "profile"))
                    batch = next(batches)
                    state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
                    log.flush()  # the previous step's metrics (finished: see the loop's top)
                    log.dispatched(step + 1, metrics, batches.last_host)
                    if profile and step + 1 == profile[1] and is_main:
                        jax.block_until_ready(metrics)
                        jax.profiler.stop_trace()
                    step += 1  # from here on, `step` steps have finished
                    checkpoint_step = (
                        step % config.checkpoint_every == 0 or step == config.total_steps
                    )
                    if checkpoint_step:
                        # finish this step's metrics first: a checkpoint never holds a bad
                        # update, and metrics.jsonl has its line if the process dies right after
                        log.flush()
                        checkpointer.save(state, batches, counters=log.counters())
                        saved_step = step
                        checkpointer.check()
                    if evaluator is not None and step % config.eval.every == 0:
                        results = evaluator(state.teacher)
                        writer.write(step, {**results, "eval_image_size": evaluator.size})
                        scores = ", ".join(f"{k}={v:.3f}" for k, v in results.items())
                        say(f"step {step} eval {scores}")
                    due = preemption_check_due(
                        step,
                        config.preemption_check_every,
                        jax.process_count(),
                        checkpoint_step,
                    )
                    signum = signals.raised() if due else None
                    if signum:
                        log.flush()
                        if saved_step != step:
                            checkpointer.save(state, batches, force=True, counters=log.counters())
                        checkpointer.wait()
                        raise Preempted(signum, step)
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
