"""The heads' prototype layer and the DINO / iBOT cross-entropies, chunked over prototypes.

With K = 65,536 prototypes the ``[rows, K]`` float32 logits of the masked-token buffer are the
largest arrays of the step (thousands of rows per device: GBs per copy), and every pass over
them (centring and sharpening, the Sinkhorn-Knopp iterations, the softmax, its gradient) is
bound by memory traffic, not arithmetic. Here the prototype layer (bottleneck -> K) runs one
chunk of ``chunk`` prototypes at a time and each chunk's logits are used at once, so no
``[rows, K]`` array is ever written: the price is recomputing the small bottleneck x prototype
matmul (bottleneck 256) in each pass. ``ssl.prototype_chunk`` (0: off) switches it on; the
values equal the materialised path's (``tests/test_chunked.py``).

Teacher targets are kept as potentials. Both centrings give probabilities of the form
``p[n, k] = exp(z[n, k] / T + row[n] + col[k])`` on valid rows and 0 elsewhere, ``z = x_t @ W_t``:
- centring (recipe s3): ``col = -c / T``, ``row = -logsumexp_k((z - c) / T)``;
- Sinkhorn-Knopp (log domain, as `losses.sinkhorn_knopp_teacher`): ``row`` and ``col`` are the
  scaling potentials, each iteration one pass over the chunks.
Only ``row [n]`` and ``col [K]`` are stored. The centre update is linear in the logits, so it is
computed exactly from the mean *features*: ``mean_n(z) = mean_n(x_t) @ W_t``.

The student side is one `custom_vjp`: the forward keeps one log-sum-exp per row (online over the
chunks) and the cross term ``<q, z / tau>``; the backward recomputes each chunk's softmax and
targets and writes the gradients of the features and of the prototype weights chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from raddino_jax.ssl import losses


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TeacherTargets:
    """Teacher probabilities ``exp(features @ kernel * inv_temperature + row + col)`` on valid
    rows (0 elsewhere), never materialised.

    features [n, d] in the head's compute dtype; kernel [d, K] (the weight-normalised prototype
    weights); inv_temperature a float32 scalar; row [n]; col [K]; valid bool[n].
    """

    features: jax.Array
    kernel: jax.Array
    inv_temperature: jax.Array
    row: jax.Array
    col: jax.Array
    valid: jax.Array


def _chunks(kernel: jax.Array, chunk: int) -> jax.Array:
    """[d, K] -> [K / chunk, d, chunk]: the scan's per-chunk prototype weights."""
    d, k = kernel.shape
    if chunk <= 0 or k % chunk:
        raise ValueError(
            f"ssl.prototype_chunk {chunk} must be > 0 and divide the heads' prototypes "
            f"(model.head_out_dim) {k}"
        )
    return kernel.reshape(d, k // chunk, chunk).transpose(1, 0, 2)


def _logits(x: jax.Array, kernel_chunk: jax.Array) -> jax.Array:
    """[n, d] x [d, c] -> float32 [n, c]: operands in x's dtype, float32 accumulation (as the
    head's `WeightNormLinear`)."""
    return jnp.dot(x, kernel_chunk.astype(x.dtype), preferred_element_type=jnp.float32)


def _lse_update(carry: tuple[jax.Array, jax.Array], x: jax.Array):
    """Online log-sum-exp over the last axis: (running max, running sum of exp(x - max))."""
    top, total = carry
    new_top = jnp.maximum(top, jnp.max(x, axis=-1))
    total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(x - new_top[:, None]), axis=-1)
    return new_top, total


def _lse_init(n: int) -> tuple[jax.Array, jax.Array]:
    return jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32)


def _scaled_logits(features, kernel_chunk, inv_temperature, col_chunk):
    """Teacher ``z / T + col`` of one chunk, float32 [n, c]."""
    return _logits(features, kernel_chunk) * inv_temperature + col_chunk[None, :]


def _row_lse(features, kernels, inv_temperature, cols) -> jax.Array:
    """[n]: logsumexp over prototypes of ``z / T + col`` per row, online over the chunks
    (kernels [K / c, d, c], cols [K / c, c])."""

    def body(carry, xs):
        kernel_chunk, col_chunk = xs
        scaled = _scaled_logits(features, kernel_chunk, inv_temperature, col_chunk)
        return _lse_update(carry, scaled), None

    (top, total), _ = jax.lax.scan(body, _lse_init(features.shape[0]), (kernels, cols))
    return top + jnp.log(total)


def _teacher_chunk(targets: TeacherTargets, kernel_chunk, col_chunk):
    """(probabilities, log-probabilities) of one chunk, float32 [n, c]; invalid rows 0."""
    log_p = _scaled_logits(targets.features, kernel_chunk, targets.inv_temperature, col_chunk)
    log_p = log_p + targets.row[:, None]
    keep = targets.valid[:, None]
    return jnp.where(keep, jnp.exp(log_p), 0.0), jnp.where(keep, log_p, 0.0)


def centered_targets(
    features: jax.Array,
    kernel: jax.Array,
    center: jax.Array,
    temperature: jax.Array | float,
    valid: jax.Array,
    chunk: int,
) -> TeacherTargets:
    """``softmax((z - c) / T)`` per valid row (recipe s3) as potentials: one pass over chunks."""
    inv_temperature = 1.0 / jnp.asarray(temperature, jnp.float32)
    col = -jnp.asarray(center, jnp.float32) * inv_temperature
    lse = _row_lse(features, _chunks(kernel, chunk), inv_temperature, col.reshape(-1, chunk))
    row = jnp.where(valid, -lse, 0.0)
    return jax.lax.stop_gradient(
        TeacherTargets(features, kernel, inv_temperature, row, col, jnp.asarray(valid, bool))
    )


def sinkhorn_targets(
    features: jax.Array,
    kernel: jax.Array,
    temperature: jax.Array | float,
    n_iterations: int,
    valid: jax.Array,
    chunk: int,
) -> TeacherTargets:
    """Sinkhorn-Knopp targets (recipe s3), the log-domain iterations of
    `losses.sinkhorn_knopp_teacher` with each normalisation one pass over the chunks: the
    per-prototype potential chunk by chunk, the per-sample one by an online log-sum-exp.
    Invalid rows stay out of every sum; valid rows sum to 1."""
    valid = jnp.asarray(valid, bool)
    inv_temperature = 1.0 / jnp.asarray(temperature, jnp.float32)
    n_rows, n_prototypes = features.shape[0], kernel.shape[1]
    kernels = _chunks(kernel, chunk)
    log_total = jnp.log(jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0))
    log_prototypes = jnp.log(jnp.float32(n_prototypes))

    def col_potential(row):  # -> [K]: -logsumexp over valid rows of z / T + row, per prototype
        def body(_, kernel_chunk):
            scaled = _logits(features, kernel_chunk) * inv_temperature + row[:, None]
            lse = jax.nn.logsumexp(scaled, axis=0, where=valid[:, None])
            return None, jnp.where(jnp.isfinite(lse), -lse, 0.0)

        return jax.lax.scan(body, None, kernels)[1].reshape(-1)

    def row_lse(col):  # -> [n]: logsumexp over prototypes of z / T + col, per row
        return _row_lse(features, kernels, inv_temperature, col.reshape(-1, chunk))

    row = jnp.zeros((n_rows,), jnp.float32)
    col = jnp.zeros((n_prototypes,), jnp.float32)
    if n_iterations == 0:  # only Q /= sum(Q)
        lse_all = jax.nn.logsumexp(row_lse(col), where=valid)
        col = col - jnp.where(jnp.isfinite(lse_all), lse_all, 0.0)
    for _ in range(n_iterations):
        col = col_potential(row) - log_prototypes
        row = jnp.where(valid, -row_lse(col), 0.0) - log_total
    # Q *= B_tot: each valid row becomes a distribution.
    row = jnp.where(valid, row + log_total, 0.0)
    return jax.lax.stop_gradient(
        TeacherTargets(features, kernel, inv_temperature, row, col, valid)
    )


def next_center(
    center: jax.Array,
    features: jax.Array,
    kernel: jax.Array,
    momentum: float | jax.Array,
    valid: jax.Array | None = None,
    n_groups: int = 1,
) -> jax.Array:
    """`losses.update_center` from features: the batch mean of the logits is the batch mean of
    the (float32) features times the prototype weights, so no [n, K] logits are needed. With
    `valid`, the mean of per-group means over valid rows (the masked-token buffer's semantics)."""
    means = losses.group_means(features, valid, n_groups)
    batch_logits = jnp.dot(means, jnp.asarray(kernel, jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
    return losses.update_center(center, jax.lax.stop_gradient(batch_logits), momentum)


# ----------------------------------------------------------------------------------------------
# Student cross-entropy
# ----------------------------------------------------------------------------------------------

Mix = Callable[[jax.Array], jax.Array]


def _identity(p: jax.Array) -> jax.Array:
    return p


def _student_chunks(kernel, targets: TeacherTargets, chunk: int):
    """The scan inputs of the student side: per chunk (student kernel, teacher kernel, col)."""
    return _chunks(kernel, chunk), _chunks(targets.kernel, chunk), targets.col.reshape(-1, chunk)


def _student_chunk(x, targets: TeacherTargets, mix: Mix, inv_tau, xs):
    """(scaled student logits u, mixed teacher targets q) of one chunk, float32 [n_s, c]."""
    kernel_chunk, teacher_chunk, col_chunk = xs
    u = _logits(x, kernel_chunk) * inv_tau
    return u, mix(_teacher_chunk(targets, teacher_chunk, col_chunk)[0])


def _forward(x, kernel, targets, mix, inv_tau, chunk):
    """(per-row cross-entropy [n_s], its residual log-sum-exp [n_s], target mass [n_s])."""
    mass = mix(targets.valid[:, None].astype(jnp.float32))[:, 0]

    def body(carry, xs):
        lse_carry, cross = carry
        u, q = _student_chunk(x, targets, mix, inv_tau, xs)
        return (_lse_update(lse_carry, u), cross + jnp.sum(q * u, axis=-1)), None

    init = (_lse_init(x.shape[0]), jnp.zeros((x.shape[0],), jnp.float32))
    ((top, total), cross), _ = jax.lax.scan(body, init, _student_chunks(kernel, targets, chunk))
    lse = top + jnp.log(total)
    return mass * lse - cross, lse, mass


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _cross_entropy(x, kernel, targets, mix, inv_tau, chunk):
    return _forward(x, kernel, targets, mix, inv_tau, chunk)[0]


def _cross_entropy_fwd(x, kernel, targets, mix, inv_tau, chunk):
    out, lse, mass = _forward(x, kernel, targets, mix, inv_tau, chunk)
    return out, (x, kernel, targets, lse, mass)


def _cross_entropy_bwd(mix, inv_tau, chunk, residuals, grad):
    x, kernel, targets, lse, mass = residuals

    def body(d_x, xs):
        kernel_chunk = xs[0]
        u, q = _student_chunk(x, targets, mix, inv_tau, xs)
        # d/du [S lse(u) - <q, u>] = S softmax(u) - q
        d_u = grad[:, None] * (mass[:, None] * jnp.exp(u - lse[:, None]) - q)
        d_z = (d_u * inv_tau).astype(x.dtype)
        d_x = d_x + jnp.dot(d_z, kernel_chunk.astype(x.dtype).T,
                            preferred_element_type=jnp.float32)
        return d_x, jnp.dot(x.T, d_z, preferred_element_type=jnp.float32)

    xs = _student_chunks(kernel, targets, chunk)
    d_x, d_kernel = jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), xs)
    d_kernel = d_kernel.transpose(1, 0, 2).reshape(kernel.shape)
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype), None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def chunked_cross_entropy(
    features: jax.Array,
    kernel: jax.Array,
    targets: TeacherTargets,
    student_temperature: float,
    chunk: int,
    mix: Mix = _identity,
) -> jax.Array:
    """Per student row ``-sum_k q_k log softmax(features @ kernel / tau)_k``, ``q = mix(p)``.

    Args:
      features: ``[n_s, d]`` student features in the head's compute dtype (rows whose targets
        are all zero must be finite: zero them).
      kernel: ``[d, K]`` student prototype weights (differentiable, as `features`).
      targets: the teacher's (constant) targets, ``n_t`` rows.
      student_temperature: ``tau`` (a Python float).
      chunk: prototypes per chunk; divides K.
      mix: a linear map of teacher rows to student rows applied per chunk, ``[n_t, c] ->
        [n_s, c]`` (DINO's crop pairs; the identity for iBOT). Static: pass the same function
        object each call.

    Returns:
      ``[n_s]`` float32 cross-entropies (scaled by each row's target mass, as
      `losses.soft_cross_entropy`).
    """
    return _cross_entropy(features, kernel, jax.lax.stop_gradient(targets), mix,
                          1.0 / float(student_temperature), chunk)


# ----------------------------------------------------------------------------------------------
# DINO and iBOT terms
# ----------------------------------------------------------------------------------------------


@functools.cache
def _dino_pairs(n_student: int, n_teacher: int) -> Mix:
    """Student row (s, b) gets the sum of teacher rows (t, b) over t != s (recipe s3)."""

    def mix(p):
        p = p.reshape(n_teacher, -1, p.shape[-1])
        q = jnp.broadcast_to(jnp.sum(p, axis=0), (n_student, *p.shape[1:]))
        return q.at[:n_teacher].add(-p).reshape(-1, p.shape[-1])

    return mix


@functools.cache
def _swapped(n_teacher: int) -> Mix:
    """Student global row (s, b) against teacher row (T - 1 - s, b): the crop swap."""

    def mix(p):
        return p.reshape(n_teacher, -1, p.shape[-1])[::-1].reshape(-1, p.shape[-1])

    return mix


def _teacher_entropy(targets: TeacherTargets, chunk: int) -> jax.Array:
    """Mean over valid rows of ``-sum_k p log p`` (float32 scalar; `losses.entropy`)."""

    def body(acc, xs):
        p, log_p = _teacher_chunk(targets, *xs)
        return acc - jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1), None

    xs = (_chunks(targets.kernel, chunk), targets.col.reshape(-1, chunk))
    per_row, _ = jax.lax.scan(body, jnp.zeros(targets.row.shape, jnp.float32), xs)
    return jnp.sum(per_row) / jnp.maximum(jnp.sum(targets.valid, dtype=jnp.float32), 1.0)


def dino_terms(
    student_features: jax.Array,
    student_kernel: jax.Array,
    targets: TeacherTargets,
    student_temperature: float,
    chunk: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(DINO loss, teacher entropy, student-teacher KL): `losses.dino_loss`,
    `losses.entropy` and `losses.mean_kl_divergence` of the objective, chunked.

    student_features: ``[S, B, d]``, globals first (the teacher's crops, in its order), then
    locals; `targets` has ``T * B`` rows, crop-major.
    """
    n_student, batch, d = student_features.shape
    n_teacher = targets.row.shape[0] // batch
    n_pairs = n_student * n_teacher - n_teacher
    if n_teacher > n_student or n_pairs == 0:
        raise ValueError(f"need 1 <= T <= S with a pair s != t, got T={n_teacher}, S={n_student}")
    rows = student_features.reshape(-1, d)
    cross_entropy = chunked_cross_entropy(
        rows, student_kernel, targets, student_temperature, chunk,
        _dino_pairs(n_student, n_teacher),
    )
    loss = jnp.sum(cross_entropy) / (batch * n_pairs)
    entropy = _teacher_entropy(targets, chunk)
    # KL(p_swapped || q_student) = CE - H(p); the swapped rows are the teacher rows reordered.
    globals_ce = chunked_cross_entropy(
        jax.lax.stop_gradient(rows[: n_teacher * batch]),
        jax.lax.stop_gradient(student_kernel),
        targets, student_temperature, chunk, _swapped(n_teacher),
    )
    kl = jnp.mean(globals_ce) - entropy
    return loss, entropy, kl


def ibot_loss(
    student_features: jax.Array,
    student_kernel: jax.Array,
    targets: TeacherTargets,
    token_weights: jax.Array,
    n_crops: int | jax.Array,
    student_temperature: float,
    chunk: int,
) -> jax.Array:
    """`losses.ibot_loss`, chunked: student row m against teacher row m of the masked-token
    buffer, weighted by ``token_weights`` (0 for padding rows, whose features are zeroed first:
    they may be anything), over ``n_crops``."""
    weights = jnp.asarray(token_weights, jnp.float32)
    keep = (weights != 0)[:, None]
    rows = jnp.where(keep, student_features, jnp.zeros((), student_features.dtype))
    cross_entropy = chunked_cross_entropy(rows, student_kernel, targets, student_temperature, chunk)
    return jnp.sum(weights * cross_entropy) / jnp.asarray(n_crops, jnp.float32)
