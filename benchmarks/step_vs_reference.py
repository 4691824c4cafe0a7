"""The whole train step on CPU: ours (jax.jit) vs the same step in PyTorch (eager), in one run.

Ours is the real compiled step on one CPU device (`raddino_jax.reference.compare.OursStep`),
theirs `raddino_jax.reference.step.ReferenceStep`; same weights, same batch (the sweep's
synthetic host batch). Per crop size (2 x G + n_local x L) each side runs in its own worker
process (`harness.Worker`: its sys time, page faults and peak RSS are its own; both are alive
together). The jax worker writes the weights, batch and `ReferenceConfig`, both run step 0 and
save their states, and the parent compares them (`compare.compare_states`) before anything is
timed; then, after `--warmup` steps each, rounds alternate ours / torch. Measure on a quiet
machine: torch's OpenMP threads wait on each other at every op.

The model: ViT-S/14 shape (`--width 384 --depth 12`, heads = width / 64), float32, a DINO head
shared with iBOT (2048 hidden, 256 bottleneck, `--K` prototypes), batch 16, as
`compare.comparable` sets it up (no drop path, LayerScale 1, no lr warmup, one device).

Run (defaults: both sizes, batch 16, 2 threads):
  PYTHONPATH=. .venv/bin/python benchmarks/step_vs_reference.py [--sizes 112x56 224x98]
      [--rounds 5] [--steps 2] [--threads 2] [--xla-flags "..."] [--env MALLOC_ARENA_MAX=2]
  smoke: ... --sizes 56x28 --depth 2 --width 64 --K 256 --steps 2 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np

LOSS_TERMS = ("loss", "dino_loss", "ibot_loss", "koleo_loss")
WEIGHTS, BATCH, CONFIG = "init_weights.npz", "batch.npz", "reference.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["112x56", "224x98"], help="GxL crop sizes")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after step 0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=0, help="0: width / 64")
    p.add_argument("--K", type=int, default=4096, help="prototypes of the shared head")
    p.add_argument("--head-hidden", type=int, default=2048)
    p.add_argument("--head-bottleneck", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-attention", default="sdpa", choices=["sdpa", "matmul"])
    p.add_argument("--torch-adamw", default="foreach", choices=["foreach", "fused"])
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the jax worker")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the jax worker (repeatable)")  # fmt: skip
    p.add_argument("--json", default="", help="also write the raw results here")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any("=" not in item for item in args.env):
        p.error("--env takes KEY=VALUE")
    for size in args.sizes:
        parse_size(size)
    return args


def parse_size(text: str) -> tuple[int, int]:
    """A "GxL" size, e.g. "224x98" -> (224, 98)."""
    try:
        global_size, local_size = (int(part) for part in text.lower().split("x"))
    except ValueError as err:
        raise SystemExit(f"size {text!r} is not GxL, e.g. 224x98") from err
    return global_size, local_size


def benchmark_config(args: argparse.Namespace, size: str):
    """`base_config()` with the compared model (module docstring), made `comparable`."""
    from raddino_jax.config import base_config
    from raddino_jax.reference.compare import comparable

    c = base_config()
    c.seed, c.total_steps = args.seed, 1000
    c.model.arch = "vit_small"
    c.model.embed_dim, c.model.depth = args.width, args.depth
    c.model.num_heads = args.heads or max(1, args.width // 64)
    c.model.head_out_dim, c.model.head_hidden_dim = args.K, args.head_hidden
    c.model.head_bottleneck_dim = args.head_bottleneck
    c.data.global_size, c.data.local_size = parse_size(size)
    c.data.n_local = args.n_local
    c.optim.freeze_last_layer_steps = 0
    return comparable(c, args.batch)


def first_step(step) -> tuple[dict, float]:
    start = time.perf_counter()
    metrics = step()
    return metrics, time.perf_counter() - start


def jax_worker(args: argparse.Namespace, folder: Path) -> None:
    """Writes the shared inputs and our step-0 state, then serves rounds."""
    import jax

    from raddino_jax.reference import compare
    from raddino_jax.reference.config import from_config

    config = benchmark_config(args, args.sizes[0])
    reference = from_config(config, args.torch_attention, args.torch_adamw)
    (folder / CONFIG).write_text(reference.to_json())
    ours = compare.OursStep(config, jax.devices()[0])
    np.savez(folder / WEIGHTS, **ours.student_weights())
    np.savez(folder / BATCH, **ours.host_batch)
    compile_s = ours.compile()
    metrics, first_s = first_step(ours)
    np.savez(folder / "ours_state.npz", **ours.named_state())
    for _ in range(args.warmup):
        ours()
    version = f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    harness.send({"version": version, "compile_s": compile_s, "first_step_s": first_s,
                  "metrics": metrics})  # fmt: skip
    harness.serve(ours)


def torch_worker(args: argparse.Namespace, folder: Path) -> None:
    """Loads the shared inputs, runs the reference's step 0 and saves it, then serves rounds."""
    torch = harness.torch_threads(args.threads)
    from raddino_jax.reference.config import ReferenceConfig
    from raddino_jax.reference.step import ReferenceStep, batch_to_torch

    cfg = ReferenceConfig.from_json((folder / CONFIG).read_text())
    with np.load(folder / WEIGHTS) as weights, np.load(folder / BATCH) as batch:
        reference, tensors = ReferenceStep(cfg, dict(weights)), batch_to_torch(dict(batch))
    metrics, first_s = first_step(lambda: reference(tensors))
    np.savez(folder / "torch_state.npz", **dict(reference.named_state()))
    for _ in range(args.warmup):
        reference(tensors)
    version = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    harness.send({"version": version, "compile_s": 0.0, "first_step_s": first_s,
                  "metrics": metrics})  # fmt: skip
    harness.serve(lambda: reference(tensors))


def run_size(args: argparse.Namespace, argv: list[str], size: str) -> dict:
    """Both workers for one size: step-0 agreement, then alternating timed rounds."""
    from raddino_jax.reference.compare import compare_states

    result = {"size": size, "load_before": os.getloadavg()[0], "ready": {}, "rounds": {}}
    with tempfile.TemporaryDirectory(prefix="step_vs_reference_") as folder:
        workers = {}
        try:
            for kind, name in (("jax", "ours"), ("torch", "torch")):
                env = dict(os.environ)
                if kind == "jax":
                    env.update(item.split("=", 1) for item in args.env)
                command = [sys.executable, __file__, *argv, "--sizes", size, "--worker", kind]
                workers[name] = harness.Worker(name, [*command, "--dir", folder], env)
                result["ready"][name] = workers[name].receive()
            with (
                np.load(Path(folder) / WEIGHTS) as initial,
                np.load(Path(folder) / "ours_state.npz") as ours,
                np.load(Path(folder) / "torch_state.npz") as theirs,
            ):
                result["agreement"] = compare_states(dict(initial), dict(ours), dict(theirs))
            for index in range(args.rounds):
                for name, worker in workers.items():
                    result["rounds"].setdefault(name, []).append(worker.round(args.steps))
                print(f"{size} round {index + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            for worker in workers.values():
                worker.close()
    result["load_after"] = os.getloadavg()[0]
    return result


def timing_row(args: argparse.Namespace, result: dict) -> list[str]:
    """crops, per side median (min) s/step and sys s / faults / peak RSS, paired ratio."""
    global_size, local_size = parse_size(result["size"])
    cells = [f"2x{global_size} + {args.n_local}x{local_size}"]
    times = {}
    for name, rounds in result["rounds"].items():
        steps = [t for r in rounds for t in r["times"]]
        times[name] = [statistics.median(r["times"]) for r in rounds]
        n = len(steps)
        cells.append(f"{statistics.median(steps):.3f} ({min(steps):.3f})")
        cells.append(
            f"{sum(r['sys_s'] for r in rounds) / n:.2f} s, "
            f"{sum(r['faults'] for r in rounds) / n / 1e6:.3f}M, "
            f"{rounds[-1]['maxrss_kib'] / 2**20:.2f} GiB"
        )
    cells.append(harness.format_paired(times["ours"], times["torch"]))
    cells.append(f"{result['ready']['ours']['compile_s']:.1f}")
    return cells


def agreement_row(args: argparse.Namespace, result: dict) -> list[str]:
    ours, theirs = (result["ready"][n]["metrics"] for n in ("ours", "torch"))
    a = result["agreement"]
    return [
        result["size"],
        *(f"{ours[t]:.6f} / {theirs[t]:.6f}" for t in LOSS_TERMS),
        f"{max(abs(ours[t] - theirs[t]) for t in LOSS_TERMS):.1e}",
        *(
            f"{a[f'{m} update rel (global)']:.1e}, {a[f'{m} update rel (worst tensor)']:.1e}"
            for m in ("student", "teacher")
        ),  # fmt: skip
        f"{a['student params rel']:.1e} / {a['teacher params rel']:.1e}",
        f"{a['key bias max abs']:.1e}",
        f"{a['centres max abs']:.1e}",
    ]


def report(args: argparse.Namespace, results: list[dict]) -> str:
    ready = results[0]["ready"]
    loads = "; ".join(
        f"{r['size']}: {r['load_before']:.2f} -> {r['load_after']:.2f}" for r in results
    )
    setup = (
        f"{ready['ours']['version']}; {ready['torch']['version']}; {args.threads} threads each; "
        f"float32 ViT {args.width} wide x {args.depth} blocks, batch {args.batch}, K={args.K} "
        f"shared head; torch attention {args.torch_attention}, AdamW {args.torch_adamw}"
        + (f"; jax env {' '.join(args.env)}" if args.env else "")
        + f". {args.rounds} alternating rounds x {args.steps} steps; load average {loads}."
    )
    timing = harness.markdown_table(
        ["crops", "ours median (min) s/step", "ours sys s/step, faults/step, peak RSS",
         "torch median (min) s/step", "torch sys s/step, faults/step, peak RSS",
         "ours/torch paired median (range)", "ours compile s"],
        [timing_row(args, r) for r in results],
    )  # fmt: skip
    agreement = harness.markdown_table(
        ["crops", *(f"{t} ours / torch" for t in LOSS_TERMS), "losses max abs diff",
         "student update rel (global, worst tensor)", "teacher update rel (global, worst)",
         "student / teacher params rel", "qkv key bias max abs", "centres max abs"],
        [agreement_row(args, r) for r in results],
    )  # fmt: skip
    header = harness.machine_header(["benchmarks/step_vs_reference.py", *sys.argv[1:]])
    return "\n\n".join(
        [header, setup, timing, "Step-0 agreement (same weights and batch):", agreement]
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        harness.pin_threads(args.threads, args.xla_flags if args.worker == "jax" else "")
        (jax_worker if args.worker == "jax" else torch_worker)(args, Path(args.dir))
        return 0
    if args.threads > len(os.sched_getaffinity(0)):
        raise SystemExit(f"--threads {args.threads} > {len(os.sched_getaffinity(0))} cores")
    results = [run_size(args, argv, size) for size in args.sizes]
    print(report(args, results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
