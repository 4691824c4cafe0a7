"""Softmax attention kernels for the backbone, chosen by the platform the step is lowered for
(`resolve_attention_impl`): the Pallas splash kernel on TPU, cuDNN on GPU, a hand-written
einsum path on CPU; `ViTConfig.attention_impl` forces one."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from raddino_jax.models.layers import after

ATTENTION_IMPLS = ("", "einsum", "xla", "cudnn", "splash")
# Attention by the platform the step is lowered for (`resolve_attention_impl`): a fused,
# memory-efficient kernel on accelerators, the einsum path on CPU (benchmarks/RESULTS.md).
PLATFORM_ATTENTION = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "cpu": "einsum"}
# Sequences shorter than this use the einsum path even on TPU: splash pads to 128-token blocks,
# so a 98 px local crop (50 tokens) would pay 2.6x its attention FLOPs in padding.
SPLASH_MIN_TOKENS = 256
SPLASH_BLOCK = 128
# Compute dtypes cuDNN flash attention accepts (jax.nn.dot_product_attention, "cudnn").
CUDNN_DTYPES = ("bfloat16", "float16")
# cuDNN's training kernel takes even sequence lengths only (jax's check_is_flash_attention).
CUDNN_TOKEN_MULTIPLE = 2


def resolve_attention_impl(impl: str, platform: str, dtype: str = "bfloat16") -> str:
    """The attention implementation for a step lowered for `platform` ("tpu", "gpu", "cpu").

    A non-empty `impl` (config.model.attention_impl) is kept: it forces one implementation.
    "" picks PLATFORM_ATTENTION[platform]. The platform is the mesh devices'
    (`ModelSpec.for_platform`), never `jax.default_backend()`: a deviceless TPU compile runs on
    a CPU host. cuDNN's fused attention takes only 16-bit inputs, so a float32 model (`dtype`,
    the compute dtype) on GPU gets the XLA path instead.
    """
    if impl:
        return impl
    if platform not in PLATFORM_ATTENTION:
        raise ValueError(f"no attention implementation for platform {platform!r}")
    chosen = PLATFORM_ATTENTION[platform]
    if chosen == "cudnn" and dtype not in CUDNN_DTYPES:
        return "xla"
    return chosen


def attention(qkv: jax.Array, impl: str, lean: bool = True) -> jax.Array:
    """Softmax attention of fused qkv [B, N, 3, heads, hd] -> [B, N, heads, hd], scale hd^-0.5.

    `impl` is normally resolved before tracing (`resolve_attention_impl` via
    `ModelSpec.for_platform`, which `train.step.compile_train_step` applies). An unresolved ""
    (eager use, evaluation) falls back to the default backend's choice. `lean` picks the
    einsum path's hand-written backward (`ViTConfig.lean_backward`).
    """
    if not impl:
        impl = resolve_attention_impl("", jax.default_backend(), jnp.dtype(qkv.dtype).name)
    if impl == "splash" and qkv.shape[1] >= SPLASH_MIN_TOKENS:
        return splash_attention(qkv)
    if impl in ("splash", "einsum"):  # splash: a sequence too short for its 128-token blocks
        return einsum_attention(qkv, lean)
    if impl == "cudnn":
        return padded_dot_product_attention(qkv, impl, CUDNN_TOKEN_MULTIPLE)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def padded_dot_product_attention(qkv: jax.Array, impl: str, multiple: int) -> jax.Array:
    """`jax.nn.dot_product_attention` over tokens padded to a multiple of `multiple`:
    [B, N, 3, h, d] -> [B, N, h, d]. cuDNN's fused training kernel refuses odd sequence
    lengths (a 224 px crop has 257 tokens); the padded keys are excluded through
    `key_value_seq_lengths` and the padded queries' rows are dropped, so the result equals
    attention over the N real tokens."""
    batch, tokens = qkv.shape[:2]
    padded = -(-tokens // multiple) * multiple
    if padded != tokens:
        qkv = jnp.pad(qkv, ((0, 0), (0, padded - tokens)) + ((0, 0),) * 3)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    lengths = jnp.full((batch,), tokens, jnp.int32) if padded != tokens else None
    out = jax.nn.dot_product_attention(
        q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=impl
    )
    return out[:, :tokens]


def splash_attention(qkv: jax.Array, *, interpret: bool = False) -> jax.Array:
    """The Pallas TPU splash-attention kernel: [B, N, 3, h, d] -> [B, N, h, d].

    Memory-efficient: the [N, N] scores never leave VMEM, and the backward recomputes them from
    the saved log-sum-exp. Tokens are padded to a multiple of the 128-token block; padding is a
    second segment (segment ids), so real queries never see padded keys. Under a mesh (the
    abstract mesh the step is traced under, `train.step`), the kernel runs per shard through
    shard_map: images split over ("data", "fsdp"), heads over "tensor"; with no mesh it runs
    on the whole array. `interpret=True` runs the kernel in the Pallas interpreter (CPU tests).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )

    batch, tokens, _, heads, head_dim = qkv.shape
    padded = -(-tokens // SPLASH_BLOCK) * SPLASH_BLOCK
    q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # [B, h, N, d] each
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    pad = ((0, 0), (0, 0), (0, padded - tokens), (0, 0))
    q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
    segment = jnp.asarray(np.arange(padded) >= tokens, jnp.int32)

    mesh = jax.sharding.get_abstract_mesh()
    names = () if mesh.empty else mesh.axis_names
    batch_axes = tuple(a for a in ("data", "fsdp") if a in names and mesh.shape[a] > 1)
    head_axis = "tensor" if "tensor" in names and mesh.shape["tensor"] > 1 else None
    if batch_axes and batch % math.prod(mesh.shape[a] for a in batch_axes):
        batch_axes = ()  # e.g. an evaluation batch that does not split: run it unsplit
    local_heads = heads // (mesh.shape[head_axis] if head_axis else 1)
    block = splash.BlockSizes(
        block_q=SPLASH_BLOCK, block_kv=SPLASH_BLOCK, block_kv_compute=SPLASH_BLOCK,
        block_q_dkv=SPLASH_BLOCK, block_kv_dkv=SPLASH_BLOCK, block_kv_dkv_compute=SPLASH_BLOCK,
        block_q_dq=SPLASH_BLOCK, block_kv_dq=SPLASH_BLOCK,
    )
    kernel = splash.make_splash_mha(
        splash_mask.MultiHeadMask([splash_mask.FullMask((padded, padded))] * local_heads),
        block_sizes=block,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    segment_ids = splash.SegmentIds(q=segment, kv=segment)

    def per_shard(q, k, v):
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segment_ids))(q, k, v)

    if batch_axes or head_axis:
        from jax.sharding import PartitionSpec as P

        spec = P(batch_axes or None, head_axis, None, None)
        per_shard = jax.shard_map(
            per_shard, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False
        )
    out = per_shard(q, k, v)[:, :, :tokens]
    return jnp.transpose(out, (0, 2, 1, 3)).astype(qkv.dtype)


def einsum_attention(qkv: jax.Array, lean: bool = True) -> jax.Array:
    """Plain softmax attention with heads-major operands: [B, N, 3, h, d] -> [B, N, h, d].

    One transpose of the fused qkv to [3, B, h, N, d] makes both batched matmuls contiguous;
    jax.nn.dot_product_attention keeps [B, N, h, d] operands plus a grouped-query axis, and
    XLA's CPU layout assignment then copies the [B, h, N, N] score matrices in the backward
    pass. Softmax runs in float32 like dot_product_attention's. With `lean` the backward is
    `_lean_attention`'s (no [B, h, N, N] array kept between the passes), else autodiff's.
    """
    head_dim = qkv.shape[-1]
    q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    out = (_lean_attention if lean else softmax_attention)(q, k, v)
    return jnp.transpose(out, (0, 2, 1, 3))


def _attention_probs(
    q: jax.Array, k: jax.Array, lse: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """float32 softmax(q k^T) over keys and its log-sum-exp [B, h, N, 1]; with `lse` given
    (the backward's recomputation) it is used instead of being computed again."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if lse is None:
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return jnp.exp(logits - lse), lse


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v for [B, h, N, d] operands (q already scaled); autodiff backward."""
    probs, _ = _attention_probs(q, k)
    return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)


@jax.custom_vjp
def _lean_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`softmax_attention` with a lean backward.

    Autodiff of the plain formula keeps the [B, h, N, N] probabilities and the exp before
    normalisation for the backward: two of them per block, the largest residuals of the
    step at 224 px and above. This version keeps q, k, v and the per-query log-sum-exp, and
    the backward recomputes the probabilities (one extra q k^T matmul per block), as flash
    attention does.
    """
    return softmax_attention(q, k, v)


def _lean_attention_fwd(q, k, v):
    probs, lse = _attention_probs(q, k)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)
    return out, (q, k, v, lse)


def _lean_attention_bwd(residuals, d_out):
    q, k, v, lse = residuals
    k = after(k, d_out)  # the recomputation starts in this block's backward (layers.after)
    probs, _ = _attention_probs(q, k, lse)
    d_v = jnp.einsum("bhqk,bhqd->bhkd", probs.astype(d_out.dtype), d_out)
    d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
    d_logits = d_logits.astype(q.dtype)
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k)
    d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits, q)
    return d_q, d_k, d_v.astype(v.dtype)


_lean_attention.defvjp(_lean_attention_fwd, _lean_attention_bwd)
