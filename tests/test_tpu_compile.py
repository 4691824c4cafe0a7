"""Compiling the real train step for a TPU topology on a machine without a TPU (libtpu's
compiler on the CPU host; `raddino_jax.sweep.topology`). Skipped, with the reason shown, where
libtpu is not installed (`pip install "raddino-jax[tpu]"`; the `test` extra installs it)."""

import json
import os
import subprocess
import sys

import pytest

from raddino_jax.sweep.topology import INSTALL_HINT, libtpu_available
from tests.test_sweep import REPO, TINY_OVERRIDES

pytestmark = pytest.mark.skipif(not libtpu_available(), reason=INSTALL_HINT)


@pytest.mark.slow
def test_tiny_step_compiles_for_v5p_topology_without_a_tpu(tmp_path):
    """The CLI contract: --topology compiles per layout and reports XLA memory against the
    chip's HBM, XLA FLOPs and the estimated step time / images/s / MFU (labelled estimates).
    The TPU lowering picks the splash-attention kernel (shard_map over the mesh) from the
    mesh's platform although this process's default backend is CPU."""
    overrides = {**TINY_OVERRIDES, "batch_size": 8, "data.mask_group_size": 2}
    overrides["ssl.koleo_group_size"] = 2
    # 16x16 = 256 patch tokens (+1): long enough for the splash kernel (vit.SPLASH_MIN_TOKENS)
    overrides["data.global_size"] = 224
    overrides["model.scan_blocks"] = "true"
    overrides["model.dtype"] = "bfloat16"  # the TPU peak table is for bfloat16
    cmd = [
        sys.executable,
        "-m",
        "raddino_jax.sweep",
        "--config=configs/demo.py",
        *[f"--config.{k}={v}" for k, v in overrides.items()],
        "--topology=v5p:2x2x1",
        "--meshes=4x1x1,1x1x1,8x1x1",
        "--remat=dots",
        "--compile-only",
        f"--out={tmp_path}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "sweep.json").read_text())
    assert payload["topology"] == "v5p:2x2x1" and payload["platform"] == "tpu"
    assert payload["mode"] == "compile" and payload["n_devices"] == 4
    rows = {r["layout"]: r for r in payload["rows"]}
    assert rows["8x1x1"]["status"] == "failed" and "needs 8 devices" in rows["8x1x1"]["reason"]
    for name in ("4x1x1", "1x1x1"):
        row = rows[name]
        assert row["status"] == "compiled", (name, row["reason"])
        assert row["device_kind"] == "TPU v5" and row["hbm_bytes_per_device"] == 95 * 10**9
        assert row["fits"] is True and 0 < row["hbm_fraction"] < 0.5
        assert row["peak_bytes_per_device"] >= row["argument_bytes"] > 0
        assert row["xla_flops_per_device"] > 0
        assert row["estimated_step_time_s"] > 0
        assert row["estimated_images_per_s"] == pytest.approx(8 / row["estimated_step_time_s"])
        assert 0 < row["estimated_mfu"] < 1
    # More devices share the batch: XLA's per-device FLOPs fall.
    assert rows["4x1x1"]["xla_flops_per_device"] < rows["1x1x1"]["xla_flops_per_device"]
    markdown = (tmp_path / "sweep.md").read_text()
    assert "estimated MFU" in markdown and "compiled without a TPU" in markdown
    assert "estimated" in (tmp_path / "sweep.csv").read_text().splitlines()[0]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_topology_is_a_usage_error(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "raddino_jax.sweep",
        "--config=configs/demo.py",
        "--topology=v5p:nonsense",
        "--meshes=1x1x1",
        f"--out={tmp_path}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--topology=v5p:nonsense" in result.stderr


def test_mesh_splits_physical_axes_when_a_layout_needs_it():
    """8x8x1 over v5p-64's 4x4x4 torus: jax.make_mesh finds no whole-axis assignment (8 is no
    product of the 4s); make_mesh falls back to splitting a physical axis, over all 64 chips."""
    code = (
        "from raddino_jax.parallel.mesh import make_mesh\n"
        "from raddino_jax.sweep.topology import topology_devices\n"
        "devices = topology_devices('v5p:4x4x4')\n"
        "for layout in ((8, 8, 1), (16, 4, 1), (64, 1, 1)):\n"
        "    m = make_mesh(layout, devices)\n"
        "    print(tuple(m.devices.shape), len({d.id for d in m.devices.flat}))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:3] == ["(8, 8, 1) 64", "(16, 4, 1) 64", "(64, 1, 1) 64"]
