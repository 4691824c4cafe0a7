"""How close the full SSL train step gets to this machine's matmul speed (one device).

Achieved FLOP/s of the step = analytic FLOPs (`flops.ssl_step_flops`, matmuls only, as the
sweep and the loop count them) / median step time. Reference FLOP/s = a jitted float32 matmul
(default 2048 x 2048 x 2048: 2 * 2048^3 FLOP) / its median time, measured in the same process
with rounds interleaved (matmul, step, matmul, ...) so both see the same machine load.
Prints both and their ratio (goal on CPU: >= 0.5), the analytic split (student backbone,
teacher backbone, heads) and XLA's own flop count of the compiled step over the analytic one.

The step is the real one (`train.step.compile_train_step` via `raddino_jax.sweep`) on a
synthetic batch (random crops, masks from the real iBOT sampler) on a 1x1x1 mesh: one XLA CPU
device, so the step's ops and the reference matmul use the same thread pool.

Run (float32: CPUs have no fast bfloat16 matmuls in XLA):
  PYTHONPATH=. .venv/bin/python benchmarks/step_efficiency.py --config vits14 --batch 8
  PYTHONPATH=. .venv/bin/python benchmarks/step_efficiency.py --config demo
  ... --profile /tmp/trace   (jax.profiler trace of 2 steps; open with TensorBoard/Perfetto)
"""

from __future__ import annotations

import argparse
import statistics

import harness


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="vits14", help="configs/<name>.py (demo, vits14, ...)")
    p.add_argument("--batch", type=int, default=8, help="global batch (0: the config's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--profile", default="", help="write a jax.profiler trace of 2 steps here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set model.depth=2 (repeatable)")  # fmt: skip
    return p.parse_args(argv)


def step_config(name: str, batch: int, dtype: str, remat: bool, overrides=()):
    """The named config, sized for one device: batch, dtype, remat; masks/KoLeo per batch."""
    config = harness.named_config(name, overrides)
    if batch:
        config.batch_size = batch
    config.model.dtype = dtype
    config.model.remat = "full" if remat else "none"
    config.data.mask_group_size = min(config.data.mask_group_size or batch, config.batch_size)
    config.ssl.koleo_group_size = min(config.ssl.koleo_group_size or batch, config.batch_size)
    config.eval.every = 0
    return config


def matmul_call(size: int):
    """A zero-argument call of one jitted [size, size] @ [size, size] float32 matmul (waited)."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0))
    a = jax.random.normal(keys[0], (size, size), jnp.float32)
    b = jax.random.normal(keys[1], (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return lambda: matmul(a, b).block_until_ready()


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    import jax

    from raddino_jax import flops, sweep
    from raddino_jax.train.build import build

    config = step_config(args.config, args.batch, args.dtype, args.remat, args.set)
    point = build(
        sweep.point_config(config, (1, 1, 1), config.batch_size, args.remat), jax.devices()[:1]
    )
    compiled, compile_s = sweep.compile_step(point)
    step_flops = sweep.step_flops(point)
    parts = flops.ssl_step_flops(
        point.spec,
        global_size=config.data.global_size,
        local_size=config.data.local_size,
        n_local=config.data.n_local,
        batch=config.batch_size,
        n_masked_tokens=point.mask_spec.upper_bound * point.mask_spec.n_groups,
        separate_ibot_head=point.spec.ibot_head is not None,
        remat=args.remat,
    )
    xla = sweep.xla_flops(compiled)
    run_step = harness.step_call(point, compiled)
    times = harness.interleaved(
        {"matmul": matmul_call(args.matmul_size), "step": run_step}, args.rounds, args.warmup
    )
    matmul_times, step_times = times["matmul"], times["step"]
    if args.profile:
        jax.profiler.start_trace(args.profile)
        run_step(), run_step()
        jax.profiler.stop_trace()

    matmul_flop = 2.0 * args.matmul_size**3
    result = {
        "matmul_gflops_median": matmul_flop / statistics.median(matmul_times) / 1e9,
        "matmul_gflops_best": matmul_flop / min(matmul_times) / 1e9,
        "step_gflops_median": step_flops / statistics.median(step_times) / 1e9,
        "step_gflops_best": step_flops / min(step_times) / 1e9,
        "step_time_median_s": statistics.median(step_times),
        "compile_s": compile_s,
    }
    result["ratio_median"] = result["step_gflops_median"] / result["matmul_gflops_median"]
    result["ratio_best"] = result["step_gflops_best"] / result["matmul_gflops_best"]
    print(harness.machine_header())
    print(
        f"step: {args.config} batch {config.batch_size}, {config.data.global_size}/"
        f"{config.data.local_size} px x(2+{config.data.n_local}), {args.dtype}"
        f"{', remat' if args.remat else ''}; compile {compile_s:.1f} s"
    )
    print(
        "analytic GFLOP per step: "
        + ", ".join(
            f"{k} {parts[k] / 1e9:.1f}"
            for k in ("student_backbone", "teacher_backbone", "heads", "total")
        )
        + (f"; XLA cost_analysis / analytic {xla / step_flops:.3f}" if xla else "")
    )
    print(
        f"matmul {args.matmul_size}^3 f32: median {result['matmul_gflops_median']:.1f} GFLOP/s "
        f"(best {result['matmul_gflops_best']:.1f}) over {args.rounds} rounds"
    )
    print(
        f"SSL step: median {result['step_time_median_s'] * 1e3:.0f} ms = "
        f"{result['step_gflops_median']:.1f} GFLOP/s (best {result['step_gflops_best']:.1f})"
    )
    print(
        f"ratio step / matmul: median {result['ratio_median']:.3f}, "
        f"best-vs-best {result['ratio_best']:.3f}  (goal >= 0.5)"
    )
    return result


if __name__ == "__main__":
    main()
