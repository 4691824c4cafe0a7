"""Step schedules of the DINOv2 recipe as optax schedules (recipe s3 "Temperatures", s4).

Every length is in optimizer steps. Every schedule is a pure function of an integer step (python
int or traced int32) returning a float32 scalar, so it can be called inside the jitted train step.

The reference precomputes NumPy arrays with ``CosineScheduler`` (dinov2 ``utils/utils.py``):

* ``freeze_steps`` zeros,
* a warmup ``np.linspace(start, peak, warmup_steps)`` **with** endpoint: step 0 is ``start``
  and the last warmup step is already ``peak`` (with ``warmup_steps == 1`` that single step is
  ``start``, as ``np.linspace`` with one sample returns its start),
* a cosine ``final + 0.5 * (peak - final) * (1 + cos(pi * i / n))`` for ``i = 0 .. n - 1``,
  ``n = total - warmup - freeze`` (so ``final`` itself is never reached inside the array),
* ``final`` for every step ``>= total``.

:func:`warmup_cosine` reproduces that array at every step.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import optax


def _linspace_schedule(start: float, stop: float, num: int) -> optax.Schedule:
    """``np.linspace(start, stop, num)[step]`` (endpoint included) for ``0 <= step < num``.

    Written as ``start + step * (stop - start) / (num - 1)`` rather than with
    ``optax.linear_schedule``, whose form ``(I - E) * (1 - t / T) + E`` cancels catastrophically
    in float32 near a zero start (relative error 3e-4 at step 1 of a 10k-step warmup).
    """
    if num <= 1:
        return optax.constant_schedule(start)
    increment = (stop - start) / (num - 1)

    def schedule(step):
        return start + jnp.asarray(step, jnp.float32) * jnp.float32(increment)

    return schedule


def _cosine_schedule(peak: float, final: float, n_steps: int) -> optax.Schedule:
    """``final + 0.5 * (peak - final) * (1 + cos(pi * i / n_steps))`` for ``0 <= i <= n_steps``.

    Evaluated as ``final + (peak - final) * sin(pi * (n - i) / (2 n))**2`` (the same value, by
    ``1 + cos(x) = 2 sin((pi - x) / 2)**2``). ``optax.cosine_decay_schedule`` computes
    ``1 + cos(x)`` directly, which in float32 loses most relative precision near ``x = pi``
    (e.g. a tail decaying to 0); the sine of the small remaining angle does not.
    """
    half_turn_per_step = math.pi / (2 * n_steps)

    def schedule(step):
        remaining = n_steps - jnp.clip(jnp.asarray(step), 0, n_steps)
        sine = jnp.sin(remaining.astype(jnp.float32) * jnp.float32(half_turn_per_step))
        return jnp.float32(final) + jnp.float32(peak - final) * sine * sine

    return schedule


def warmup_cosine(
    peak: float,
    final: float,
    total_steps: int,
    warmup_steps: int,
    start: float = 0.0,
    freeze_steps: int = 0,
) -> optax.Schedule:
    """dinov2's ``CosineScheduler`` as an optax schedule (recipe s4).

    Args:
      peak: value at the end of warmup / start of the cosine (``base_value``).
      final: value the cosine decays towards, and the value for ``step >= total_steps``.
      total_steps: length of the reference array.
      warmup_steps: linear warmup steps (``np.linspace`` with endpoint).
      start: first warmup value (``start_warmup_value``).
      freeze_steps: leading steps at exactly 0.

    Raises:
      ValueError: if ``freeze_steps + warmup_steps > total_steps`` or a length is negative.
    """
    if min(total_steps, warmup_steps, freeze_steps) < 0:
        raise ValueError("schedule lengths must be >= 0")
    cosine_steps = total_steps - warmup_steps - freeze_steps
    if cosine_steps < 0:
        raise ValueError(
            f"freeze ({freeze_steps}) + warmup ({warmup_steps}) exceed total ({total_steps})"
        )
    # The non-empty pieces in order, each ending at a boundary, then `final` for ever.
    pieces: list[optax.Schedule] = []
    boundaries: list[int] = []
    for length, piece in (
        (freeze_steps, lambda: optax.constant_schedule(0.0)),
        (warmup_steps, lambda: _linspace_schedule(start, peak, warmup_steps)),
        (cosine_steps, lambda: _cosine_schedule(peak, final, cosine_steps)),
    ):
        if length > 0:
            pieces.append(piece())
            boundaries.append((boundaries[-1] if boundaries else 0) + length)
    pieces.append(optax.constant_schedule(final))
    joined = optax.join_schedules(pieces, boundaries)

    def schedule(step):
        return jnp.asarray(joined(step), jnp.float32)

    return schedule


def lr_peak(base_lr: float, global_batch: int) -> float:
    """Peak learning rate, ``base_lr * sqrt(global_batch / 1024)`` (``sqrt_wrt_1024``, s4)."""
    return base_lr * math.sqrt(global_batch / 1024)


def lr_schedule(
    peak_lr: float, min_lr: float, total_steps: int, warmup_steps: int
) -> optax.Schedule:
    """Learning rate: linear warmup 0 -> ``peak_lr`` then cosine to ``min_lr`` (recipe s4)."""
    return warmup_cosine(peak_lr, min_lr, total_steps, warmup_steps)


def last_layer_lr_schedule(
    peak_lr: float,
    min_lr: float,
    total_steps: int,
    warmup_steps: int,
    freeze_last_layer_steps: int,
) -> optax.Schedule:
    """Learning rate of ``last_layer`` params: the main schedule, but 0 for the first
    ``freeze_last_layer_steps`` steps (recipe s4).

    The reference zeroes the head of a copy of the lr array, so the warmup is *not* shifted, and
    steps past ``total_steps`` still return ``min_lr`` even if the freeze were longer.
    """
    main = lr_schedule(peak_lr, min_lr, total_steps, warmup_steps)
    frozen_until = min(freeze_last_layer_steps, total_steps)

    def schedule(step):
        return jnp.where(jnp.asarray(step) < frozen_until, jnp.float32(0.0), main(step))

    return schedule


def weight_decay_schedule(
    weight_decay: float, weight_decay_end: float, total_steps: int
) -> optax.Schedule:
    """Weight decay: cosine ``weight_decay`` (0.04) -> ``weight_decay_end``, no warmup (s4)."""
    return warmup_cosine(weight_decay, weight_decay_end, total_steps, 0)


def teacher_momentum_schedule(momentum_teacher: float, total_steps: int) -> optax.Schedule:
    """Teacher EMA momentum: cosine ``momentum_teacher`` -> 1.0 over the run, no warmup (s4)."""
    return warmup_cosine(momentum_teacher, 1.0, total_steps, 0)


def teacher_temperature_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_steps: int
) -> optax.Schedule:
    """Teacher temperature: ``np.linspace(warmup_teacher_temp, teacher_temp, warmup_steps)``
    then ``teacher_temp`` (recipe s3; a CosineScheduler with peak == final == teacher_temp and
    total == warmup).
    """
    return warmup_cosine(
        teacher_temp, teacher_temp, warmup_steps, warmup_steps, start=warmup_teacher_temp
    )


@dataclasses.dataclass(frozen=True)
class Schedules:
    """All per-step scalars of the recipe, each a ``step -> float32`` optax schedule."""

    lr: optax.Schedule
    last_layer_lr: optax.Schedule
    weight_decay: optax.Schedule
    teacher_momentum: optax.Schedule
    teacher_temperature: optax.Schedule


def build_schedules(
    *,
    base_lr: float,
    global_batch: int,
    total_steps: int,
    warmup_steps: int,
    min_lr: float,
    freeze_last_layer_steps: int,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    warmup_teacher_temp: float,
    teacher_temp: float,
    warmup_teacher_temp_steps: int,
) -> Schedules:
    """Builds every schedule from plain numbers. No defaults here: the recipe's values
    (ssl_default_config, recipe s3/s4) are declared once, in `config.base_config`.

    ``base_lr`` is per 1024 images; the peak is :func:`lr_peak` of ``global_batch``.
    """
    peak = lr_peak(base_lr, global_batch)
    return Schedules(
        lr=lr_schedule(peak, min_lr, total_steps, warmup_steps),
        last_layer_lr=last_layer_lr_schedule(
            peak, min_lr, total_steps, warmup_steps, freeze_last_layer_steps
        ),
        weight_decay=weight_decay_schedule(weight_decay, weight_decay_end, total_steps),
        teacher_momentum=teacher_momentum_schedule(momentum_teacher, total_steps),
        teacher_temperature=teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_steps
        ),
    )
