"""Host stalls: the training loop's time per step against the bare compiled step (issue 14).

Two timings of the same config in one process:
- loop: `raddino_jax.train.loop.train` itself (Grain pipeline with its augmentations on the
  host, `data.transfer_dtype` crops, `data.device_prefetch` batches ahead, one-step-late
  metrics, logging every step) on the built-in samples; the per-step times are the
  `step_time_s` it logs in WORKDIR/metrics.jsonl (wall time between consecutive steps).
- bare: the step the loop compiles (`train.build.build`: the loop's mesh, state and
  shardings), compiled ahead of time and called on one fixed batch in the loop's layout
  (`sweep.measure.host_batch`: crops in `data.transfer_dtype`, normalised on the device),
  `jax.block_until_ready` after every call.
The first `--skip` steps of each (compile, warm-up) are left out; the table gives min and
median seconds per step and loop / bare. Goal: the loop's median within 5% of the bare step's.
On CPU the pipeline's host work shares the cores with the step, so this also measures how
much the augmentations cost next to the step, not only the loop's waits.

Run on a quiet machine (`uptime`); ~3-5 minutes on 2 cores with the defaults (samples built
once under --data-root, two compiles, 2 x (skip + steps) steps of configs/demo.py, ~1.5 s each):
  PYTHONPATH=. .venv/bin/python benchmarks/loop_overhead.py
  ... --steps 30 --set data.device_prefetch=0 --set data.transfer_dtype=float32
      (the previous loop's settings)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import harness

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo", help="configs/<name>.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set batch_size=16 (repeatable)")  # fmt: skip
    p.add_argument("--steps", type=int, default=20, help="timed steps of each")
    p.add_argument("--skip", type=int, default=3, help="untimed first steps of each")
    p.add_argument("--phantoms", type=int, default=96, help="built-in samples to build")
    p.add_argument("--data-root", default="", help="where the samples are built (reused)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.skip < 1:
        raise SystemExit("--steps and --skip must be >= 1 (the first step compiles)")
    import jax

    from data_prep.samples.builtin import builtin_dataset
    from raddino_jax.sweep import measure
    from raddino_jax.train import loop
    from raddino_jax.train.build import build
    from raddino_jax.train.metrics import read_metrics

    machine = harness.machine_header()  # the load average before this benchmark adds its own
    config = harness.named_config(args.config, args.set)
    # No eval, a metrics line every step, only the final checkpoint (after the timed steps).
    config.total_steps = args.skip + args.steps
    config.log_every, config.checkpoint_every, config.eval.every = 1, 10**9, 0
    config.optim.warmup_steps = min(config.optim.warmup_steps, config.total_steps)
    freeze = config.optim.freeze_last_layer_steps
    config.optim.freeze_last_layer_steps = min(freeze, config.total_steps)
    with tempfile.TemporaryDirectory(prefix="loop_overhead_") as scratch:
        root = args.data_root or os.path.join(scratch, "data")
        data_dir, name = builtin_dataset(root, args.phantoms, config.data.builtin_size)
        config.data.dir, config.data.name = data_dir, name
        config.data.builtin = False  # the samples prebuilt above, read as a dataset
        workdir = os.path.join(scratch, "run")
        loop.train(config, workdir)
        logged = sorted((r for r in read_metrics(workdir) if "step_time_s" in r),
                        key=lambda r: r["step"])  # fmt: skip
        loop_times = [r["step_time_s"] for r in logged][args.skip :]
        run = build(config, jax.devices())
        compiled, _ = measure.compile_step(run, config.seed)
        bare_times = measure.time_steps(
            run, compiled, steps=args.steps, warmup=args.skip, seed=config.seed
        )
    # The summary last, after the loop's own console output.
    print(machine)
    print(
        f"config: configs/{args.config}.py, batch {config.batch_size}, "
        f"{config.data.global_size}/{config.data.local_size} px x{2 + config.data.n_local} "
        f"crops, transfer {config.data.transfer_dtype}, device_prefetch "
        f"{config.data.device_prefetch}, num_workers {config.data.num_workers}, "
        f"{args.skip} untimed + {args.steps} timed steps each"
    )
    median = statistics.median
    rows = [[name, len(t), f"{min(t):.3f}", f"{median(t):.3f}"]
            for name, t in (("loop", loop_times), ("bare step", bare_times))]  # fmt: skip
    rows.append(["loop / bare", "", f"{min(loop_times) / min(bare_times):.3f}",
                 f"{median(loop_times) / median(bare_times):.3f}"])  # fmt: skip
    print(harness.markdown_table(["", "steps", "min s/step", "median s/step"], rows))
    ratio = median(loop_times) / median(bare_times)
    print(f"loop / bare (median): {ratio:.3f} (goal <= 1.05)")
    return {"loop_median_s": median(loop_times), "ratio": ratio}


if __name__ == "__main__":
    main()
