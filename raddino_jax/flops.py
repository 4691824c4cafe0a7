"""Analytic FLOP model of the backbone, the heads and one SSL train step, plus peaks and MFU.

Conventions (recipe s11):
- a multiply-add is 2 FLOPs; only matrix products are counted (patch-embed conv, linears,
  attention QK^T and AV). LayerNorm, GELU/SiLU, softmax, residual adds, LayerScale, the head's
  L2 normalisation and the weight-norm of the last layer are ignored: they are O(N*D) per layer
  against O(N*D^2), about 1-3% of a ViT-B forward, and XLA counts them differently per backend.
- backward = 2 x forward (gradient w.r.t. activations and w.r.t. weights); rematerialisation
  re-runs the forward once more inside the backward.
- the recipe's ViT-B/14 numbers (8.6 / 46 / 302 GFLOP at 98 / 224 / 518 px) leave out the
  patch-embed conv: at 518 it adds 1.24 GFLOP (302.0 -> 303.2). `backbone_forward_flops`
  reports it as its own term so both totals are available.

Shapes: N = tokens per crop = 1 + registers + (size/patch)^2, D = embed dim, H = FFN hidden.
"""

from __future__ import annotations

import os
import re

from raddino_jax.models import ModelSpec
from raddino_jax.models.heads import HeadConfig
from raddino_jax.models.vit import ViTConfig

PEAK_FLOPS_ENV = "RADDINO_PEAK_FLOPS"


def tokens_per_crop(cfg: ViTConfig, crop_size: int) -> int:
    """N = 1 (CLS) + registers + (crop_size / patch)^2 for a square crop."""
    if crop_size % cfg.patch_size:
        raise ValueError(f"crop size {crop_size} is not a multiple of patch {cfg.patch_size}")
    return 1 + cfg.num_register_tokens + (crop_size // cfg.patch_size) ** 2


def backbone_forward_flops(cfg: ViTConfig, crop_size: int) -> dict[str, float]:
    """FLOPs of one backbone forward on one square crop, by term.

    Keys: patch_embed, qkv, attention (QK^T + AV = 4 N^2 D per layer), proj, ffn, blocks
    (sum over the layers of the four block terms), total (blocks + patch_embed).
    """
    dim, depth = cfg.embed_dim, cfg.depth
    patches = (crop_size // cfg.patch_size) ** 2
    n = tokens_per_crop(cfg, crop_size)
    hidden = cfg.ffn_hidden
    # SwiGLU: w12 D -> 2H and w3 H -> D; MLP: fc1 D -> H and fc2 H -> D.
    ffn_macs = 3 * n * dim * hidden if cfg.ffn_layer == "swiglu" else 2 * n * dim * hidden
    per_layer = {
        "qkv": 2.0 * n * dim * 3 * dim,
        "attention": 4.0 * n * n * dim,
        "proj": 2.0 * n * dim * dim,
        "ffn": 2.0 * ffn_macs,
    }
    out = {k: depth * v for k, v in per_layer.items()}
    out["patch_embed"] = 2.0 * patches * cfg.in_chans * cfg.patch_size**2 * dim
    out["blocks"] = sum(out[k] for k in per_layer)
    out["total"] = out["blocks"] + out["patch_embed"]
    return out


def gram_matrix_flops(cfg: ViTConfig, crop_size: int) -> float:
    """FLOPs of one crop's patch Gram matrix X X^T (X: [P, D], P patches, no CLS/registers)."""
    patches = (crop_size // cfg.patch_size) ** 2
    return 2.0 * patches * patches * cfg.embed_dim


def head_forward_flops_per_token(cfg: HeadConfig) -> float:
    """FLOPs of one DINO/iBOT head forward for one token: the MLP linears + the last layer."""
    dims = [cfg.in_dim] + [cfg.hidden_dim] * (cfg.nlayers - 1) + [cfg.bottleneck_dim]
    mlp = sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    return 2.0 * (mlp + cfg.bottleneck_dim * cfg.out_dim)


def ssl_step_flops(
    spec: ModelSpec,
    *,
    global_size: int,
    local_size: int,
    n_local: int,
    batch: int,
    n_masked_tokens: int,
    separate_ibot_head: bool,
    remat: bool,
    gram: bool = False,
) -> dict[str, float]:
    """FLOPs of one DINOv2 SSL step on `batch` images (recipe s3, s7, s11).

    Student: forward + backward (x3, x4 with remat) of the backbone on 2 global and `n_local`
    local crops per image (masked globals cost as much as unmasked ones); its DINO head forward +
    backward on the (2 + n_local) * batch CLS tokens and its iBOT head (the DINO head when
    shared) on the `n_masked_tokens` = U rows of the static masked-token buffer (summed over
    mask groups, padding included: the compiled step pays for it).
    Teacher: forward only, backbone on the 2 global crops, head on 2 * batch CLS + U tokens.
    Gram anchoring (`gram`, a step where it is active; recipe, "Gram anchoring (DINOv3)"): the
    Gram teacher's backbone forward on the 2 global crops, and the P x P patch Gram matrices
    (2 P^2 D each, P = patches per global crop) of the student (forward + backward, x3) and
    of the Gram teacher (forward) for each of the 2 * batch global crops.

    Returns a dict with student_backbone, teacher_backbone, gram_teacher_backbone,
    gram_matrices, student_heads, teacher_heads, student, teacher, gram, heads and total (all
    FLOPs per step, not per image; the gram terms are 0 unless `gram`).
    """
    if spec.dino_head is None:
        raise ValueError("ssl_step_flops needs a spec with a dino_head")
    if separate_ibot_head and spec.ibot_head is None:
        raise ValueError("separate_ibot_head=True but spec.ibot_head is None")
    ibot_head = spec.ibot_head if separate_ibot_head else spec.dino_head
    cfg = spec.backbone
    global_fwd = backbone_forward_flops(cfg, global_size)["total"]
    local_fwd = backbone_forward_flops(cfg, local_size)["total"] if n_local else 0.0
    student_fwd = batch * (2 * global_fwd + n_local * local_fwd)
    passes = 4.0 if remat else 3.0  # forward + 2x backward (+ re-forward)
    dino_tok = head_forward_flops_per_token(spec.dino_head)
    ibot_tok = head_forward_flops_per_token(ibot_head)
    cls_tokens = (2 + n_local) * batch
    out = {
        "student_backbone": passes * student_fwd,
        "teacher_backbone": batch * 2 * global_fwd,
        "student_heads": 3.0 * (cls_tokens * dino_tok + n_masked_tokens * ibot_tok),
        "teacher_heads": 2 * batch * dino_tok + n_masked_tokens * ibot_tok,
        "gram_teacher_backbone": batch * 2 * global_fwd if gram else 0.0,
        "gram_matrices": (3.0 + 1.0) * 2 * batch * gram_matrix_flops(cfg, global_size)
        if gram
        else 0.0,
    }
    out["student"] = out["student_backbone"]
    out["teacher"] = out["teacher_backbone"]
    out["gram"] = out["gram_teacher_backbone"] + out["gram_matrices"]
    out["heads"] = out["student_heads"] + out["teacher_heads"]
    out["total"] = out["student"] + out["teacher"] + out["gram"] + out["heads"]
    return out


# Per chip (one jax device): dense bfloat16 peak FLOP/s (vendor dense tensor peaks) and HBM
# bytes. TPU keys are lower-case jax `Device.device_kind` strings, matched whole; their float32
# peak is unknown (float32 matmuls are multi-pass bf16). HBM: Cloud TPU's published per-chip
# figures (v4 32 GiB, v5e 16 GiB, v5p 95 GB, v6e 32 GiB); GPU: the board's memory.
_TPU: dict[str, tuple[float, int]] = {
    "tpu v4": (275e12, 32 * 2**30),
    "tpu v5 lite": (197e12, 16 * 2**30),  # v5e
    "tpu v5e": (197e12, 16 * 2**30),
    "tpu v5": (459e12, 95 * 10**9),  # v5p reports "TPU v5"
    "tpu v5p": (459e12, 95 * 10**9),
    "tpu v6 lite": (918e12, 32 * 2**30),  # v6e (Trillium)
    "tpu v6e": (918e12, 32 * 2**30),
}
# GPUs: (regex on the lower-cased kind, {dtype: peak}, HBM bytes); float32 is the plain
# (non-TF32) FP32 peak. First match wins, so PCIe precedes the SXM default.
_GPU: list[tuple[str, dict[str, float], int]] = [
    (r"\bh100\b.*pcie", {"bfloat16": 756e12, "float32": 51e12}, 80 * 10**9),
    (r"\bh100\b", {"bfloat16": 989e12, "float32": 67e12}, 80 * 10**9),  # "NVIDIA H100 80GB HBM3"
    (r"\bh200\b", {"bfloat16": 989e12, "float32": 67e12}, 141 * 10**9),
    (r"\ba100\b.*40", {"bfloat16": 312e12, "float32": 19.5e12}, 40 * 10**9),
    (r"\ba100\b", {"bfloat16": 312e12, "float32": 19.5e12}, 80 * 10**9),
]


def _gpu(kind: str) -> tuple[dict[str, float], int] | None:
    """(peaks by dtype, HBM bytes) of the first `_GPU` row matching `kind`; None if none does."""
    for pattern, peaks, hbm in _GPU:
        if re.search(pattern, kind):
            return peaks, hbm
    return None


def hbm_bytes_per_device(device_kind: str) -> int | None:
    """HBM bytes of one device of `device_kind` (jax `Device.device_kind`); None if unknown."""
    kind = device_kind.strip().lower()
    if kind in _TPU:
        return _TPU[kind][1]
    gpu = _gpu(kind)
    return gpu[1] if gpu else None


def _dtype_name(dtype) -> str:
    name = getattr(dtype, "__name__", None) or getattr(dtype, "name", None) or str(dtype)
    name = str(name).lower()
    aliases = {"bf16": "bfloat16", "f32": "float32", "fp32": "float32"}
    return aliases.get(name, name)


def peak_flops_per_device(
    device_kind: str, dtype="bfloat16", *, override: float | None = None
) -> float | None:
    """Dense peak FLOP/s of one device of `device_kind` (jax `Device.device_kind`) for `dtype`.

    Precedence: `override`, then $RADDINO_PEAK_FLOPS (a float, e.g. "4.59e14"), then the table.
    Returns None for an unknown device or dtype (e.g. CPUs, float32 on TPU).
    """
    if override is not None:
        return float(override)
    if os.environ.get(PEAK_FLOPS_ENV):
        return float(os.environ[PEAK_FLOPS_ENV])
    kind, name = device_kind.strip().lower(), _dtype_name(dtype)
    if kind in _TPU:
        return _TPU[kind][0] if name == "bfloat16" else None
    gpu = None if kind.startswith("tpu") else _gpu(kind)
    return gpu[0].get(name) if gpu else None


def mfu(flops_per_step: float, step_time_s: float, n_devices: int, peak: float | None) -> float:
    """Model FLOPs utilisation: achieved FLOP/s / (n_devices * peak); NaN when peak is unknown.

    `flops_per_step` is the global (all-device) analytic count, e.g. `ssl_step_flops()["total"]`.
    """
    if step_time_s <= 0 or n_devices <= 0:
        raise ValueError(f"need step_time_s > 0 and n_devices > 0, got {step_time_s}, {n_devices}")
    if not peak:
        return float("nan")
    return flops_per_step / step_time_s / (n_devices * peak)
