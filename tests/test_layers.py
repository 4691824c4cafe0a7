"""The lean-backward layers equal the textbook formulas (autodiff of jax.nn.gelu, flax's
LayerNorm, plain softmax attention) in value and gradient, in float32 and bfloat16, and keep
fewer residuals for the backward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from raddino_jax.models import attention, layers

F32_TOL = dict(rtol=2e-5, atol=2e-6)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def _tol(dtype):
    return F32_TOL if dtype == jnp.float32 else BF16_TOL


def _residual_bytes(f, *args) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, _ in saved_residuals(f, *args))


def _close(a, b, dtype):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **_tol(dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_value_and_gradient_equal_autodiff_of_erf_gelu(dtype):
    x = (3.0 * jax.random.normal(jax.random.key(0), (64, 96))).astype(dtype)
    g = jax.random.normal(jax.random.key(1), (64, 96)).astype(dtype)
    ref = lambda x: jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)  # noqa: E731
    _close(layers.gelu(x), ref(x), dtype)
    ours = jax.vjp(layers.gelu, x)[1](g)[0]
    theirs = jax.vjp(ref, x)[1](g)[0]
    assert ours.dtype == dtype
    _close(ours, theirs, dtype)


def test_gelu_keeps_only_its_input():
    x = jax.random.normal(jax.random.key(0), (128, 256))
    lean = _residual_bytes(lambda x: jnp.sum(layers.gelu(x)), x)
    plain = _residual_bytes(lambda x: jnp.sum(jax.nn.gelu(x, approximate=False)), x)
    assert lean == x.nbytes
    assert plain >= 2 * x.nbytes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_equals_flax_layer_norm(dtype):
    dim = 48
    x = (2.0 + 3.0 * jax.random.normal(jax.random.key(0), (4, 10, dim))).astype(dtype)
    g = jax.random.normal(jax.random.key(1), x.shape).astype(dtype)
    ours = layers.LayerNorm(dim, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32)
    theirs = nnx.LayerNorm(
        dim, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    scale = 1.0 + 0.1 * jax.random.normal(jax.random.key(2), (dim,))
    bias = 0.1 * jax.random.normal(jax.random.key(3), (dim,))
    for module in (ours, theirs):
        module.scale[...] = scale
        module.bias[...] = bias
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))

    def grads(module):
        graphdef, params = nnx.split(module)

        def f(params, x):
            return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) * g)

        return jax.grad(f, argnums=(0, 1))(params, x)

    _close(ours(x), theirs(x), dtype)
    (p_ours, x_ours), (p_theirs, x_theirs) = grads(ours), grads(theirs)
    _close(x_ours, x_theirs, dtype)
    _close(p_ours["scale"][...], p_theirs["scale"][...], dtype)
    _close(p_ours["bias"][...], p_theirs["bias"][...], dtype)


def _plain_attention(qkv):
    q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))
    q = q * jnp.asarray(qkv.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.transpose(jnp.einsum("bhqk,bhkd->bhqd", probs, v), (0, 2, 1, 3))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_einsum_attention_equals_plain_softmax_attention(dtype):
    qkv = jax.random.normal(jax.random.key(0), (2, 37, 3, 4, 16)).astype(dtype)
    g = jax.random.normal(jax.random.key(1), (2, 37, 4, 16)).astype(dtype)
    _close(attention.einsum_attention(qkv), _plain_attention(qkv), dtype)
    ours = jax.vjp(attention.einsum_attention, qkv)[1](g)[0]
    theirs = jax.vjp(_plain_attention, qkv)[1](g)[0]
    _close(ours, theirs, dtype)


def test_einsum_attention_keeps_no_token_by_token_matrix():
    batch, tokens, heads, dim = 2, 64, 4, 8
    qkv = jax.random.normal(jax.random.key(0), (batch, tokens, 3, heads, dim))
    shapes = [
        a.shape for a, _ in saved_residuals(lambda t: attention.einsum_attention(t).sum(), qkv)
    ]
    assert all(tokens not in s[-2:] or s[-1] != tokens for s in shapes), shapes
    plain = [a.shape for a, _ in saved_residuals(lambda t: _plain_attention(t).sum(), qkv)]
    assert (batch, heads, tokens, tokens) in plain  # what the lean version avoids
