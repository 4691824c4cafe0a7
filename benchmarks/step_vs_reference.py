"""The whole train step: ours (jax.jit) vs the same step in PyTorch (`raddino_jax.reference`).

Ours is the real compiled step on one device (`reference.compare.OursStep`), theirs
`reference.step.ReferenceStep`; same weights, same batch (the sweep's synthetic host batch).
Per crop size (2 x G + n_local x L) each side runs in its own worker process (`harness.Worker`:
its sys time, page faults and peak RSS are its own). The jax worker writes the weights, batch
and `ReferenceConfig`; both run step 0 and save their states, and the parent checks the step-0
losses (1e-4 relative in float32, 2e-2 in bfloat16) and compares the states
(`compare.compare_states`) before anything is timed; then, after `--warmup` steps each, rounds
alternate ours / torch. Measure on a quiet machine: torch's OpenMP threads wait on each other.

The model: ViT-S/14 shape (`--width 384 --depth 12`, heads = width / 64), float32, a DINO head
shared with iBOT (2048 hidden, 256 bottleneck, `--K` prototypes), batch 16, as
`compare.comparable` sets it up (no drop path, LayerScale 1, no lr warmup, one device).

On a GPU (`--device gpu`; issue 19's peer) the workers run one at a time (each gets the whole
card), ours in `--dtype bfloat16`, torch as DINOv2's trainer runs there: `torch.autocast`
bfloat16 over float32 weights, SDPA attention, fused AdamW, eager and/or `torch.compile` on each
block and the head (`--torch-modes eager,compile`). Peak device memory is reported per worker.

Run (defaults: both sizes, batch 16, 2 threads):
  PYTHONPATH=. .venv/bin/python benchmarks/step_vs_reference.py [--sizes 112x56 224x98]
      [--rounds 5] [--steps 2] [--threads 2] [--xla-flags "..."]
  smoke: ... --sizes 56x28 --depth 2 --width 64 --K 256 --steps 2 --rounds 1
  GPU: the [P] rows of benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--K", type=int, default=4096, help="prototypes of the shared head")
    p.add_argument("--prototype-chunk", type=int, default=0,
                   help="ours: ssl.prototype_chunk (configs/vitb14.py uses 8192)")  # fmt: skip
    p.add_argument("--torch-adamw", default="foreach", choices=["foreach", "fused"])
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the jax worker")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="ours: model.dtype; torch: autocast dtype (float32: none)")  # fmt: skip
    p.add_argument("--torch-modes", default="eager", help="eager,compile: one torch worker each")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--mode", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for size in args.sizes:
        crop_sizes(size)
    args.torch_modes = args.torch_modes.split(",")
    if set(args.torch_modes) - {"eager", "compile"}:
        p.error("--torch-modes takes eager and/or compile")
    return args


def crop_sizes(text: str) -> tuple[int, int]:
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
    c.total_steps = 1000
    c.model.arch = "vit_small"
    c.model.embed_dim, c.model.depth = args.width, args.depth
    c.model.num_heads = max(1, args.width // 64)
    c.model.head_out_dim, c.model.head_hidden_dim, c.model.head_bottleneck_dim = args.K, 2048, 256
    c.data.global_size, c.data.local_size = crop_sizes(size)
    c.data.n_local = args.n_local
    c.optim.freeze_last_layer_steps = 0
    c.ssl.prototype_chunk = args.prototype_chunk
    return comparable(c, args.batch)


def peak_bytes(worker: str) -> int:
    """Peak device memory of this worker so far (0 on CPU)."""
    if worker == "jax":
        import jax

        return int((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0))
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0


def serve_worker(args, folder: Path, name: str, step, named_state, **info) -> None:
    """Step 0 (timed; its state saved for the parent's comparison), `--warmup` untimed steps,
    the ready message, then the rounds the parent asks for."""
    start = time.perf_counter()
    metrics = step()  # in "compile" mode torch compiles here
    first_s = time.perf_counter() - start
    np.savez(folder / f"{name}_state.npz", **dict(named_state()))
    for _ in range(args.warmup):
        step()
    harness.send({"first_step_s": first_s, "metrics": metrics,
                  "peak_bytes": peak_bytes(args.worker), **info})  # fmt: skip
    harness.serve(step)


def jax_worker(args: argparse.Namespace, folder: Path) -> None:
    """Writes the shared inputs, then serves our step."""
    import jax

    from raddino_jax.reference import compare
    from raddino_jax.reference.config import from_config

    config = benchmark_config(args, args.sizes[0])
    (folder / CONFIG).write_text(from_config(config, args.torch_adamw).to_json())  # float32
    config.model.dtype = args.dtype
    ours = compare.OursStep(config, jax.devices()[0])
    np.savez(folder / WEIGHTS, **ours.student_weights())
    np.savez(folder / BATCH, **ours.host_batch)
    compile_s = ours.compile()
    version = f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    serve_worker(args, folder, "ours", ours, ours.named_state, version=version,
                 compile_s=compile_s)  # fmt: skip


def torch_worker(args: argparse.Namespace, folder: Path) -> None:
    """Loads the shared inputs, then serves the reference's step."""
    torch = harness.torch_threads(args.threads)
    from raddino_jax.reference.config import ReferenceConfig
    from raddino_jax.reference.step import ReferenceStep, batch_to_torch

    cfg = ReferenceConfig.from_json((folder / CONFIG).read_text())
    device = "cuda" if args.device == "gpu" else "cpu"
    autocast = "" if args.dtype == "float32" else args.dtype
    with np.load(folder / WEIGHTS) as weights, np.load(folder / BATCH) as batch:
        reference = ReferenceStep(
            cfg, dict(weights), device=device, autocast=autocast, compile=args.mode == "compile"
        )
        tensors = batch_to_torch(dict(batch), device)
    version = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    serve_worker(args, folder, f"torch {args.mode}", lambda: reference(tensors),
                 reference.named_state, version=version, compile_s=0.0)  # fmt: skip


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as arrays:
        return dict(arrays)


def run_size(args: argparse.Namespace, argv: list[str], size: str) -> dict:
    """The workers for one size: step-0 agreement, then timed rounds (alternating on a CPU,
    where all are alive together; one worker at a time on a GPU)."""
    from raddino_jax.reference.compare import compare_states

    result = {"size": size, "load_before": os.getloadavg()[0], "ready": {}, "rounds": {},
              "agreement": {}}  # fmt: skip
    loss_rtol = 1e-4 if args.dtype == "float32" else 2e-2
    kinds = [("jax", "ours", "eager")] + [("torch", f"torch {m}", m) for m in args.torch_modes]
    sequential = args.device == "gpu"
    with tempfile.TemporaryDirectory(prefix="step_vs_reference_") as folder:
        workers = {}

        def start(kind: str, name: str, mode: str) -> None:
            command = [sys.executable, __file__, *argv, "--sizes", size, "--worker", kind,
                       "--mode", mode, "--dir", folder]  # fmt: skip
            workers[name] = harness.Worker(name, command)
            result["ready"][name] = workers[name].receive()
            if kind == "jax":
                return
            ours, theirs = (result["ready"][n]["metrics"] for n in ("ours", name))
            worst = max(abs(ours[t] - theirs[t]) / max(abs(ours[t]), 1e-12) for t in LOSS_TERMS)
            if worst > loss_rtol:  # a peer that computes something else is not timed
                raise SystemExit(
                    f"{name}: step-0 losses differ from ours by {worst:.2e} relative (> "
                    f"{loss_rtol}): " + ", ".join(f"{t} {ours[t]:.5f}/{theirs[t]:.5f}"
                                                  for t in LOSS_TERMS)
                )  # fmt: skip
            files = (WEIGHTS, "ours_state.npz", f"{name}_state.npz")
            result["agreement"][name] = compare_states(*(load(Path(folder) / f) for f in files))

        def rounds(names: list[str]) -> None:
            for index in range(args.rounds):
                for name in names:
                    result["rounds"].setdefault(name, []).append(workers[name].round(args.steps))
                print(f"{size} {', '.join(names)} round {index + 1}/{args.rounds}",
                      file=sys.stderr)  # fmt: skip

        try:
            for kind, name, mode in kinds:
                start(kind, name, mode)
                if sequential:
                    rounds([name])
                    workers.pop(name).close()
            if not sequential:
                rounds(list(workers))
        finally:
            for worker in workers.values():
                worker.close()
    result["load_after"] = os.getloadavg()[0]
    return result


def timing_row(args: argparse.Namespace, result: dict) -> list[str]:
    """crops, per worker median (min) s/step and its resources, ours / each torch mode."""
    global_size, local_size = crop_sizes(result["size"])
    cells = [f"2x{global_size} + {args.n_local}x{local_size}"]
    per_round = {}
    for name, rounds in result["rounds"].items():
        steps = [t for r in rounds for t in r["times"]]
        per_round[name] = [statistics.median(r["times"]) for r in rounds]
        n, peak = len(steps), result["ready"][name]["peak_bytes"]
        cells.append(f"{statistics.median(steps):.3f} ({min(steps):.3f})")
        cells.append(
            f"{peak / 2**30:.1f} GiB" if args.device == "gpu" else
            f"{sum(r['sys_s'] for r in rounds) / n:.2f} s, "
            f"{sum(r['faults'] for r in rounds) / n / 1e6:.3f}M, "
            f"{rounds[-1]['maxrss_kib'] / 2**20:.2f} GiB"
        )  # fmt: skip
    cells += [harness.format_paired(per_round["ours"], t) for n, t in per_round.items()
              if n != "ours"]  # fmt: skip
    return [*cells, f"{result['ready']['ours']['compile_s']:.1f}"]


def agreement_row(result: dict, name: str) -> list[str]:
    ours, theirs = (result["ready"][n]["metrics"] for n in ("ours", name))
    a = result["agreement"][name]
    return [
        f"{result['size']} {name}",
        *(f"{ours[t]:.6f} / {theirs[t]:.6f}" for t in LOSS_TERMS),
        f"{max(abs(ours[t] - theirs[t]) for t in LOSS_TERMS):.1e}",
        *(f"{a[f'{m} update rel (global)']:.1e}, {a[f'{m} update rel (worst tensor)']:.1e}"
          for m in ("student", "teacher")),
        f"{a['student params rel']:.1e} / {a['teacher params rel']:.1e}",
        f"{a['key bias max abs']:.1e}",
        f"{a['centres max abs']:.1e}",
    ]  # fmt: skip


def report(args: argparse.Namespace, results: list[dict]) -> str:
    names = list(results[0]["ready"])
    loads = "; ".join(f"{r['size']}: {r['load_before']:.2f} -> {r['load_after']:.2f}"
                      for r in results)  # fmt: skip
    versions = "; ".join(results[0]["ready"][n]["version"] for n in names[:2])
    setup = (
        f"{versions}; {args.device}, {args.threads} threads each; {args.dtype} ViT {args.width} "
        f"wide x {args.depth} blocks, batch {args.batch}, K={args.K} shared head; torch "
        f"attention sdpa, AdamW {args.torch_adamw}, modes {', '.join(args.torch_modes)}. "
        f"{args.rounds} rounds x {args.steps} steps"
        + (" (one worker at a time)" if args.device == "gpu" else " (alternating)")
        + f"; load average {loads}."
    )
    resources = "peak device memory" if args.device == "gpu" else "sys s/step, faults, peak RSS"
    header = ["crops"]
    for name in names:
        header += [f"{name} median (min) s/step", f"{name} {resources}"]
    header += [f"ours / {name} paired median (range)" for name in names[1:]]
    timing = harness.markdown_table(
        [*header, "ours compile s"], [timing_row(args, r) for r in results]
    )
    agreement = harness.markdown_table(
        ["crops, peer", *(f"{t} ours / torch" for t in LOSS_TERMS), "losses max abs diff",
         "student update rel (global, worst tensor)", "teacher update rel (global, worst)",
         "student / teacher params rel", "qkv key bias max abs", "centres max abs"],
        [agreement_row(r, n) for r in results for n in names[1:]],
    )  # fmt: skip
    machine = harness.machine_header(["benchmarks/step_vs_reference.py", *sys.argv[1:]])
    return "\n\n".join(
        [machine, setup, timing, "Step-0 agreement (same weights and batch):", agreement]
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
    print(report(args, [run_size(args, argv, size) for size in args.sizes]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
