"""The real train step profiled by kind of work, beside the same step with config overrides.

Both variants are compiled for one device, timed with their rounds interleaved (so both see the
same machine load), traced with `jax.profiler`, and the traces summed by kind
(`raddino_jax.sweep.profile`: matmuls, attention forward/backward, elementwise, heads + losses,
optimizer + EMA, copies/transposes). Prints one markdown table (ms per step, share, after/before
ratio), XLA's memory analysis of each compiled step and the median step times with their ratio.

  PYTHONPATH=. .venv/bin/python benchmarks/step_profile.py --config demo --batch 8 \
      --compare ssl.prototype_chunk=128
  # on a GPU (bf16, the RAD-DINO setting; see gpu_check.sh):
  python3 benchmarks/step_profile.py --config vitb14 --batch 40 --dtype bfloat16 \
      --set ssl.prototype_chunk=0 --compare ssl.prototype_chunk=8192
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import harness


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.config_args(p, config="demo", batch=8)  # --set: both variants
    p.add_argument("--compare", action="append", default=[], help="KEY=VALUE for 'after'")
    p.add_argument("--steps", type=int, default=3, help="timed and traced steps per variant")
    p.add_argument("--trace-dir", default="", help="keep the traces here (default: temporary)")
    args = p.parse_args(argv)
    from raddino_jax.sweep import memory_fields, profile

    variants = {
        "before": harness.one_device_config(args),
        "after": harness.one_device_config(args, args.compare),
    }
    steps = {name: harness.one_device_step(config)[0] for name, config in variants.items()}
    times = harness.interleaved(steps, args.steps, warmup=1)
    root = args.trace_dir or tempfile.mkdtemp(prefix="step_profile_")
    tables = {}
    for name, step in steps.items():
        events = profile.trace_steps(step, args.steps, f"{root}/{name}")
        text = step.step_fn.as_text()
        tables[name] = profile.summarise(
            events, profile.parse_hlo_ops(text), args.steps, module=profile.module_name(text)
        )

    print(harness.machine_header())
    config = variants["before"]
    print(
        f"step: {args.config} batch {config.batch_size}, {config.data.global_size}/"
        f"{config.data.local_size} px x(2+{config.data.n_local}), {args.dtype}; "
        f"after = before + {args.compare or 'nothing'}"
    )
    print(profile.markdown_table(tables))
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, step in steps.items():
        memory = memory_fields(step.step_fn)
        temp, peak = memory["temp_bytes"], memory["peak_bytes_per_device"]
        print(
            f"{name}: median step {median[name] * 1e3:.1f} ms over {args.steps}; "
            f"XLA temp {temp and temp / 2**20:.1f} MiB, peak {peak and peak / 2**20:.1f} MiB "
            "per device"
        )
    print(f"after / before: step time {median['after'] / median['before']:.3f}")
    return {"tables": tables, "step_s": median}


if __name__ == "__main__":
    main()
