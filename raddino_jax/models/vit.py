"""DINOv2 vision transformer backbone in Flax NNX (recipe s1).

Attribute names mirror the dinov2 PyTorch layout (`patch_embed.proj`, `blocks.<i>.attn.qkv`,
`ls1.gamma`, `norm`, ...) so that weight conversion is a declarative rename plus transpose
(`raddino_jax.convert.names`). Parameters are always float32; `ViTConfig.dtype` sets the compute
dtype. The module holds no RNG state: stochastic depth takes an explicit key, so the train step
stays a pure function of (params, batch, key).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from raddino_jax.models.attention import ATTENTION_IMPLS, attention
from raddino_jax.models.interpolate import INTERPOLATE_MODES, resample_grid
from raddino_jax.models.layers import LayerNorm, exact_gelu, gelu

PARAM_DTYPE = jnp.float32
LEAN_BACKWARD = ("", "on", "off")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# model.remat: "none" keeps every activation; "full" recomputes each block's forward in the
# backward (jax.checkpoint_policies.nothing_saveable); "dots" keeps the outputs of the linear
# layers (matmuls without batch dimensions) and recomputes attention, norms and activations.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_REMAT_ALIASES = {"true": "full", "false": "none", "1": "full", "0": "none", "": "none"}


def normalize_remat(value: Any) -> str:
    """A `ViTConfig.remat` policy name; the old booleans (True/"true" -> "full") are accepted."""
    if isinstance(value, bool):
        return "full" if value else "none"
    name = str(value).strip().lower()
    name = _REMAT_ALIASES.get(name, name)
    if name not in REMAT_POLICIES:
        raise ValueError(
            f"remat must be one of {sorted(REMAT_POLICIES)} (or a bool), got {value!r}"
        )
    return name


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture and numerics of one backbone.

    `img_size` fixes the stored positional grid (M = img_size // patch_size); other input sizes
    are handled by interpolation in `interpolate_mode` (see `models.interpolate`).
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 14
    img_size: int = 518
    in_chans: int = 3
    mlp_ratio: float = 4.0
    ffn_layer: str = "mlp"  # "mlp" (GELU) or "swiglu" (ViT-g)
    num_register_tokens: int = 0
    layerscale_init: float = 1e-5
    drop_path_rate: float = 0.0
    interpolate_mode: str = "offset"  # "offset" | "size" | "size_antialias"
    interpolate_offset: float = 0.1
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: str = "none"  # "none" | "full" | "dots" (REMAT_POLICIES); True/False accepted
    # Run the blocks as one jax.lax.scan over their stacked parameters (compiles one block
    # instead of `depth`); the parameter tree keeps one entry per block.
    scan_blocks: bool = False
    # "": by the platform the step is lowered for (`resolve_attention_impl`); "einsum":
    # hand-written softmax attention; "xla" | "cudnn": jax.nn.dot_product_attention with that
    # implementation; "splash": the Pallas TPU splash-attention kernel.
    attention_impl: str = ""
    # Hand-written lean backward passes for GELU, LayerNorm and einsum attention
    # (models/layers.py): "" by the platform the step is lowered for (`ModelSpec.for_platform`:
    # on for CPU and GPU; off for TPU, where XLA schedules remat itself and autodiff's
    # backward compiled 1.4% faster at equal memory), "on" | "off" to force.
    lean_backward: str = ""

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} not a multiple of patch_size {self.patch_size}"
            )
        for field, allowed in (
            ("ffn_layer", ("mlp", "swiglu")),
            ("interpolate_mode", INTERPOLATE_MODES),
            ("dtype", tuple(COMPUTE_DTYPES)),
            ("attention_impl", ATTENTION_IMPLS),
            ("lean_backward", LEAN_BACKWARD),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        object.__setattr__(self, "remat", normalize_remat(self.remat))
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def ffn_hidden(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn_layer == "swiglu":  # recipe s1: round_up_to_8(int(4D * 2/3))
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def lean(self) -> bool:
        """Whether the lean backward passes are used ("" unresolved counts as on)."""
        return self.lean_backward != "off"

    @property
    def compute_dtype(self):
        return COMPUTE_DTYPES[self.dtype]

    def replace(self, **kwargs: Any) -> ViTConfig:
        return dataclasses.replace(self, **kwargs)


# Recipe s1 table. ViT-g ("vit_giant2") is the only SwiGLU model.
ARCHS: dict[str, dict[str, Any]] = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu"),
}


def vit_config(arch: str, **overrides: Any) -> ViTConfig:
    """A `ViTConfig` for a named architecture (`vit_small|vit_base|vit_large|vit_giant2`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    return ViTConfig(**{**ARCHS[arch], **overrides})


# Initialisers, each with an explicit dtype (docs/conventions.md: weakly typed inits recompile).
_trunc_normal_002 = nnx.initializers.truncated_normal(stddev=0.02, dtype=PARAM_DTYPE)


def _normal(std: float):
    return nnx.initializers.normal(stddev=std, dtype=PARAM_DTYPE)


def _torch_default_uniform(fan_in: int):
    """PyTorch's default Linear/Conv init: U(+-1/sqrt(fan_in)) (kaiming_uniform with a=sqrt 5)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=PARAM_DTYPE: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


def linear(din: int, dout: int, rngs: nnx.Rngs, dtype) -> nnx.Linear:
    """Linear with the dinov2 init: trunc_normal(0.02) kernel, zero bias."""
    return nnx.Linear(
        din, dout, dtype=dtype, param_dtype=PARAM_DTYPE, kernel_init=_trunc_normal_002,
        bias_init=nnx.initializers.zeros_init(), rngs=rngs,
    )


def _layer_norm(cfg: ViTConfig) -> LayerNorm:
    """nnx.LayerNorm's parameters and values, with the lean backward unless `cfg.lean_backward`
    is "off" (models/layers.py)."""
    return LayerNorm(
        cfg.embed_dim, epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
        param_dtype=PARAM_DTYPE, lean=cfg.lean,
    )


class PatchEmbed(nnx.Module):
    """Conv(kernel = stride = patch) then flatten to tokens: [B, H, W, C] -> [B, h*w, D]."""

    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        fan_in = cfg.in_chans * cfg.patch_size**2
        self.patch_size = cfg.patch_size
        patch = (cfg.patch_size, cfg.patch_size)
        self.proj = nnx.Conv(
            cfg.in_chans, cfg.embed_dim, patch, strides=patch, padding="VALID",
            dtype=cfg.compute_dtype, param_dtype=PARAM_DTYPE,
            kernel_init=_torch_default_uniform(fan_in), bias_init=_torch_default_uniform(fan_in),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class Attention(nnx.Module):
    """Fused qkv (rows q | k | v, heads contiguous, recipe s1) + output projection."""

    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        dim, dtype = cfg.embed_dim, cfg.compute_dtype
        self.num_heads = cfg.num_heads
        self.attention_impl = cfg.attention_impl
        self.lean = cfg.lean
        self.qkv = linear(dim, 3 * dim, rngs, dtype)
        self.proj = linear(dim, dim, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        with jax.named_scope("attention"):  # sweep/profile.py sums time by these scopes
            out = attention(qkv, self.attention_impl, self.lean)
        return self.proj(out.reshape(batch, tokens, dim))


class Mlp(nnx.Module):
    """fc1 -> exact (erf) GELU -> fc2 (recipe s1: nn.GELU default is the erf form)."""

    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.fc1 = linear(cfg.embed_dim, cfg.ffn_hidden, rngs, cfg.compute_dtype)
        self.fc2 = linear(cfg.ffn_hidden, cfg.embed_dim, rngs, cfg.compute_dtype)
        self.lean = cfg.lean

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2((gelu if self.lean else exact_gelu)(self.fc1(x)))


class SwiGLU(nnx.Module):
    """w12 (D -> 2 hidden, halves x1 | x2) -> silu(x1) * x2 -> w3 (dinov2 SwiGLUFFNFused)."""

    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.w12 = linear(cfg.embed_dim, 2 * cfg.ffn_hidden, rngs, cfg.compute_dtype)
        self.w3 = linear(cfg.ffn_hidden, cfg.embed_dim, rngs, cfg.compute_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x1, x2 = jnp.split(self.w12(x), 2, axis=-1)
        return self.w3(jax.nn.silu(x1) * x2)


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init: float):
        self.gamma = nnx.Param(jnp.full((dim,), init, dtype=PARAM_DTYPE))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Per-sample stochastic depth on a residual branch [B, ...] (recipe s1).

    Equal in expectation to dinov2's batch-subset variant; identity when `key` is None (teacher,
    evaluation) or the rate is 0.
    """
    if key is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class Block(nnx.Module):
    """Pre-norm transformer block: x += DP(LS1(Attn(LN1 x))); x += DP(LS2(FFN(LN2 x)))."""

    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.drop_path_rate = cfg.drop_path_rate
        self.norm1 = _layer_norm(cfg)
        self.attn = Attention(cfg, rngs)
        self.ls1 = LayerScale(cfg.embed_dim, cfg.layerscale_init)
        self.norm2 = _layer_norm(cfg)
        self.mlp = SwiGLU(cfg, rngs) if cfg.ffn_layer == "swiglu" else Mlp(cfg, rngs)
        self.ls2 = LayerScale(cfg.embed_dim, cfg.layerscale_init)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path_rate, k1)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, k2)


def _call_block(block: Block, x: jax.Array, key: jax.Array | None) -> jax.Array:
    return block(x, key)


def run_blocks(
    blocks: Sequence[Block],
    tokens: jax.Array,
    keys: Sequence[jax.Array | None],
    *,
    remat: str,
    scan: bool,
) -> jax.Array:
    """tokens [B, T, D] through `blocks` in order, block i with drop-path key keys[i].

    `remat` names a REMAT_POLICIES entry, applied per block. With `scan` the blocks run as one
    `jax.lax.scan` over their parameters stacked along a new leading axis: XLA compiles one
    block body instead of len(blocks) copies. The stacking happens here, at the call, so the
    parameter tree (checkpoints, converter, optimizer rules, sharding table) keeps its
    `blocks.<i>` entries; the gradient flows back through the stack to each block's leaves.
    The values equal the unrolled loop's (same keys, same ops).
    """
    policy = REMAT_POLICIES[remat]
    if not scan or len(blocks) < 2:
        call = _call_block if remat == "none" else nnx.remat(_call_block, policy=policy)
        for block, key in zip(blocks, keys):
            tokens = call(block, tokens, key)
        return tokens
    graphdef, first = nnx.split(blocks[0])
    treedef = jax.tree.structure(first)
    leaves = [jax.tree.leaves(nnx.split(block)[1]) for block in blocks]
    stacked = [jnp.stack(column) for column in zip(*leaves)]
    stacked_keys = None if keys[0] is None else jnp.stack(list(keys))

    def body(x, xs):
        block_leaves, key = xs
        block = nnx.merge(graphdef, jax.tree.unflatten(treedef, block_leaves))
        return block(x, key), None

    if remat != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    tokens, _ = jax.lax.scan(body, tokens, (stacked, stacked_keys))
    return tokens


class DinoVisionTransformer(nnx.Module):
    """The DINOv2 backbone. Input images are NHWC: [B, H, W, C] with H, W multiples of the patch.

    Token layout [cls, reg_1..reg_R, patches] (recipe s1): masked patch embeddings are replaced
    by `mask_token` before the positional embedding; registers get no positional embedding.
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg, rngs)
        self.cls_token = nnx.Param(_normal(1e-6)(rngs.params(), (1, 1, dim)))
        self.pos_embed = nnx.Param(_trunc_normal_002(rngs.params(), (1, 1 + cfg.grid_size**2, dim)))
        self.mask_token = nnx.Param(jnp.zeros((1, dim), dtype=PARAM_DTYPE))
        if cfg.num_register_tokens:
            self.register_tokens = nnx.Param(
                _normal(1e-6)(rngs.params(), (1, cfg.num_register_tokens, dim))
            )
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.depth)])
        self.norm = _layer_norm(cfg)

    def interpolated_pos_embed(self, grid_hw: tuple[int, int]) -> jax.Array:
        """[1, 1 + h*w, D] positional embedding for a (h, w) patch grid, float32."""
        pos = self.pos_embed[...]
        m = self.cfg.grid_size
        if tuple(grid_hw) == (m, m):  # dinov2 and HF both skip interpolation here
            return pos
        patch = resample_grid(
            pos[0, 1:].reshape(m, m, -1),
            grid_hw,
            self.cfg.interpolate_mode,
            self.cfg.interpolate_offset,
        )
        return jnp.concatenate([pos[:, :1], patch.reshape(1, -1, pos.shape[-1])], axis=1)

    def prepare_tokens(self, x: jax.Array, masks: jax.Array | None = None) -> jax.Array:
        """Images [B, H, W, C] (+ bool masks [B, h*w]) -> tokens [B, 1 + R + h*w, D]."""
        batch, height, width, _ = x.shape
        p = self.cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"input {height}x{width} is not a multiple of patch size {p}")
        dtype = self.cfg.compute_dtype
        tokens = self.patch_embed(x.astype(dtype))
        if masks is not None:
            mask_token = self.mask_token[...].astype(dtype)
            tokens = jnp.where(masks[..., None], mask_token[None], tokens)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (batch, 1, tokens.shape[-1]))
        tokens = jnp.concatenate([cls, tokens], axis=1)
        tokens = tokens + self.interpolated_pos_embed((height // p, width // p)).astype(dtype)
        if self.cfg.num_register_tokens:
            regs = self.register_tokens[...].astype(dtype)
            regs = jnp.broadcast_to(regs, (batch,) + regs.shape[1:])
            tokens = jnp.concatenate([tokens[:, :1], regs, tokens[:, 1:]], axis=1)
        return tokens

    def __call__(
        self,
        x: jax.Array,
        masks: jax.Array | None = None,
        *,
        n_last_blocks: int = 0,
        drop_path_key: jax.Array | None = None,
    ) -> dict[str, Any]:
        """Forward features like dinov2's `forward_features` (+ `get_intermediate_layers`).

        Args:
          x: images [B, H, W, C].
          masks: optional bool [B, h*w]; True patches are replaced by the mask token.
          n_last_blocks: also return the raw outputs of the last n blocks (`intermediates`,
            each [B, T, D]; apply `self.norm` for dinov2's `norm=True`).
          drop_path_key: enables stochastic depth (student training only).

        Returns a dict: x_norm_clstoken [B, D], x_norm_regtokens [B, R, D],
        x_norm_patchtokens [B, h*w, D], x_prenorm [B, T, D], intermediates (tuple), masks.
        """
        tokens = self.prepare_tokens(x, masks)
        keys = (
            jax.random.split(drop_path_key, self.cfg.depth)
            if drop_path_key is not None and self.cfg.drop_path_rate > 0
            else [None] * self.cfg.depth
        )
        # The last n_last_blocks run one at a time: their outputs are returned.
        n_first = self.cfg.depth - n_last_blocks
        run = functools.partial(run_blocks, remat=self.cfg.remat, scan=self.cfg.scan_blocks)
        tokens = run(list(self.blocks)[:n_first], tokens, list(keys)[:n_first])
        intermediates = []
        for i in range(n_first, self.cfg.depth):
            tokens = run([self.blocks[i]], tokens, [keys[i]])
            intermediates.append(tokens)
        normed = self.norm(tokens)
        r = self.cfg.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : 1 + r],
            "x_norm_patchtokens": normed[:, 1 + r :],
            "x_prenorm": tokens,
            "intermediates": tuple(intermediates),
            "masks": masks,
        }

    def get_intermediate_layers(
        self, x: jax.Array, n: int = 1, *, norm: bool = True, reshape: bool = False
    ) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """dinov2's `get_intermediate_layers(return_class_token=True)`: (patch, cls) per block.

        Patch tokens are [B, h*w, D], or [B, h, w, D] with `reshape` (NHWC, not torch's NCHW).
        """
        out = self(x, n_last_blocks=n)
        r = self.cfg.num_register_tokens
        h, w = x.shape[1] // self.cfg.patch_size, x.shape[2] // self.cfg.patch_size
        layers = []
        for layer in out["intermediates"]:
            layer = self.norm(layer) if norm else layer
            patch = layer[:, 1 + r :]
            if reshape:
                patch = patch.reshape(patch.shape[0], h, w, -1)
            layers.append((patch, layer[:, 0]))
        return tuple(layers)
