"""Pure pieces of the DINOv2 / iBOT / KoLeo objective (recipe s3).

Every function here is a pure ``jax.numpy`` function of its arguments: no state, no RNG, no
collectives. All arithmetic runs in float32 whatever the input dtype (bf16 head outputs are cast
up first), as the recipe asks for softmax, log-softmax, Sinkhorn, centering and KoLeo (recipe s4,
"Precision").

Distributed semantics: the reference computes the losses per device and all-reduces the teacher
statistics (centre, Sinkhorn sums). Under ``jax.jit`` with a batch sharded over a mesh, every
``jnp.sum`` / ``jnp.mean`` below is already a *global* reduction, so the teacher statistics match
the all-reduced reference, and the losses equal the reference's mean over devices whenever every
device holds the same number of rows (what the reference's gradient averaging computes). KoLeo
is the exception: it is per device batch in the reference, hence :func:`koleo_loss_grouped`.

Names: ``n`` rows (samples or tokens), ``K`` prototypes, ``S`` student crops, ``T`` teacher
crops, ``B`` images per crop, ``M`` masked-token buffer rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# torch F.normalize(eps=1e-8) and F.pairwise_distance(eps=1e-8) in dinov2's KoLeoLoss (recipe s3).
_KOLEO_EPS = 1e-8

_HIGHEST = jax.lax.Precision.HIGHEST


def _f32(x: jax.Array) -> jax.Array:
    """Casts an array to float32 (no-op when it already is)."""
    return jnp.asarray(x, dtype=jnp.float32)


# ----------------------------------------------------------------------------------------------
# Teacher targets
# ----------------------------------------------------------------------------------------------


def softmax_center_teacher(
    teacher_logits: jax.Array, center: jax.Array, temperature: float | jax.Array
) -> jax.Array:
    """Centred, sharpened teacher distribution ``softmax((z - c) / T)`` (recipe s3).

    Args:
      teacher_logits: ``[n, K]`` teacher head outputs (any float dtype).
      center: ``[K]`` (or anything broadcastable to ``[n, K]``) running centre.
      temperature: teacher temperature ``T`` (python float or traced scalar).

    Returns:
      ``[n, K]`` float32 probabilities, treated as constants (``stop_gradient``): they are targets.
    """
    scaled = (_f32(teacher_logits) - _f32(center)) / _f32(temperature)
    return jax.lax.stop_gradient(jax.nn.softmax(scaled, axis=-1))


def group_means(x: jax.Array, valid: jax.Array | None = None, n_groups: int = 1) -> jax.Array:
    """float32 ``[n_groups, d]`` means of ``[n, d]`` rows: over all rows (one group) without
    ``valid``; else over each of ``n_groups`` equal, group-major row groups' valid rows (0 for a
    group with none). Invalid rows are zeroed first, so they may hold anything."""
    x = _f32(x)
    if valid is None:
        return jnp.mean(x, axis=0, keepdims=True)
    n, d = x.shape
    if n % n_groups:
        raise ValueError(f"{n} buffer rows do not split into {n_groups} mask groups")
    row_weight = _f32(valid).reshape(n_groups, n // n_groups, 1)
    safe = jnp.where(row_weight > 0, x.reshape(n_groups, -1, d), 0.0)
    count = jnp.maximum(jnp.sum(row_weight, axis=1), 1.0)  # [n_groups, 1]
    return jnp.sum(safe * row_weight, axis=1) / count


def update_center(
    center: jax.Array,
    teacher_logits: jax.Array,
    momentum: float | jax.Array,
    *,
    valid: jax.Array | None = None,
    n_groups: int = 1,
) -> jax.Array:
    """EMA of the batch-mean teacher logits: ``c * m + (1 - m) * batch_mean(z)`` (recipe s3).

    The caller applies the result at the *next* step (the reference's lagged update).

    Without ``valid`` (the DINO [CLS] centre) the batch mean runs over all rows. With ``valid``
    (the iBOT centre over the static masked-token buffer) the rows are ``n_groups`` equal mask
    groups of ``U`` rows each; each group's mean runs over its valid rows only and the batch
    mean is the average of the group means (`group_means`). This is the reference's semantics:
    each device slices its head output to its ``n_masked_patches`` real rows, takes their mean,
    and the all-reduce divides the sum of per-device means by the world size (recipe s3).
    Padding rows never enter; a group without a masked token contributes 0 to the average.

    Args:
      center: ``[K]`` current centre.
      teacher_logits: ``[n, K]`` teacher head outputs of this step (``n = n_groups * U`` when
        ``valid`` is given).
      momentum: EMA momentum ``m`` (0.9 in the reference).
      valid: optional ``bool[n]``; the real (masked-token) rows.
      n_groups: number of mask groups the ``n`` rows split into (group-major).

    Returns:
      ``[K]`` float32 updated centre.
    """
    batch_mean = jnp.mean(group_means(teacher_logits, valid, n_groups), axis=0)
    momentum = _f32(momentum)
    return _f32(center) * momentum + (1.0 - momentum) * batch_mean


def sinkhorn_knopp_teacher(
    teacher_logits: jax.Array,
    temperature: float | jax.Array,
    n_iterations: int = 3,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Sinkhorn-Knopp teacher targets (recipe s3, ``centering: sinkhorn_knopp``).

    The reference works on ``Q = exp(z / T)^T`` of shape ``[K, B]``; we keep the ``[n, K]``
    layout, so its "row sums" (over samples, one per prototype) are our ``axis=0`` sums and its
    "column sums" (over prototypes, one per sample) our ``axis=1`` sums:

    1. ``Q /= sum(Q)``;
    2. ``n_iterations`` times: ``Q /= per-prototype sums; Q /= K``, then
       ``Q /= per-sample sums; Q /= B_tot``;
    3. ``Q *= B_tot``, so each sample's row is a distribution.

    The iterations run in the log domain: ``Q = exp(z / T + u + v)`` with a per-sample
    potential ``u`` and a per-prototype potential ``v``, each normalisation a log-sum-exp. This
    is the same algorithm (every normalisation is a row or column scaling), but no entry ever
    underflows: at a low temperature (0.01, spread of z 1) the linear form's ``exp`` reaches
    float32's subnormal range, which GPUs flush to zero and CPUs keep, so its targets depended
    on the device (seen on an H200: a 1.7% different DINO loss). Each log-sum-exp only reads
    the logits, so no [n, K] intermediate is written per iteration.

    Args:
      teacher_logits: ``[n, K]`` teacher head outputs.
      temperature: teacher temperature ``T``.
      n_iterations: Sinkhorn iterations (3 in the reference).
      valid: optional ``bool[n]``. Invalid rows (e.g. masked-token padding) are excluded from
        every sum, ``B_tot`` is the number of valid rows, and they come back as exact zeros.

    Returns:
      ``[n, K]`` float32 probabilities (``stop_gradient``): valid rows sum to 1.
    """
    scaled = _f32(teacher_logits) / _f32(temperature)
    n_rows, n_prototypes = scaled.shape
    row_valid = jnp.ones((n_rows, 1), bool) if valid is None else jnp.asarray(valid, bool)[:, None]
    batch_total = jnp.sum(row_valid, dtype=jnp.float32)  # exact: a count below 2**24
    log_k = jnp.where(row_valid, scaled, -jnp.inf)
    # A common shift (absorbed by the first normalisation) keeps the potentials small, so
    # log_k + u + v does not cancel large numbers (z / T reaches 1e3 for large logits).
    top = jnp.max(log_k)
    log_k = log_k - jnp.where(jnp.isfinite(top), top, 0.0)
    # max(B_tot, 1) keeps an all-invalid batch at exact zeros instead of 0/0.
    log_total = jnp.log(jnp.maximum(batch_total, 1.0))
    log_prototypes = jnp.log(jnp.float32(n_prototypes))
    u = jnp.zeros((n_rows, 1), jnp.float32)
    v = jnp.zeros((1, n_prototypes), jnp.float32)
    if n_iterations == 0:  # only Q /= sum(Q), then * B_tot
        v = v + _potential(log_k, axis=None)
    for _ in range(n_iterations):
        v = _potential(log_k + u, axis=0) - log_prototypes
        u = _potential(log_k + v, axis=1) - log_total
    q = jnp.where(row_valid, jnp.exp(log_k + u + v), 0.0)
    return jax.lax.stop_gradient(q * batch_total)


def _potential(log_q: jax.Array, axis: int | None) -> jax.Array:
    """-logsumexp of `log_q` over `axis` (keepdims), 0 where everything is -inf (an empty row
    or column stays empty instead of becoming NaN)."""
    lse = jax.nn.logsumexp(log_q, axis=axis, keepdims=True)  # -inf where everything is -inf
    return jnp.where(jnp.isfinite(lse), -lse, 0.0)


# ----------------------------------------------------------------------------------------------
# Student losses
# ----------------------------------------------------------------------------------------------


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums `x` over the leading / size-1 axes that broadcasting added to an array of `shape`."""
    lead = x.ndim - len(shape)
    x = jnp.sum(x, axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _scaled_and_targets(logits, targets, temperature, valid):
    """(scaled logits u = z / tau, targets p), invalid rows zeroed first."""
    keep = valid[..., None]
    return jnp.where(keep, _f32(logits), 0.0) / temperature, jnp.where(keep, _f32(targets), 0.0)


def _soft_cross_entropy_fwd(logits, targets, temperature, valid):
    u, p = _scaled_and_targets(logits, targets, temperature, valid)
    top = jax.lax.stop_gradient(jnp.max(u, axis=-1, keepdims=True))
    lse = top + jnp.log(jnp.sum(jnp.exp(u - top), axis=-1, keepdims=True))
    out = jnp.sum(p, axis=-1) * lse[..., 0] - jnp.sum(p * u, axis=-1)
    # Residuals: the inputs (alive anyway) and one float per row; u, p and softmax(u) are
    # recomputed in the backward inside one fusion instead of being stored as [n, K] arrays.
    return out, (logits, targets, temperature, valid, lse)


@jax.custom_vjp
def _soft_cross_entropy(logits, targets, temperature, valid):
    return _soft_cross_entropy_fwd(logits, targets, temperature, valid)[0]


def _soft_cross_entropy_bwd(residuals, grad):
    logits, targets, temperature, valid, lse = residuals
    keep = valid[..., None]
    u, p = _scaled_and_targets(logits, targets, temperature, valid)
    g = grad[..., None]
    # d/du [S lse(u) - <p, u>] = S softmax(u) - p, with S = sum_k p_k (1 for a distribution)
    d_u = g * (jnp.sum(p, axis=-1, keepdims=True) * jnp.exp(u - lse) - p)
    d_logits = jnp.where(keep, d_u / temperature, 0.0).astype(logits.dtype)
    d_targets = jnp.where(keep, g * (lse - u), 0.0)
    d_temperature = -jnp.sum(d_u * u) / temperature
    return (
        d_logits,
        _sum_to_shape(d_targets, targets.shape).astype(targets.dtype),
        _sum_to_shape(d_temperature, jnp.shape(temperature)).astype(temperature.dtype),
        None,
    )


_soft_cross_entropy.defvjp(_soft_cross_entropy_fwd, _soft_cross_entropy_bwd)


def soft_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    temperature: float | jax.Array,
    valid: jax.Array | None = None,
) -> jax.Array:
    """``-sum_k p_k log softmax(z / tau)_k`` per row, fused: no [n, K] float32 copies kept.

    The autodiff of ``log_softmax`` keeps its [n, K] float32 output (and every masked or scaled
    copy of the logits) alive until the backward; with K = 65536 prototypes and thousands of
    masked tokens per device those copies are GBs of HBM. Here the forward keeps one
    log-sum-exp per row and the backward recomputes ``softmax(z / tau)`` in the same fusion that
    writes the logits' gradient (``custom_vjp``). Values and gradients (logits, targets,
    temperature) equal the ``log_softmax`` formula's; ``S lse - <p, u>`` equals it exactly in
    real arithmetic for any target mass S.

    Args:
      logits: ``[..., K]`` student head outputs (any float dtype; arithmetic in float32).
      targets: ``[..., K]`` targets, broadcastable against ``logits`` (e.g. ``[1, B, K]``).
      temperature: ``tau``.
      valid: optional ``bool[...]`` rows; invalid rows are zeroed *before* any arithmetic
        (their logits may be garbage, inf or NaN) and give 0 with a 0 gradient.

    Returns:
      ``[...]`` float32 cross-entropies.
    """
    logits = jnp.asarray(logits)
    if valid is None:
        valid = jnp.ones(logits.shape[:-1], dtype=bool)
    valid = jnp.broadcast_to(jnp.asarray(valid, bool), logits.shape[:-1])
    return _soft_cross_entropy(logits, jnp.asarray(targets), _f32(temperature), valid)


def dino_loss(
    student_logits: jax.Array, teacher_probs: jax.Array, student_temperature: float | jax.Array
) -> jax.Array:
    """DINO [CLS] cross-entropy over all (student crop, other teacher crop) pairs (recipe s3);
    a float32 scalar.

    Pair ``(s, t)`` contributes ``mean_b H(p_t, softmax(z_s / tau))`` for every ``s != t``; the
    result is the mean over those ``S*T - T`` pairs (18 for S=10, T=2). The first ``T`` student
    crops are the global crops the teacher saw, in the teacher's order, so excluding ``s == t``
    pairs student global 1 with teacher global 2 and vice versa: the reference's crop swap.

    The cross-entropies are fused (:func:`soft_cross_entropy`). Identity used to avoid
    materialising ``[S, T, B, K]``: with ``l_s = log_softmax(z_s / tau)``,

        sum_{s, t != s} sum_{b,k} p_tbk l_sbk
          = sum_s sum_{b,k} (sum_t p_tbk) l_sbk  -  sum_{s < T} sum_{b,k} p_sbk l_sbk,

    i.e. the teacher probabilities summed over crops, minus the diagonal (same-crop) term.

    Args:
      student_logits: ``[S, B, K]`` student head outputs, globals first then locals.
      teacher_probs: ``[T, B, K]`` teacher targets (each row a distribution), ``T <= S``.
      student_temperature: ``tau`` (0.1 in the reference).
    """
    n_student, batch, _ = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    if n_teacher > n_student:
        raise ValueError(f"need T <= S teacher crops, got T={n_teacher}, S={n_student}")
    n_pairs = n_student * n_teacher - n_teacher
    if n_pairs == 0:
        raise ValueError("dino_loss needs at least one (s, t) pair with s != t")
    probs = _f32(teacher_probs)
    all_pairs = jnp.sum(
        soft_cross_entropy(student_logits, jnp.sum(probs, axis=0)[None], student_temperature)
    )
    same_crop = jnp.sum(soft_cross_entropy(student_logits[:n_teacher], probs, student_temperature))
    return (all_pairs - same_crop) / (batch * n_pairs)


def ibot_loss(
    student_logits: jax.Array,
    teacher_probs: jax.Array,
    token_weights: jax.Array,
    n_crops: int | jax.Array,
    student_temperature: float | jax.Array,
) -> jax.Array:
    """iBOT masked-patch loss over a padded token buffer (recipe s3); a float32 scalar.

    ``-(1 / n_crops) * sum_m w_m * sum_k p_mk * log softmax(z_m / tau)_k`` with ``w_m = 1/M_i``
    for a masked token of crop ``i`` (so each masked crop contributes its mean cross-entropy)
    and ``n_crops = 2B`` counting unmasked crops too (recipe s3, pitfall 5).

    Padding rows have ``w = 0``; their logits and targets may be garbage (uninitialised buffer
    rows, inf, NaN): the fused cross-entropy (:func:`soft_cross_entropy`) zeroes them first.

    Args:
      student_logits: ``[M, K]`` student head outputs at masked positions (padded buffer).
      teacher_probs: ``[M, K]`` teacher targets at the same positions.
      token_weights: ``[M]`` ``1/M_i`` per masked token, 0 for padding.
      n_crops: number of global crops in the batch (``2B``; global under jit).
      student_temperature: ``tau``.
    """
    weights = _f32(token_weights)
    cross_entropy = soft_cross_entropy(
        student_logits, teacher_probs, student_temperature, valid=weights != 0
    )
    return jnp.sum(weights * cross_entropy) / _f32(n_crops)


def _l2_normalize_rows(x: jax.Array) -> jax.Array:
    """``x / max(||x||, 1e-8)`` row-wise (torch ``F.normalize(eps=1e-8)``), NaN-free gradient.

    ``sqrt(max(|x|^2, eps^2))`` equals ``max(|x|, eps)`` but has a finite gradient at ``x = 0``.
    """
    squared_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(squared_norm, _KOLEO_EPS**2))


def koleo_loss(x: jax.Array) -> jax.Array:
    """KoLeo entropy regulariser on one batch of features (recipe s3).

    ``xhat = x / max(||x||, 1e-8)``; the nearest neighbour of row ``b`` is the argmax of
    ``xhat xhat^T`` with the diagonal set to -1; ``d_b = || xhat_b - xhat_nn(b) + 1e-8 ||`` (torch
    ``pairwise_distance`` adds its eps to the difference); loss ``= -mean_b log(d_b + 1e-8)``.

    Duplicate rows give ``d_b = 1e-8 * sqrt(D)``: a large but finite loss with finite gradient.
    The neighbour index is a discrete choice and carries no gradient (as in torch).

    Args:
      x: ``[B, D]`` features (the student backbone's pre-head CLS), ``B >= 2``.

    Returns:
      float32 scalar (unweighted: the 0.1 weight and the sum over crops belong to the step).
    """
    features = _l2_normalize_rows(_f32(x))
    similarity = jnp.matmul(features, features.T, precision=_HIGHEST)
    diagonal = jnp.eye(features.shape[0], dtype=bool)
    neighbour = jnp.argmax(jnp.where(diagonal, -1.0, similarity), axis=1)
    difference = features - features[neighbour] + _KOLEO_EPS
    distance = jnp.sqrt(jnp.sum(difference * difference, axis=-1))
    return -jnp.mean(jnp.log(distance + _KOLEO_EPS))


def koleo_loss_grouped(x: jax.Array, group_size: int) -> jax.Array:
    """Mean of :func:`koleo_loss` over consecutive groups of ``group_size`` rows.

    The reference computes KoLeo per device batch (no all-gather, recipe s3), and gradient
    averaging over devices makes the effective loss the mean over devices. With one global
    crop's features laid out device-major as ``[devices * B, D]``, ``group_size = B`` reproduces
    that: neighbours are only searched inside each device's ``B`` rows. ``x``: ``[N, D]``
    features, ``N`` divisible by ``group_size``; returns a float32 scalar.
    """
    n_rows = x.shape[0]
    if group_size <= 0 or n_rows % group_size != 0:
        raise ValueError(f"{n_rows} rows cannot be split into groups of {group_size}")
    groups = x.reshape(n_rows // group_size, group_size, *x.shape[1:])
    return jnp.mean(jax.vmap(koleo_loss)(groups))


# ----------------------------------------------------------------------------------------------
# Metrics helpers
# ----------------------------------------------------------------------------------------------


def _xlogy(p: jax.Array, q: jax.Array) -> jax.Array:
    """``p * log(q)`` with the convention ``0 * log(0) = 0`` (finite everywhere)."""
    positive = p > 0
    return jnp.where(positive, p * jnp.log(jnp.where(positive, q, 1.0)), 0.0)


def entropy(probs: jax.Array) -> jax.Array:
    """Mean entropy in nats of ``[n, K]`` row distributions (``0 log 0 = 0``); float32 scalar.

    Useful to watch teacher collapse (entropy -> 0) or uniformity (entropy -> log K).
    """
    probs = _f32(probs)
    return -jnp.mean(jnp.sum(_xlogy(probs, probs), axis=-1))


def mean_kl_divergence(
    teacher_probs: jax.Array, student_logits: jax.Array, student_temperature: float | jax.Array
) -> jax.Array:
    """Mean over rows of ``KL(p_teacher || softmax(z_student / tau))`` in nats; float32 scalar.

    Equals the cross-entropy loss minus the teacher entropy: the part of the loss the student
    can still remove.

    Args:
      teacher_probs: ``[n, K]`` teacher distributions.
      student_logits: ``[n, K]`` student head outputs.
      student_temperature: ``tau``.
    """
    probs = _f32(teacher_probs)
    log_q = jax.nn.log_softmax(_f32(student_logits) / _f32(student_temperature), axis=-1)
    cross_term = jnp.where(probs > 0, probs * log_q, 0.0)
    return jnp.mean(jnp.sum(_xlogy(probs, probs) - cross_term, axis=-1))
