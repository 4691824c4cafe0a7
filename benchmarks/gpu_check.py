"""One-GPU check, run by benchmarks/gpu_check.sh: correctness vs CPU, ViT-B/14 speed, a sweep.

1. correctness: (b) cuDNN attention vs the einsum path on the GPU, bfloat16, value and
   gradient, relative error <= 2e-2 of the largest entry; and two train steps of a tiny
   float32 model (drop path off) on the GPU and on the CPU (jax.devices("cpu")) from the
   same initial state and batch, with float32 matmuls at "highest" precision on both (GPU
   float32 defaults to TF32 otherwise). Two steps because the lr is 0 at step 0 (warmup):
   step 1 applies a real update. Every metric of both steps (loss terms, per-submodule
   gradient norms, teacher entropy, ...) must agree to rtol 1e-4 and every student/teacher
   parameter afterwards to atol 1e-4 + rtol 1e-4 (float32 reassociation across different
   kernels; a real bug moves them by >= 1e-2). If it fails, (d) prints where they part.
2. ViT-B/14 SSL step in bfloat16, 8 local crops of 98 px: RAD-DINO's per-chip setting first
   (518 px globals, 40 images, remat "dots", scanned blocks), then 224 px x 64 and 518 px x 16
   without remat: images/s, MFU (analytic FLOPs, `raddino_jax.flops`), XLA's memory analysis
   and the device's allocator statistics.
3. a small sweep at 224/98: remat, attention implementation (model.attention_impl "" = the
   platform's choice, cuDNN on GPU; "xla"), and the 518 x 40 row with einsum attention.
4. issue 19's levers at 518/98 x 40, each against row 2's first: remat "none", the head + loss
   not chunked (ssl.prototype_chunk=0; vitb14 chunks it), unrolled blocks, 80 images per GPU.
Each part runs guarded (a failure is reported and the rest still runs); if the cuDNN check
fails, the timed rows use the XLA attention path. `--budget-s` stops starting rows after that
many seconds, `--rows` picks rows of the plan, `--out` appends each row as a JSON line.
All on one device (1x1x1 mesh). Measured on one H200: ~7 minutes for everything (compiles
~20-45 s per row), benchmarks/RESULTS.md.

--dry-run: the same three parts on CPU with a tiny model, 2 timed steps (checks the script).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import harness
import jax
import numpy as np

from configs import tiny
from raddino_jax import sweep
from raddino_jax.reference.compare import OursStep
from raddino_jax.train.build import build

CORRECTNESS_RTOL = 1e-4
CORRECTNESS_ATOL = 1e-4
ATTENTION_TOL = 2e-2  # bfloat16 inputs and outputs; a wrong mask/scale/layout is O(1)


def relative_error(got, want) -> float:
    """max |got - want| over max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def check_attention(device) -> bool:
    """cuDNN flash attention (the GPU default) vs the einsum path, bfloat16, value and gradient,
    on the device at ViT-B/14 shapes with 257 and 50 tokens (224 px globals, 98 px locals).
    On CPU (--dry-run) cuDNN does not exist and the XLA path stands in for it."""
    from raddino_jax.models import attention

    impl = "cudnn" if device.platform == "gpu" else "xla"

    def normal(seed: int, shape: tuple) -> jax.Array:
        values = jax.random.normal(jax.random.key(seed), shape, jax.numpy.bfloat16)
        return jax.device_put(values, device)

    for tokens in (257, 50):
        qkv, grad_out = normal(tokens, (4, tokens, 3, 12, 64)), normal(1, (4, tokens, 12, 64))
        results = []
        for fn in (lambda t: attention.attention(t, impl), attention.einsum_attention):
            out, vjp = jax.vjp(jax.jit(fn), qkv)
            results.append((np.asarray(out, np.float32), np.asarray(vjp(grad_out)[0], np.float32)))
        (v1, g1), (v2, g2) = results
        err_v, err_g = relative_error(v1, v2), relative_error(g1, g2)
        print(f"[1b] attention {impl} vs einsum, {tokens} tokens: value {err_v:.1e}, "
              f"grad {err_g:.1e}")  # fmt: skip
        if max(err_v, err_g) > ATTENTION_TOL:
            raise SystemExit(f"attention {impl} differs from einsum by more than {ATTENTION_TOL}")
    return True


def shrink(config):
    """Any config with the tests' tiny model (configs/tiny.py), without drop path."""
    tiny.shrink(config)
    config.model.drop_path_rate = 0.0
    return config


def correctness_config():
    """The demo config shrunk to the tiny float32 model of part [1], one device, batch 8."""
    from configs import demo

    config = shrink(demo.get_config())
    config.model.dtype = "float32"
    config.batch_size, config.data.mask_group_size, config.ssl.koleo_group_size = 8, 4, 4
    return sweep.point_config(config, (1, 1, 1), 8, False)


def vitb_config(global_size: int, batch: int, *, dry_run: bool):
    """configs/vitb14.py (bf16, 8 x 98 px locals) at `global_size`, one device's batch."""
    from configs import vitb14

    c = vitb14.get_config()
    c.data.global_size = c.model.img_size = global_size
    # One device: masks and KoLeo per device batch (recipe s7).
    c.batch_size = c.data.mask_group_size = c.ssl.koleo_group_size = batch
    c.eval.every = 0
    return shrink(c) if dry_run else c


def run_steps(config, device: jax.Device, n_steps: int = 2) -> tuple[list[dict], dict]:
    """([metrics of each step], {"student", "teacher"} afterwards) on `device`, as numpy."""
    ours = OursStep(config, device)
    history = [ours() for _ in range(n_steps)]
    return history, jax.device_get({"student": ours.state.student, "teacher": ours.state.teacher})


def check_correctness(device: jax.Device) -> float:
    """Largest parameter difference GPU vs CPU after two steps; raises if out of tolerance."""
    config, cpu = correctness_config(), jax.devices("cpu")[0]
    with jax.default_matmul_precision("highest"):
        got_history, got = run_steps(config, device)
        want_history, want = run_steps(config, cpu)
    for step, (got_metrics, want_metrics) in enumerate(zip(got_history, want_history)):
        for key in want_metrics:
            np.testing.assert_allclose(
                got_metrics[key], want_metrics[key], rtol=CORRECTNESS_RTOL, atol=1e-6,
                err_msg=f"{step} {key}",
            )  # fmt: skip
    worst = 0.0
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(
            a, b, atol=CORRECTNESS_ATOL, rtol=CORRECTNESS_RTOL, err_msg=jax.tree_util.keystr(path)
        )
        worst = max(worst, float(np.max(np.abs(a - b))))
    print(
        f"[1] correctness {device.device_kind} vs {cpu.device_kind}: loss "
        f"{got_history[-1]['loss']:.6f} vs {want_history[-1]['loss']:.6f}, max |param diff| "
        f"{worst:.2e} (tolerance atol {CORRECTNESS_ATOL} + rtol {CORRECTNESS_RTOL}): OK"
    )
    return worst


def diagnose_correctness(device) -> None:
    """Where the GPU and CPU part, printed (run when [1] fails): the tiny float32 backbone's
    forward (same parameters, same images) per attention path, then every step-0 metric with
    the einsum attention forced on both devices."""
    from raddino_jax import models

    config, cpu = correctness_config(), jax.devices("cpu")[0]
    spec = build(config, [cpu]).spec
    with jax.default_device(cpu):
        params = jax.device_get(models.init_params(spec, 0))
    images = np.random.default_rng(0).normal(size=(4, 56, 56, 3)).astype(np.float32)
    for impl in ("xla", "einsum"):
        s = spec.replace(backbone=spec.backbone.replace(attention_impl=impl))
        forward = jax.jit(lambda p, x, s=s: models.bind(s, p).backbone(x)["x_norm_patchtokens"])
        with jax.default_matmul_precision("highest"):
            gpu, ref = (np.asarray(forward(jax.device_put(params, d), jax.device_put(images, d)))
                        for d in (device, cpu))  # fmt: skip
        print(f"[1d] backbone forward {impl}: max |gpu - cpu| {np.abs(gpu - ref).max():.2e} "
              f"(max |cpu| {np.abs(ref).max():.2e})")  # fmt: skip
    config.model.attention_impl = "einsum"
    with jax.default_matmul_precision("highest"):
        (got,), _ = run_steps(config, device, 1)
        (want,), _ = run_steps(config, cpu, 1)
    for key in sorted(want):
        g, w = np.asarray(got[key]), np.asarray(want[key])
        rel = relative_error(g, w)
        flag = "  <--" if rel > CORRECTNESS_RTOL else ""
        print(f"[1d] step 0 einsum {key}: gpu {g.ravel()[:1]} cpu {w.ravel()[:1]} "
              f"rel {rel:.1e}{flag}")  # fmt: skip


def timed_row(config, device, batch: int, remat: str, attention: str, steps: int, warmup: int,
              lever: tuple = ()):  # fmt: skip
    """One sweep row on `device` plus the allocator's statistics afterwards; `lever` holds
    "key=value" config settings (a lever of issue 19)."""
    c = harness.override(config, lever)
    c.model.attention_impl = attention
    row = sweep.run_point(c, (1, 1, 1), batch, remat, devices=[device], steps=steps, warmup=warmup)
    stats = device.memory_stats() or {}
    return row, {
        "in_use_mib": stats.get("bytes_in_use", 0) / sweep.MiB,
        "process_peak_mib": stats.get("peak_bytes_in_use", 0) / sweep.MiB,
        "limit_mib": stats.get("bytes_limit", 0) / sweep.MiB,
    }


def format_rows(title: str, entries) -> str:
    """One table: config, status, compile, ms/step, img/s, TFLOP/s, MFU, memory."""
    header = ["global px", "batch", "remat", "attention", "lever", "status", "compile s", "ms/step",
              "img/s", "TFLOP/s", "MFU", "XLA peak MiB", "temp MiB",
              "allocator peak so far MiB", "note"]  # fmt: skip
    rows = [
        [size, row.batch_size, row.remat, attention or "default", " ".join(lever) or "-",
         row.status, sweep.cell(row.compile_time_s, ".1f"),
         sweep.cell(row.step_time_s and row.step_time_s * 1e3, ".1f"),
         sweep.cell(row.images_per_s, ".1f"), sweep.cell(row.tflops_per_s, ".1f"),
         sweep.cell(row.mfu, ".3f"), sweep.mib(row.peak_bytes_per_device),
         sweep.mib(row.temp_bytes), f"{mem['process_peak_mib']:.0f}",
         "" if row.status == "ok" else row.reason[:120]]
        for size, attention, lever, row, mem in entries
    ]  # fmt: skip
    return title + "\n" + harness.markdown_table(header, rows)


def guarded(name: str, fn, failures: list[str]):
    """Run one part; a failure is printed and recorded so the later parts still run (a lent
    GPU is minutes long: one broken part must not cost the others' figures)."""
    try:
        return fn()
    except BaseException as err:  # noqa: BLE001 - SystemExit from a failed check included
        if isinstance(err, KeyboardInterrupt):
            raise
        traceback.print_exc()
        failures.append(f"{name}: {type(err).__name__}: {str(err)[:300]}")
        print(f"[{name}] FAILED: {failures[-1]}", flush=True)
        return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU, 2 steps")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default 5; dry-run 2)")
    p.add_argument("--budget-s", type=float, default=0,
                   help="stop starting timed rows after this many seconds (0: none)")  # fmt: skip
    p.add_argument("--rows", default="", help="comma-separated indices into the row plan")
    p.add_argument("--out", default="", help="also append the rows as JSON lines to this file")
    args = p.parse_args(argv)
    dry = args.dry_run
    steps, warmup = args.steps or (2 if dry else 5), 1 if dry else 2
    device = jax.devices()[0]
    if not dry and device.platform != "gpu":
        raise SystemExit(f"no GPU visible (default device {device}); use --dry-run on CPU")
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
    start = time.perf_counter()
    failures: list[str] = []

    if guarded("1", lambda: check_correctness(device), failures) is None:
        guarded("1d", lambda: diagnose_correctness(device), failures)
    default_attention = ""  # the platform's choice: cuDNN on GPU
    if guarded("1b", lambda: check_attention(device), failures) is None:
        default_attention = "xla"
        print("[1b] cuDNN attention failed its check: the timed rows use the XLA path instead")
    print(f"    ({time.perf_counter() - start:.0f} s so far)", flush=True)

    # Rows in order of value, so a budget cut loses the least useful ones: the RAD-DINO
    # per-chip setting (518/98, 40 images, vitb14's remat "dots" + scanned blocks) first, then
    # issue 19's levers at that setting, each on its own (remat none, the chunked head + loss,
    # unrolled blocks, 80 images in mask/KoLeo groups of 40), then the 224 x 64 row and the
    # 224 sweep (batch, remat, attention) measured before (RESULTS.md).
    radd_batch, big_batch = (8, 16) if dry else (40, 64)
    size_224, size_518 = (56, 70) if dry else (224, 518)
    unchunked = "ssl.prototype_chunk=0"  # vitb14 chunks the head + loss; this row does not
    groups = (f"data.mask_group_size={radd_batch}", f"ssl.koleo_group_size={radd_batch}")
    plan = [
        ("2", size_518, radd_batch, "dots", "", ()),
        ("4", size_518, radd_batch, "none", "", ()),
        ("4", size_518, radd_batch, "dots", "", (unchunked,)),
        ("4", size_518, radd_batch, "dots", "", ("model.scan_blocks=False",)),
        ("4", size_518, 2 * radd_batch, "dots", "", groups),
        ("4", size_518, 2 * radd_batch, "none", "", groups),
        ("2", size_224, big_batch, "none", "", ()),
        ("3", size_224, big_batch, "dots", "", ()),
        ("3", size_224, big_batch, "none", "xla", ()),
        ("2", size_518, radd_batch, "dots", "einsum", ()),
    ]
    if args.rows:
        plan = [plan[int(i)] for i in args.rows.split(",")]
    entries: dict[str, list] = {"2": [], "3": [], "4": []}
    for part, size, batch, remat, attention, lever in plan:
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            print(f"[{part}] skipped {size} px batch {batch} remat {remat} attention "
                  f"{attention or 'default'}: budget {args.budget_s:.0f} s spent")  # fmt: skip
            continue
        config = vitb_config(size, batch, dry_run=dry)
        attention = attention or default_attention
        result = guarded(part, lambda c=config, b=batch, r=remat, a=attention, o=lever:
                         timed_row(c, device, b, r, a, steps, warmup, o), failures)  # fmt: skip
        if result is None:
            continue
        row, mem = result
        entries[part].append((size, attention, lever, row, mem))
        print(sweep.describe_row(row), flush=True)
        if args.out:
            record = {"part": part, "global_px": size, "attention": attention or "default",
                      "lever": list(lever)}  # fmt: skip
            record.update({k: v for k, v in vars(row).items() if not k.startswith("_")}, **mem)
            with open(args.out, "a") as out:
                out.write(json.dumps(record, default=str) + "\n")
        print(f"    ({time.perf_counter() - start:.0f} s so far)", flush=True)
    local = vitb_config(size_224, big_batch, dry_run=dry).data.local_size
    print(format_rows(f"[2] ViT-B/14 SSL step, bfloat16, 8 local crops of {local} px",
                      entries["2"]))  # fmt: skip
    print(format_rows(f"[3] sweep at {size_224}/{local} px (ViT-B/14, bfloat16)", entries["3"]))
    print(format_rows(f"[4] issue 19 levers at {size_518}/{local} px", entries["4"]))
    print(f"total {time.perf_counter() - start:.0f} s")
    if failures:
        raise SystemExit("FAILED parts:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main()
