"""The train step's linear-layer matmuls on CPU: XLA (jax.jit) vs PyTorch, shape by shape.

Why: the whole CPU step (`benchmarks/step_vs_reference.py`) is slower than PyTorch's; this
separates the matmuls (the bulk of the FLOPs) from everything else. For each linear layer of
one ViT block (qkv, proj, fc1, fc2) and each token count of the step (global crops, local
crops), it times the forward product X W, the input gradient G W^T and the weight gradient
X^T G in float32, on both frameworks with the same n cores (affinity set before import, as in
`harness.pin_threads`), and prints GFLOP/s per shape plus the matmul seconds per train step
each framework's rates imply (student forward + both gradients, teacher forward, x depth).
The two frameworks' repetitions alternate (`harness.interleaved`); the minimum is reported.

Run: PYTHONPATH=. .venv/bin/python benchmarks/matmul_vs_torch.py [--global-size 224]
     [--local-size 98] [--batch 16] [--n-local 8] [--width 384] [--depth 12] [--reps 5]
"""

from __future__ import annotations

import argparse
import os

import harness

PATCH = 14


def tokens(size: int) -> int:
    return (size // PATCH) ** 2 + 1


def products(args: argparse.Namespace) -> list[tuple[str, int, int, int, int]]:
    """(label, M, K, N, calls per step) of every matmul kind, as [M, K] @ [K, N]."""
    d = args.width
    layers = {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}
    rows = {
        "global": args.batch * 2 * tokens(args.global_size),
        "local": args.batch * args.n_local * tokens(args.local_size),
    }
    out = []
    for crop, m in rows.items():
        teacher = 1 if crop == "global" else 0  # the teacher sees the global crops only
        for name, (i, o) in layers.items():
            out.append((f"{crop} {name} X W", m, i, o, args.depth * (1 + teacher)))
            out.append((f"{crop} {name} G W^T", m, o, i, args.depth))
            out.append((f"{crop} {name} X^T G", i, m, o, args.depth))
    return out


def best_seconds(a, b, reps: int, matmul, torch) -> dict[str, float]:
    """Least seconds of a @ b (float32 NumPy arrays) in jax (`matmul`) and in torch."""
    import jax.numpy as jnp

    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    calls = {"jax": lambda: matmul(ja, jb).block_until_ready(), "torch": lambda: ta @ tb}
    return {name: min(t) for name, t in harness.interleaved(calls, reps, warmup=1).items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (minimum reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    harness.pin_threads(args.threads)
    torch = harness.torch_threads(args.threads)
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    matmul = jax.jit(lambda a, b: a @ b)
    print(harness.machine_header())
    rows, totals = [], {"jax": 0.0, "torch": 0.0}
    for label, m, k, n, calls in products(args):
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        best = best_seconds(a, b, args.reps, matmul, torch)
        flop = 2 * m * k * n
        for name in totals:
            totals[name] += calls * best[name]
        rates = [f"{flop / best[name] / 1e9:.0f}" for name in ("jax", "torch")]
        rows.append(
            [label, f"{m} x {k} x {n}", calls, *rates, f"{best['jax'] / best['torch']:.2f}"]
        )
    header = ["product", "M x K x N", "calls/step", "jax GFLOP/s", "torch GFLOP/s",
              "jax/torch time"]  # fmt: skip
    print(harness.markdown_table(header, rows))
    print(
        f"\nmatmul seconds per train step at these rates: jax {totals['jax']:.2f} s, "
        f"torch {totals['torch']:.2f} s (jax/torch {totals['jax'] / totals['torch']:.2f})"
    )


if __name__ == "__main__":
    main()
