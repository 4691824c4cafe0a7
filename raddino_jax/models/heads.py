"""DINO / iBOT projection heads (recipe s2).

MLP D -> hidden -> hidden -> bottleneck (GELU between, biases on), L2-normalised bottleneck, then a
weight-normalised Linear(bottleneck -> K) without bias whose gain g trains and gets weight decay
(DINOv2 does not freeze g). Parameter names follow the checkpoint layout: `mlp.{0,1,2}` are torch's
`mlp.{0,2,4}`; `last_layer.weight_v` is stored [bottleneck, K] (torch [K, bottleneck]) and
`last_layer.weight_g` is [K] (torch [K, 1]).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from raddino_jax.models.layers import gelu
from raddino_jax.models.vit import COMPUTE_DTYPES, PARAM_DTYPE, linear


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    in_dim: int = 768
    out_dim: int = 65536  # K prototypes
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    dtype: str = "float32"

    def replace(self, **kwargs: Any) -> HeadConfig:
        return dataclasses.replace(self, **kwargs)


class WeightNormLinear(nnx.Module):
    """y = x @ (g * v / ||v||), norms per output unit (torch weight_norm with dim=0), no bias."""

    def __init__(self, din: int, dout: int, dtype, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(din)  # torch's default Linear init (applied before weight_norm)
        self.dtype = dtype
        self.weight_v = nnx.Param(
            jax.random.uniform(rngs.params(), (din, dout), PARAM_DTYPE, -bound, bound)
        )
        self.weight_g = nnx.Param(jnp.ones((dout,), dtype=PARAM_DTYPE))

    def kernel(self) -> jax.Array:
        """The effective weight ``g * v / ||v||`` [din, dout] in the parameter dtype."""
        v = self.weight_v[...]
        return v * (self.weight_g[...] / jnp.linalg.norm(v, axis=0))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., din] -> float32 [..., dout]: operands in the compute dtype, accumulation and
        output in float32 (the logits feed a 0.04-0.1 temperature softmax; docs/conventions.md,
        "Accumulate in float32")."""
        kernel = self.kernel().astype(self.dtype)
        return jnp.dot(x.astype(self.dtype), kernel, preferred_element_type=jnp.float32)


class DINOHead(nnx.Module):
    """[..., in_dim] -> logits [..., K] (float32)."""

    def __init__(self, cfg: HeadConfig, *, rngs: nnx.Rngs):
        if cfg.nlayers < 1:
            raise ValueError(f"head nlayers must be >= 1, got {cfg.nlayers}")
        dtype = COMPUTE_DTYPES[cfg.dtype]
        self.cfg = cfg
        dims = [cfg.in_dim] + [cfg.hidden_dim] * (cfg.nlayers - 1) + [cfg.bottleneck_dim]
        self.mlp = nnx.List([linear(a, b, rngs, dtype) for a, b in zip(dims[:-1], dims[1:])])
        # The bottleneck output is L2-normalised in float32: accumulate and return it in float32.
        self.mlp[-1].preferred_element_type = jnp.float32
        self.last_layer = WeightNormLinear(cfg.bottleneck_dim, cfg.out_dim, dtype, rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """[..., in_dim] -> float32 [..., bottleneck]: the MLP and the L2 normalisation, i.e.
        everything before the prototypes (`ssl/chunked.py` applies those chunk by chunk)."""
        for i, layer in enumerate(self.mlp):
            x = layer(x)
            if i < len(self.mlp) - 1:
                x = gelu(x)
        x = x.astype(jnp.float32)
        # torch F.normalize(eps=1e-12) in fp32 (recipe s2)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.last_layer(self.features(x)).astype(jnp.float32)
