"""How close the full SSL train step gets to this machine's matmul speed (one device).

Achieved FLOP/s of the step = analytic FLOPs (`flops.ssl_step_flops`, matmuls only, as the
sweep and the loop count them) / median step time. Reference FLOP/s = a jitted float32 matmul
(default 2048 x 2048 x 2048: 2 * 2048^3 FLOP) / its median time, measured in the same process
with rounds interleaved (matmul, step, matmul, ...) so both see the same machine load.
Prints both and their ratio (goal on CPU: >= 0.5), the analytic split (student backbone,
teacher backbone, heads) and XLA's own flop count of the compiled step over the analytic one.

The step is the real one (`harness.one_device_step`) on a synthetic batch (random crops, masks
from the real iBOT sampler) on a 1x1x1 mesh: one XLA CPU device, so the step's ops and the
reference matmul use the same thread pool. A profile of the step: benchmarks/step_profile.py.

Run (float32: CPUs have no fast bfloat16 matmuls in XLA):
  PYTHONPATH=. .venv/bin/python benchmarks/step_efficiency.py --config vits14 --batch 8
  PYTHONPATH=. .venv/bin/python benchmarks/step_efficiency.py --config demo
"""

from __future__ import annotations

import argparse
import statistics

import harness


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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.config_args(p, config="vits14", batch=8)
    p.add_argument("--remat", action="store_true", help="model.remat full (default none)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--matmul-size", type=int, default=2048)
    args = p.parse_args(argv)
    from raddino_jax import flops, sweep

    config = harness.one_device_config(args, [f"model.remat={'full' if args.remat else 'none'}"])
    step, compile_s = harness.one_device_step(config)
    run = step.point
    step_flops = sweep.step_flops(run)
    parts = flops.ssl_step_flops(
        run.spec,
        global_size=config.data.global_size,
        local_size=config.data.local_size,
        n_local=config.data.n_local,
        batch=config.batch_size,
        n_masked_tokens=run.mask_spec.upper_bound * run.mask_spec.n_groups,
        separate_ibot_head=run.spec.ibot_head is not None,
        remat=args.remat,
    )
    xla = sweep.xla_flops(step.step_fn)
    times = harness.interleaved(
        {"matmul": matmul_call(args.matmul_size), "step": step}, args.rounds, args.warmup
    )
    gflops = {}  # (median, best) GFLOP/s of each
    for name, flop in (("matmul", 2.0 * args.matmul_size**3), ("step", step_flops)):
        gflops[name] = [flop / t / 1e9 for t in (statistics.median(times[name]), min(times[name]))]
    ratio = [s / m for s, m in zip(gflops["step"], gflops["matmul"], strict=True)]

    print(harness.machine_header())
    print(
        f"step: {args.config} batch {config.batch_size}, {config.data.global_size}/"
        f"{config.data.local_size} px x(2+{config.data.n_local}), {args.dtype}"
        f"{', remat' if args.remat else ''}; compile {compile_s:.1f} s"
    )
    split = ("student_backbone", "teacher_backbone", "heads", "total")
    print(
        "analytic GFLOP per step: "
        + ", ".join(f"{k} {parts[k] / 1e9:.1f}" for k in split)
        + (f"; XLA cost_analysis / analytic {xla / step_flops:.3f}" if xla else "")
    )
    print(
        f"matmul {args.matmul_size}^3 f32: median {gflops['matmul'][0]:.1f} GFLOP/s "
        f"(best {gflops['matmul'][1]:.1f}) over {args.rounds} rounds"
    )
    step_s = statistics.median(times["step"])
    print(
        f"SSL step: median {step_s * 1e3:.0f} ms = {gflops['step'][0]:.1f} GFLOP/s "
        f"(best {gflops['step'][1]:.1f})"
    )
    print(f"ratio step / matmul: median {ratio[0]:.3f}, best-vs-best {ratio[1]:.3f}  (goal >= 0.5)")
    return {"step_time_median_s": step_s, "ratio_median": ratio[0], "ratio_best": ratio[1]}


if __name__ == "__main__":
    main()
