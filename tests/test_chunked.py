"""ssl/chunked.py: the prototype layer + DINO / iBOT losses chunked over prototypes equal the
materialised path (float64 NumPy references; `ssl_loss` both ways, values and gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raddino_jax.models import init_params
from raddino_jax.ssl import chunked, losses
from raddino_jax.ssl.objective import ObjectiveConfig, ssl_loss
from tests.tiny import tiny_dataset, tiny_spec

N, D, K, CHUNK = 12, 8, 32, 8


def _problem(seed: int = 0, n: int = N):
    """Unit-norm features (as the head's bottleneck) and weight-normalised prototypes, so the
    logits are cosines in [-1, 1] as in training."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = rng.normal(size=(D, K))
    w /= np.linalg.norm(w, axis=0, keepdims=True)
    return x, w


def _materialise(targets: chunked.TeacherTargets) -> np.ndarray:
    """The [n, K] probabilities the potentials stand for, float64."""
    z = np.asarray(targets.features, np.float64) @ np.asarray(targets.kernel, np.float64)
    log_p = z * float(targets.inv_temperature) + np.asarray(targets.row)[:, None]
    log_p = log_p + np.asarray(targets.col)[None]
    return np.where(np.asarray(targets.valid)[:, None], np.exp(log_p), 0.0)


def _np_sinkhorn(z, temperature, n_iterations, valid):
    """The reference algorithm on the valid rows, float64 (Q = exp(z / T)^T, [K, B])."""
    q = np.exp(z[valid] / temperature).T
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True) * q.shape[0]
        q /= q.sum(axis=0, keepdims=True) * q.shape[1]
    out = np.zeros_like(z)
    out[valid] = (q * q.shape[1]).T
    return out


def test_centered_targets_match_float64_softmax():
    x, w = _problem()
    center = np.random.default_rng(1).normal(scale=0.3, size=K)
    valid = np.arange(N) % 4 != 3
    targets = chunked.centered_targets(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(center, jnp.float32),
        0.04, jnp.asarray(valid), CHUNK,
    )
    scaled = (x @ w - center) / 0.04
    expected = np.exp(scaled - scaled.max(1, keepdims=True))
    expected = np.where(valid[:, None], expected / expected.sum(1, keepdims=True), 0.0)
    np.testing.assert_allclose(_materialise(targets), expected, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("n_iterations", [0, 3])
def test_sinkhorn_targets_match_float64_reference(n_iterations):
    x, w = _problem(2)
    valid = np.arange(N) % 5 != 0
    targets = chunked.sinkhorn_targets(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), 0.05, n_iterations,
        jnp.asarray(valid), CHUNK,
    )
    expected = _np_sinkhorn(x @ w, 0.05, n_iterations, valid)
    np.testing.assert_allclose(_materialise(targets), expected, atol=2e-6, rtol=5e-5)
    # And the materialised JAX path gives the same targets.
    direct = losses.sinkhorn_knopp_teacher(jnp.asarray(x @ w, jnp.float32), 0.05, n_iterations,
                                           jnp.asarray(valid))
    np.testing.assert_allclose(_materialise(targets), np.asarray(direct), atol=2e-6, rtol=5e-5)


def test_cross_entropy_value_and_gradients_match_float64():
    """Per-row CE and the gradients of sum(g * CE) in features and prototype weights against the
    analytic float64 forms: dz = g (S softmax(z / tau) - q) / tau, dx = dz W^T, dW = x^T dz."""
    x_t, w_t = _problem(3)
    x_s, w_s = _problem(4)
    tau = 0.1
    targets = chunked.centered_targets(
        jnp.asarray(x_t, jnp.float32), jnp.asarray(w_t, jnp.float32), jnp.zeros(K), 0.04,
        jnp.ones(N, bool), CHUNK,
    )
    g = np.random.default_rng(5).uniform(0.5, 2.0, size=N)

    def objective(x, w):
        ce = chunked.chunked_cross_entropy(x, w, targets, tau, CHUNK)
        return jnp.sum(jnp.asarray(g, jnp.float32) * ce), ce

    (_, ce), (d_x, d_w) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
        jnp.asarray(x_s, jnp.float32), jnp.asarray(w_s, jnp.float32)
    )
    p = _materialise(targets)
    u = x_s @ w_s / tau
    log_q = u - u.max(1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(1, keepdims=True))
    np.testing.assert_allclose(np.asarray(ce), -(p * log_q).sum(1), rtol=2e-5)
    d_z = g[:, None] * (np.exp(log_q) - p) / tau
    np.testing.assert_allclose(np.asarray(d_x), d_z @ w_s.T, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(d_w), x_s.T @ d_z, atol=2e-5, rtol=1e-4)


def test_dino_terms_match_the_materialised_losses():
    """Loss, teacher entropy, KL and gradients: `losses.dino_loss` / `entropy` /
    `mean_kl_divergence` on the [rows, K] arrays vs `dino_terms` (S=6, T=2, B=3)."""
    n_student, n_teacher, batch, tau = 6, 2, 3, 0.1
    x_s, w_s = _problem(6, n_student * batch)
    x_t, w_t = _problem(7, n_teacher * batch)
    targets = chunked.sinkhorn_targets(
        jnp.asarray(x_t, jnp.float32), jnp.asarray(w_t, jnp.float32), 0.04, 3,
        jnp.ones(n_teacher * batch, bool), CHUNK,
    )
    probs = jnp.asarray(_materialise(targets), jnp.float32)

    def chunked_loss(x, w):
        loss, entropy, kl = chunked.dino_terms(x.reshape(n_student, batch, D), w, targets, tau,
                                               CHUNK)
        return loss, (entropy, kl)

    def direct_loss(x, w):
        logits = (x @ w).reshape(n_student, batch, K)
        teacher = probs.reshape(n_teacher, batch, K)
        loss = losses.dino_loss(logits, teacher, tau)
        swapped = teacher[::-1].reshape(-1, K)
        kl = losses.mean_kl_divergence(swapped, logits[:n_teacher].reshape(-1, K), tau)
        return loss, (losses.entropy(probs), kl)

    args = (jnp.asarray(x_s, jnp.float32), jnp.asarray(w_s, jnp.float32))
    (got, got_aux), got_grads = jax.jit(jax.value_and_grad(chunked_loss, (0, 1), has_aux=True))(
        *args
    )
    (want, want_aux), want_grads = jax.jit(jax.value_and_grad(direct_loss, (0, 1), has_aux=True))(
        *args
    )
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_aux), np.asarray(want_aux), rtol=1e-4, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_ibot_padding_rows_are_ignored_even_when_nan():
    x_s, w = _problem(8)
    x_t, _ = _problem(9)
    weights = np.where(np.arange(N) % 3 == 0, 0.0, 0.25)
    valid = weights != 0
    targets = chunked.centered_targets(
        jnp.asarray(x_t, jnp.float32), jnp.asarray(w, jnp.float32), jnp.zeros(K), 0.05,
        jnp.asarray(valid), CHUNK,
    )
    garbage = np.where(valid[:, None], x_s, np.nan)

    def loss(x, w_):
        return chunked.ibot_loss(x, w_, targets, jnp.asarray(weights), 8, 0.1, CHUNK)

    value, (d_x, d_w) = jax.jit(jax.value_and_grad(loss, (0, 1)))(
        jnp.asarray(garbage, jnp.float32), jnp.asarray(w, jnp.float32)
    )
    p = _materialise(targets)
    expected = losses.ibot_loss(jnp.asarray(x_s @ w, jnp.float32), jnp.asarray(p, jnp.float32),
                                jnp.asarray(weights), 8, 0.1)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(d_w)))
    np.testing.assert_array_equal(np.asarray(d_x)[~valid], 0.0)


def test_next_center_from_features_equals_the_logits_mean():
    x, w = _problem(10)
    valid = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0], bool)  # the last group has none
    center = jnp.full((K,), 0.1, jnp.float32)
    got = chunked.next_center(center, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                              0.9, jnp.asarray(valid), n_groups=3)
    want = losses.update_center(center, jnp.asarray(x @ w, jnp.float32), 0.9,
                                valid=jnp.asarray(valid), n_groups=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_chunk_must_divide_the_prototypes():
    x, w = _problem()
    with pytest.raises(ValueError, match="ssl.prototype_chunk 5 .* 32"):
        chunked.centered_targets(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                                 jnp.zeros(K), 0.04, jnp.ones(N, bool), 5)


@functools.cache
def _batch():
    batch = next(iter(tiny_dataset(batch=4, group=2)))
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("centering,dtype", [("sinkhorn_knopp", "float32"),
                                             ("centering", "bfloat16")])
def test_ssl_loss_chunked_equals_materialised(centering, dtype):
    """The whole objective both ways: loss, monitors, next centres and the student's gradients
    (float32: 1e-5 relative; bfloat16 heads: the bf16 rounding of the logits, 2e-2)."""
    spec = tiny_spec(k=64)  # one block: the backbone only carries the gradient to the heads
    spec = spec.replace(backbone=spec.backbone.replace(depth=1),
                        dino_head=spec.dino_head.replace(dtype=dtype))
    student, teacher = init_params(spec, 0), init_params(spec, 1)
    center = jnp.asarray(np.random.default_rng(0).normal(scale=0.1, size=64), jnp.float32)
    batch = _batch()

    def run(chunk):
        cfg = ObjectiveConfig(centering=centering, koleo_group_size=2, prototype_chunk=chunk)

        def loss(s):
            return ssl_loss(s, teacher, center, center, batch, jax.random.key(0),
                            jnp.float32(0.05), spec=spec, cfg=cfg)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(student)

    (got, got_aux), got_grads = run(16)
    (want, want_aux), want_grads = run(0)
    rtol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(float(got), float(want), rtol=rtol)
    for key in ("dino_loss", "ibot_loss", "teacher_entropy", "student_teacher_kl",
                "next_dino_center", "next_ibot_center"):
        np.testing.assert_allclose(np.asarray(got_aux[key]), np.asarray(want_aux[key]),
                                   rtol=rtol, atol=1e-6 if dtype == "float32" else 2e-3,
                                   err_msg=key)
    flat_got, flat_want = jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)
    for a, b in zip(flat_got, flat_want):
        scale = float(np.max(np.abs(np.asarray(b)))) + 1e-12
        tol = 1e-4 if dtype == "float32" else 5e-2
        assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= tol * scale


def test_config_refuses_a_chunk_that_does_not_divide_the_prototypes():
    from raddino_jax.config import ConfigError, base_config, validate

    config = base_config()
    config.ssl.prototype_chunk = 1000
    with pytest.raises(ConfigError, match="config.ssl.prototype_chunk: 1000 does not divide"):
        validate(config, n_devices=1, process_count=1)
