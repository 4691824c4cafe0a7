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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo", help="configs/<name>.py")
    p.add_argument("--batch", type=int, default=8, help="global batch (0: the config's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE for both variants")
    p.add_argument("--compare", action="append", default=[], help="KEY=VALUE for 'after'")
    p.add_argument("--steps", type=int, default=3, help="timed and traced steps per variant")
    p.add_argument("--trace-dir", default="", help="keep the traces here (default: temporary)")
    return p.parse_args(argv)


def variant_config(args: argparse.Namespace, extra: list[str]):
    """The named config for one device: batch, dtype, mask/KoLeo groups within the batch."""
    config = harness.named_config(args.config)
    if args.batch:
        config.batch_size = args.batch
    config.model.dtype = args.dtype
    batch = config.batch_size
    config.data.mask_group_size = min(config.data.mask_group_size or batch, batch)
    config.ssl.koleo_group_size = min(config.ssl.koleo_group_size or batch, batch)
    config.eval.every = 0
    overrides = [*args.set, *extra]
    config.update_from_flattened_dict(
        {k: harness.parse_value(v) for k, _, v in (o.partition("=") for o in overrides)}
    )
    return config


def prepare(config, devices):
    """(point, compiled step, one-step runner) for a config on a 1x1x1 mesh."""
    from raddino_jax import sweep
    from raddino_jax.train.build import build

    point = build(
        sweep.point_config(config, (1, 1, 1), config.batch_size, config.model.remat), devices
    )
    compiled, _ = sweep.compile_step(point)
    return point, compiled, harness.step_call(point, compiled)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import jax

    from raddino_jax.sweep import memory_fields, profile

    devices = jax.devices()[:1]
    variants = {"before": variant_config(args, []), "after": variant_config(args, args.compare)}
    prepared = {name: prepare(config, devices) for name, config in variants.items()}
    times = harness.interleaved(
        {name: run for name, (_, _, run) in prepared.items()}, args.steps, warmup=1
    )
    tables = {}
    root = args.trace_dir or tempfile.mkdtemp(prefix="step_profile_")
    for name, (_, compiled, run) in prepared.items():
        events = profile.trace_steps(run, args.steps, f"{root}/{name}")
        text = compiled.as_text()
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
    result = {"tables": tables}
    for name, (_, compiled, _) in prepared.items():
        memory = memory_fields(compiled)
        result[f"{name}_temp_bytes"] = memory["temp_bytes"]
        result[f"{name}_step_s"] = statistics.median(times[name])
        peak = memory["peak_bytes_per_device"]
        print(
            f"{name}: median step {result[f'{name}_step_s'] * 1e3:.1f} ms over {args.steps}; "
            f"XLA temp {memory['temp_bytes'] and memory['temp_bytes'] / 2**20:.1f} MiB, "
            f"peak {peak and peak / 2**20:.1f} MiB per device"
        )
    print(f"after / before: step time {result['after_step_s'] / result['before_step_s']:.3f}")
    return result


if __name__ == "__main__":
    main()
