"""`python -m raddino_jax.sweep`: compile (and time) the SSL train step per mesh layout.

  python -m raddino_jax.sweep --config=configs/demo.py \
      --meshes=8x1x1,4x2x1,2x4x1,1x8x1,2x2x2 --batch-sizes=32,64 --remat=false,true \
      --steps=5 --out=runs/sweep

Layouts are DATAxFSDPxTENSOR; each uses the first data*fsdp*tensor devices. Every
(layout, batch, remat) combination is measured by `measure.run_point` (module docstring there:
exact state bytes per device, compile time, XLA memory and cost analysis, median step time,
images/s, TFLOP/s, MFU); a combination that cannot run is a row with status "failed" and the
reason.

  python -m raddino_jax.sweep --config=configs/vitb14.py --topology=v5p:4x4x4 \
      --meshes=64x1x1,16x4x1,8x8x1 --compile-only --out=runs/v5p64

--topology compiles for a TPU slice this machine does not have (libtpu's compiler on the CPU
host, `topology.py`): per layout, XLA's per-chip argument / temp / peak bytes against the
chip's HBM, whether it fits, XLA's FLOPs, and XLA's cost-model step time with the images/s and
MFU it implies, labelled "estimated" in every output.

Modes: default (compile + time), --compile-only (no state allocated, no step run: AOT memory
check for a topology, e.g. ViT-g/14 under FSDP) and --state-only (no compilation at all: only
the exact state bytes per device and the analytic FLOPs; ~8 s for ViT-g/14 over five layouts,
whose 40-block step took 12.6 min and 3.8 GB of host RAM to compile for 1x8x1 on a 2-core
CPU host: see benchmarks/RESULTS.md).

Writes OUT/sweep.csv, OUT/sweep.json, OUT/sweep.md (sorted by images/s, or by memory without
timing; the best row marked) and OUT/sweep.png (images/s and per-device memory per layout):
see `report`. Config overrides work as in raddino_jax.main: `--config.model.depth=2`.
Single process only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import SimpleNamespace

import jax

from raddino_jax.models.vit import normalize_remat
from raddino_jax.parallel.mesh import parse_layout
from raddino_jax.sweep.measure import sweep
from raddino_jax.sweep.report import markdown_table, write_outputs
from raddino_jax.sweep.topology import topology_devices


def _parse_remat(text: str) -> str:
    try:
        return normalize_remat(text)
    except ValueError as err:
        raise ValueError(f"--remat: {err}") from err


def define_flags() -> SimpleNamespace:
    """The CLI's absl flag holders by name; defined only when run as a program, so importing
    this module never registers a second --config next to raddino_jax.main's."""
    from absl import flags
    from ml_collections import config_flags

    return SimpleNamespace(
        config=config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)"),
        meshes=flags.DEFINE_list(
            "meshes", ["8x1x1", "4x2x1", "2x4x1", "1x8x1", "2x2x2"], "DATAxFSDPxTENSOR layouts"
        ),
        batch_sizes=flags.DEFINE_list("batch-sizes", [], "global batch sizes (default: config's)"),
        remat=flags.DEFINE_list(
            "remat", [], "remat policies, e.g. none,full,dots (true/false too; default: config's)"
        ),
        steps=flags.DEFINE_integer("steps", 5, "timed steps per point"),
        warmup=flags.DEFINE_integer("warmup", 2, "untimed steps before timing"),
        compile_only=flags.DEFINE_bool(
            "compile-only", False, "compile and report memory; allocate and run nothing"
        ),
        state_only=flags.DEFINE_bool(
            "state-only", False, "no compilation: exact state bytes per device + analytic FLOPs"
        ),
        peak_tflops=flags.DEFINE_float(
            "peak-tflops", 0.0, "peak TFLOP/s per device for MFU (0: look up the device kind)"
        ),
        topology=flags.DEFINE_string(
            "topology", "",
            'compile for this TPU topology on any machine, e.g. "v5p:2x2x1" (needs libtpu: '
            'pip install "raddino-jax[tpu]"); implies --compile-only unless --state-only',
        ),
        out=flags.DEFINE_string("out", None, "output folder (local or gs://)", required=True),
    )


def main(cli: SimpleNamespace, argv: Sequence[str]) -> None:
    """Run the sweep the flags describe and write its four files."""
    del argv
    from absl import app, flags
    from ml_collections import config_flags

    config = cli.config.value
    if config is None:
        raise app.UsageError("--config=configs/<name>.py is required")
    if cli.compile_only.value and cli.state_only.value:
        raise app.UsageError("--compile-only and --state-only exclude each other")
    mode = "state" if cli.state_only.value else "compile" if cli.compile_only.value else "run"
    topology = cli.topology.value
    if topology:
        try:
            devices = topology_devices(topology)
        except (RuntimeError, ValueError) as err:
            raise app.UsageError(str(err)) from err
        if mode == "run":
            mode = "compile"  # nothing can run on a topology description
    else:
        devices = jax.devices()
    rows = sweep(
        config,
        [parse_layout(text) for text in cli.meshes.value],
        batch_sizes=[int(b) for b in cli.batch_sizes.value or []],
        remats=[_parse_remat(r) for r in cli.remat.value or []],
        devices=devices,
        mode=mode,
        steps=cli.steps.value,
        warmup=cli.warmup.value,
        peak_flops=cli.peak_tflops.value * 1e12 or None,
    )
    meta = {
        "config": config_flags.get_config_filename(flags.FLAGS["config"]),
        "mode": mode,
        "device": devices[0].device_kind,
        "topology": topology,
        "platform": devices[0].platform,
        "n_devices": len(devices),
        "steps": cli.steps.value,
        "warmup": cli.warmup.value,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "jax": jax.__version__,
    }
    out = write_outputs(rows, cli.out.value, meta)
    print(markdown_table(rows))
    print(f"wrote {out}/sweep.{{csv,json,md,png}}")


if __name__ == "__main__":
    import functools

    from absl import app

    app.run(functools.partial(main, define_flags()))
