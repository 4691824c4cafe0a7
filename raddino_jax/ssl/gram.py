"""Gram anchoring (DINOv3): keep the student's patch-to-patch similarity structure close to
that of an earlier model, the Gram teacher (recipe, "Gram anchoring (DINOv3)").

Pure functions: the loss and the Gram teacher's refresh rule. The objective calls
`gram_loss`; the train step calls `is_refresh_step` to copy the EMA teacher into the Gram
teacher inside the jitted step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GRAM_TEACHERS = ("ema", "initial")

# torch.nn.functional.normalize's default eps: x / max(||x||, eps).
NORMALIZE_EPS = 1e-12


def l2_normalize(x: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
    """x / max(||x||_2, eps) over the last axis, in float32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def gram_matrix(features: jax.Array) -> jax.Array:
    """Per-image Gram matrix of L2-normalised patch features.

    features [B, N, D] (any float dtype) -> float32 [B, N, N], entry (i, j) the cosine
    similarity of patches i and j of the same image.
    """
    normed = l2_normalize(features)
    # HIGH: 3-pass bfloat16 on TPU, TF32-class on GPU; the reference trains these float32
    # matmuls with TF32 enabled (dinov3/train/train.py), and one pass of bfloat16 (8 bits of
    # mantissa) would swamp the small Gram differences the loss measures.
    return jnp.einsum(
        "bnd,bmd->bnm", normed, normed,
        precision=jax.lax.Precision.HIGH, preferred_element_type=jnp.float32,
    )


def gram_loss(student_patches: jax.Array, teacher_patches: jax.Array) -> jax.Array:
    """DINOv3's Gram loss at the image level: mean squared error between the student's and the
    Gram teacher's patch Gram matrices.

    student_patches, teacher_patches: [B, N, D] patch tokens (after the backbone's final norm)
    of the same B crops; the teacher's are treated as constants (stop_gradient).
    Returns a float32 scalar, mean over B * N * N entries of
    (S_s - S_t)^2 with S = X_hat X_hat^T and X_hat the row-wise L2-normalised features.
    The mean (torch `MSELoss`) is over every image's N x N matrix, so the value does not depend
    on the batch size or on how the batch is sharded.
    """
    if student_patches.shape != teacher_patches.shape or student_patches.ndim != 3:
        raise ValueError(
            f"gram_loss expects two [B, N, D] arrays of one shape, got "
            f"{student_patches.shape} and {teacher_patches.shape}"
        )
    target = jax.lax.stop_gradient(gram_matrix(teacher_patches))
    return jnp.mean(jnp.square(gram_matrix(student_patches) - target))


def is_refresh_step(step: jax.Array, start_step: int, update_every: int) -> jax.Array:
    """Whether the Gram teacher takes a copy of the EMA teacher before this step's update.

    Refreshes happen at `start_step` and, when `update_every` > 0, every `update_every` steps
    after it (start_step + k * update_every). `step` is the 0-based step about to run
    (`state.step`), so the copy is of the teacher after `step` EMA updates.
    """
    step = jnp.asarray(step, jnp.int32)
    since = step - start_step
    if update_every <= 0:
        return since == 0
    return (since >= 0) & (since % update_every == 0)
