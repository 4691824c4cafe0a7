"""Host stalls: the training loop's time per step against the bare compiled step (issue 14).

Two timings of the same config in one process:
- loop: `raddino_jax.train.loop.train` itself (Grain pipeline with its augmentations on the
  host, `data.transfer_dtype` crops, `data.device_prefetch` batches ahead, one-step-late
  metrics, logging every step) on the built-in samples; the per-step times are the
  `step_time_s` it logs in WORKDIR/metrics.jsonl (wall time between consecutive steps).
- bare: the step the loop compiles, built by the sweep's `measure.build_point` (the loop's
  builders, mesh, state and shardings) and called on one fixed batch in the loop's layout
  (`measure.host_batch`: crops in `data.transfer_dtype`, normalised on the device),
  `jax.block_until_ready` after every call.
The first `--skip` steps of each (compile, warm-up) are left out; the table gives min and
median seconds per step and loop / bare. Goal: the loop's median within 5% of the bare step's.
On CPU the pipeline's host work shares the cores with the step, so this also measures how
much the augmentations cost next to the step, not only the loop's waits.

Run on a quiet machine (`uptime`); ~3-5 minutes on 2 cores with the defaults (samples built
once under --data-root, two compiles, 2 x (skip + steps) steps of configs/demo.py, ~1.5 s each):
  PYTHONPATH=. .venv/bin/python benchmarks/loop_overhead.py
  ... --steps 30 --device-prefetch 0 --transfer-dtype float32   (the previous loop's settings)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import harness

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo", help="configs/<name>.py")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each")
    p.add_argument("--skip", type=int, default=3, help="untimed first steps of each")
    p.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
    p.add_argument("--device-prefetch", type=int, default=-1, help="-1: the config's")
    p.add_argument("--transfer-dtype", default="", help="uint8, uint16, float32 ('': config's)")
    p.add_argument("--phantoms", type=int, default=96, help="built-in samples to build")
    p.add_argument("--data-root", default="", help="where the samples are built (reused)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set model.depth=2 (repeatable)")  # fmt: skip
    return p.parse_args(argv)


def bench_config(args: argparse.Namespace, data_dir: str, name: str):
    """The named config on the prebuilt samples: no eval, a metrics line every step, only the
    final checkpoint, and the requested batch / prefetch / transfer overrides."""
    config = harness.named_config(args.config, args.set)
    config.data.dir, config.data.name = data_dir, name
    config.data.builtin = False  # the samples prebuilt above, read as a dataset
    config.total_steps = args.skip + args.steps
    config.log_every = 1
    config.checkpoint_every = 10**9  # the last step still saves (outside the timed steps)
    config.eval.every = 0
    config.optim.warmup_steps = min(config.optim.warmup_steps, config.total_steps)
    config.optim.freeze_last_layer_steps = min(
        config.optim.freeze_last_layer_steps, config.total_steps
    )
    if args.batch:
        config.batch_size = args.batch
    if args.device_prefetch >= 0:
        config.data.device_prefetch = args.device_prefetch
    if args.transfer_dtype:
        config.data.transfer_dtype = args.transfer_dtype
    return config


def loop_step_times(config, workdir: str) -> list[float]:
    """`step_time_s` of every step the real loop logged (log_every = 1), in step order."""
    from raddino_jax.train import loop
    from raddino_jax.train.metrics import read_metrics

    loop.train(config, workdir)
    records = sorted(
        (r for r in read_metrics(workdir) if "step_time_s" in r), key=lambda r: r["step"]
    )
    return [r["step_time_s"] for r in records]


def bare_step_times(config, *, steps: int, warmup: int) -> list[float]:
    """Seconds of `steps` calls of the loop's step after `warmup` untimed ones, each waited for
    (`jax.block_until_ready`).

    The step is the sweep's (`raddino_jax.sweep.measure`): `build_point` makes the mesh, spec,
    objective, schedules, optimizer, state shardings and jitted step with the loop's builders,
    `compile_step` compiles it ahead of time for the loop's batch layout, and `time_steps`
    runs it on a fresh state and one fixed synthetic batch (`host_batch`: crops in
    `data.transfer_dtype`, normalised on the device as in the loop; masks from the
    pipeline's own sampler) with replicated step keys made before timing.
    """
    import jax

    from raddino_jax.sweep import measure
    from raddino_jax.train.build import build

    point = build(config, jax.devices())
    compiled, _ = measure.compile_step(point, config.seed)
    return measure.time_steps(point, compiled, steps=steps, warmup=warmup, seed=config.seed)


def table(loop_times: list[float], bare_times: list[float]) -> str:
    """min / median s/step of both and the loop / bare ratios."""
    median = statistics.median
    rows = [[name, len(t), f"{min(t):.3f}", f"{median(t):.3f}"]
            for name, t in (("loop", loop_times), ("bare step", bare_times))]  # fmt: skip
    rows.append(["loop / bare", "", f"{min(loop_times) / min(bare_times):.3f}",
                 f"{median(loop_times) / median(bare_times):.3f}"])  # fmt: skip
    return harness.markdown_table(["", "steps", "min s/step", "median s/step"], rows)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.steps < 1 or args.skip < 1:
        raise SystemExit("--steps and --skip must be >= 1 (the first step compiles)")
    import jax  # noqa: F401  (its devices go into the header)

    from data_prep.samples.builtin import builtin_dataset

    machine = harness.machine_header()  # the load average before this benchmark adds its own
    with tempfile.TemporaryDirectory(prefix="loop_overhead_") as scratch:
        root = args.data_root or os.path.join(scratch, "data")
        probe = harness.named_config(args.config)
        data_dir, name = builtin_dataset(root, args.phantoms, probe.data.builtin_size)
        config = bench_config(args, data_dir, name)
        loop_times = loop_step_times(config, os.path.join(scratch, "run"))[args.skip :]
        bare_times = bare_step_times(config, steps=args.steps, warmup=args.skip)
    # The summary last, after the loop's own console output.
    print(machine)
    print(
        f"config: configs/{args.config}.py, batch {config.batch_size}, "
        f"{config.data.global_size}/{config.data.local_size} px x{2 + config.data.n_local} "
        f"crops, transfer {config.data.transfer_dtype}, device_prefetch "
        f"{config.data.device_prefetch}, num_workers {config.data.num_workers}, "
        f"{args.skip} untimed + {args.steps} timed steps each"
    )
    print(table(loop_times, bare_times))
    ratio = statistics.median(loop_times) / statistics.median(bare_times)
    print(f"loop / bare (median): {ratio:.3f} (goal <= 1.05)")
    return {"loop_median_s": statistics.median(loop_times), "ratio": ratio}


if __name__ == "__main__":
    main()
