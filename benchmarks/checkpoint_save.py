"""The first checkpoint saves of a training run: Orbax's default replica-parallel writes against
the project's (`checkpoint.MIN_REPLICA_PARALLEL_SLICE_BYTES`: only arrays whose slice per replica
is >= 1 MiB are split over the replicas).

Orbax splits every replicated array over its replica devices on CPU and TPU, and each (shape,
device) pair costs a small compile on the first save: with data parallelism (the state
replicated on every device) that is hundreds of compiles for a ViT. Each mode runs in a fresh
process (the handler registration and the compile caches are process-wide), alternating
default / project over `--rounds`; each process saves the same state of `--config` (replicated
over `--devices` fake CPU devices, `mesh.data=-1`) `--saves` times through
`checkpoint.TrainCheckpointer` and reports the seconds of each save (until it is on disk).

  PYTHONPATH=. .venv/bin/python benchmarks/checkpoint_save.py            # vits14, 8 devices
  ... --config demo --devices 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import harness

MODES = ("orbax_default", "project")


def child(args: argparse.Namespace) -> None:
    """One process: build the state, save it `args.saves` times, print the seconds of each."""
    harness.pin_threads(args.threads, f"--xla_force_host_platform_device_count={args.devices}")
    import jax
    import orbax.checkpoint as ocp

    from raddino_jax import checkpoint
    from raddino_jax.train import build as build_lib

    if args.child == "orbax_default":  # TrainCheckpointer must not register the project's
        checkpoint.use_replica_parallel_for_large_arrays_only = lambda: None
    config = harness.named_config(args.config, ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1"])
    run = build_lib.build(config, jax.devices())
    state = run.create_state(config.seed)
    jax.block_until_ready(state)
    leaves = jax.tree.leaves(state)
    with tempfile.TemporaryDirectory() as workdir:
        saver = checkpoint.TrainCheckpointer(workdir, keep=args.saves)
        seconds = []
        for i in range(args.saves):
            start = time.perf_counter()
            saver.manager.save(
                i + 1,
                args=ocp.args.Composite(
                    **{
                        name: ocp.args.StandardSave(tree)
                        for name, tree in checkpoint._array_items(state).items()
                    }
                ),
            )
            saver.wait()
            seconds.append(time.perf_counter() - start)
        saver.close()
    size = sum(x.nbytes for x in leaves)
    print(harness.MESSAGE_PREFIX + json.dumps({"seconds": seconds, "arrays": len(leaves),
                                               "mib": size / 2**20}))  # fmt: skip


def run_child(args: argparse.Namespace, mode: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", mode]
    for key in ("config", "devices", "saves", "threads"):
        command += [f"--{key}", str(getattr(args, key))]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith(harness.MESSAGE_PREFIX)]
    if out.returncode or not lines:
        raise SystemExit(f"{mode} worker failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len(harness.MESSAGE_PREFIX) :])


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="vits14", help="configs/<name>.py")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (replicas)")
    p.add_argument("--saves", type=int, default=2, help="saves per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per mode, alternating")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return {}
    first = {mode: [] for mode in MODES}
    later = {mode: [] for mode in MODES}
    info = {}
    for _ in range(args.rounds):
        for mode in MODES:
            info = run_child(args, mode)
            first[mode].append(info["seconds"][0])
            later[mode].extend(info["seconds"][1:])
    print(harness.machine_header())
    print(f"{args.config}: {info['arrays']} arrays, {info['mib']:.0f} MiB of state, replicated "
          f"over {args.devices} devices; {args.rounds} processes per mode")  # fmt: skip
    rows = [
        [mode, harness.spread(first[mode], ".2f"), harness.spread(later[mode], ".2f")]
        for mode in MODES
    ]
    print(harness.markdown_table(["mode", "first save (s)", "later saves (s)"], rows))
    ratio = statistics.median(first["orbax_default"]) / statistics.median(first["project"])
    print(f"first save, orbax default / project: {ratio:.2f}x (medians)")
    return first


if __name__ == "__main__":
    main()
