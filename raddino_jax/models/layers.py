"""Memory-lean building blocks: exact GELU and LayerNorm with hand-written backward passes.

Autodiff of the textbook formulas keeps every intermediate of the forward for the backward:
GELU's erfc and exp outputs, LayerNorm's centred input and normalised output, each one a full
[tokens, width] array per block. On the CPU step they were about a third of what the step saves
for its backward (docs/architecture.md, "Memory: lean backward passes"); these versions keep
only what the backward needs and recompute the cheap rest:

- `gelu`: keeps its input; the backward recomputes Phi(x) and phi(x) (elementwise, fused).
- `layer_norm`: keeps its input and the per-token mean and reciprocal standard deviation.

Values equal `jax.nn.gelu(approximate=False)` and `flax.nnx.LayerNorm` to float rounding
(tests/test_layers.py checks values and gradients).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def exact_gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, x * Phi(x), computed in float32 and returned in x's dtype; autodiff
    backward (what a step lowered for TPU uses, `ViTConfig.lean_backward`)."""
    x32 = x.astype(jnp.float32)
    return (x32 * (0.5 * jax.lax.erfc(-x32 * _INV_SQRT2))).astype(x.dtype)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """`exact_gelu` whose backward keeps only x (the lean version)."""
    return exact_gelu(x)


def _gelu_fwd(x):
    return gelu(x), x


def after(x: jax.Array, g: jax.Array) -> jax.Array:
    """x, made data-dependent on the gradient g (x + 0 * one element of g).

    A recomputation in a backward rule must not start before that layer's backward does, or
    XLA may hoist every layer's recomputation to the end of the forward and hold all of their
    intermediates at once (it does on CPU, whose pipeline drops optimization barriers before
    scheduling). A data dependency pins it on every backend; a NaN in g already makes every
    gradient NaN, so the term changes nothing.
    """
    first = jax.lax.slice(g, (0,) * g.ndim, (1,) * g.ndim).reshape(())
    return x + (0.0 * first).astype(x.dtype)


def _gelu_bwd(x, g):
    # The barrier keeps the recomputation out of the forward's fusions (on CPU it also made
    # this backward ~25% faster); `after` (used by the attention) would pin it harder, but
    # the GELU recompute is elementwise and cheap to hold.
    x, g = jax.lax.optimization_barrier((x, g))
    x32 = x.astype(jnp.float32)
    cdf = 0.5 + 0.5 * jax.lax.erf(x32 * _INV_SQRT2)
    density = jnp.exp(-0.5 * x32 * x32) * _INV_SQRT_2PI
    return ((g.astype(jnp.float32) * (cdf + x32 * density)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def _normalise(x32: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x_hat, mean, rstd) over the last axis, two-pass variance in float32."""
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return centred * rstd, mean, rstd


def plain_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis: statistics in float32, result in x's dtype; autodiff
    backward."""
    x_hat, _, _ = _normalise(x.astype(jnp.float32), eps)
    return (x_hat * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """`plain_layer_norm` whose backward keeps x, mean and rstd (the lean version)."""
    return plain_layer_norm(x, scale, bias, eps)


def _layer_norm_fwd(x, scale, bias, eps):
    x_hat, mean, rstd = _normalise(x.astype(jnp.float32), eps)
    y = (x_hat * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
    return y, (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, residuals, g):
    del eps
    x, mean, rstd, scale, bias = residuals
    x_hat = (x.astype(jnp.float32) - mean) * rstd
    g32 = g.astype(jnp.float32)
    reduce_axes = tuple(range(g.ndim - 1))
    d_bias = jnp.sum(g32, axis=reduce_axes)
    d_scale = jnp.sum(g32 * x_hat, axis=reduce_axes)
    d_xhat = g32 * scale.astype(jnp.float32)
    d_x = rstd * (
        d_xhat
        - jnp.mean(d_xhat, axis=-1, keepdims=True)
        - x_hat * jnp.mean(d_xhat * x_hat, axis=-1, keepdims=True)
    )
    return d_x.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
    """`flax.nnx.LayerNorm`'s parameters (`scale`, `bias`) and values, with `layer_norm`'s
    lean backward (`lean=False`: autodiff's). `dtype` is the output dtype; statistics are
    always float32."""

    def __init__(self, dim: int, *, epsilon: float, dtype, param_dtype, lean: bool = True):
        self.epsilon = epsilon
        self.dtype = dtype
        self.lean = lean
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        norm = layer_norm if self.lean else plain_layer_norm
        y = norm(x, self.scale[...], self.bias[...], self.epsilon)
        return y.astype(self.dtype)
