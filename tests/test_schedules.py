"""Tests for raddino_jax.ssl.schedules against a float64 NumPy CosineScheduler (recipe s4)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raddino_jax.ssl import schedules

RTOL = 1e-6


def np_cosine_scheduler(peak, final, total, warmup, start=0.0, freeze=0, extra=5):
    """dinov2's CosineScheduler array (float64), extended with `final` for `extra` steps."""
    frozen = np.zeros(freeze)
    ramp = np.linspace(start, peak, warmup)
    iters = np.arange(total - warmup - freeze)
    cosine = final + 0.5 * (peak - final) * (1 + np.cos(np.pi * iters / len(iters)))
    array = np.concatenate((frozen, ramp, cosine))
    assert len(array) == total
    return np.concatenate((array, np.full(extra, final)))


def evaluate(schedule, n_steps):
    """Schedule values at steps 0..n_steps-1 under jit, with a traced int32 step."""
    values = jax.jit(jax.vmap(schedule))(jnp.arange(n_steps, dtype=jnp.int32))
    assert values.dtype == jnp.float32
    return np.asarray(values, np.float64)


def assert_schedule_matches(schedule, expected):
    np.testing.assert_allclose(evaluate(schedule, len(expected)), expected, rtol=RTOL, atol=0)


CASES = {
    "lr": dict(peak=1e-3, final=1e-6, total=50, warmup=10),
    "no_warmup": dict(peak=0.04, final=0.4, total=30, warmup=0),
    "one_warmup_step": dict(peak=2.0, final=0.5, total=20, warmup=1, start=0.3),
    "two_warmup_steps": dict(peak=2.0, final=0.5, total=20, warmup=2, start=0.3),
    "freeze": dict(peak=1.0, final=0.1, total=40, warmup=5, freeze=7),
    "warmup_only": dict(peak=0.07, final=0.07, total=10, warmup=10, start=0.04),
    "freeze_and_warmup_only": dict(peak=1.0, final=0.2, total=8, warmup=5, freeze=3),
    "one_cosine_step": dict(peak=1.0, final=0.2, total=4, warmup=3),
    "momentum": dict(peak=0.992, final=1.0, total=100, warmup=0),
    "zero_final": dict(peak=3e-4, final=0.0, total=64, warmup=16),
    "empty": dict(peak=1.0, final=0.25, total=0, warmup=0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_warmup_cosine_matches_reference_at_every_step(name):
    case = CASES[name]
    schedule = schedules.warmup_cosine(
        case["peak"],
        case["final"],
        case["total"],
        case["warmup"],
        start=case.get("start", 0.0),
        freeze_steps=case.get("freeze", 0),
    )
    expected = np_cosine_scheduler(
        case["peak"],
        case["final"],
        case["total"],
        case["warmup"],
        start=case.get("start", 0.0),
        freeze=case.get("freeze", 0),
    )
    assert_schedule_matches(schedule, expected)


def test_warmup_endpoint_and_long_schedule_precision():
    """Real lengths: 10k warmup steps, 100k total; step 1 and the tail keep full precision."""
    schedule = schedules.warmup_cosine(3.2e-4, 1e-6, 100_000, 10_000)
    expected = np_cosine_scheduler(3.2e-4, 1e-6, 100_000, 10_000)
    steps = np.array(
        [0, 1, 2, 9_998, 9_999, 10_000, 10_001, 55_000, 99_998, 99_999, 100_000, 100_004, 2_000_000]
    )
    got = np.asarray(jax.jit(schedule)(jnp.asarray(steps, jnp.int32)), np.float64)
    want = np.array([expected[min(s, len(expected) - 1)] for s in steps])
    np.testing.assert_allclose(got, want, rtol=RTOL)
    assert got[0] == 0.0
    np.testing.assert_allclose(got[4], 3.2e-4, rtol=RTOL)  # last warmup step is the peak
    np.testing.assert_allclose(got[5], 3.2e-4, rtol=RTOL)  # first cosine step too


def test_python_int_step_works():
    schedule = schedules.warmup_cosine(1.0, 0.0, 10, 3)
    assert float(schedule(2)) == 1.0
    assert float(schedule(0)) == 0.0


def test_invalid_lengths_raise():
    with pytest.raises(ValueError):
        schedules.warmup_cosine(1.0, 0.0, 10, 8, freeze_steps=3)
    with pytest.raises(ValueError):
        schedules.warmup_cosine(1.0, 0.0, 10, -1)


def test_lr_peak_sqrt_scaling():
    assert schedules.lr_peak(4e-3, 1024) == pytest.approx(4e-3)
    assert schedules.lr_peak(2e-4, 3072) == pytest.approx(3.4641e-4, rel=1e-4)  # recipe s4
    assert schedules.lr_peak(2e-4, 2560) == pytest.approx(2e-4 * math.sqrt(2.5))


def test_last_layer_lr_is_zero_while_frozen_then_main():
    main = np_cosine_scheduler(1e-3, 1e-6, 60, 20)
    expected = main.copy()
    expected[:12] = 0.0  # the reference zeroes the head of the array; warmup is not shifted
    schedule = schedules.last_layer_lr_schedule(1e-3, 1e-6, 60, 20, 12)
    assert_schedule_matches(schedule, expected)
    # Freeze longer than the run: zeros inside it, min_lr after it (CosineScheduler.__getitem__).
    longer = schedules.last_layer_lr_schedule(1e-3, 1e-6, 10, 2, 50)
    got = evaluate(longer, 15)
    np.testing.assert_array_equal(got[:10], 0.0)
    np.testing.assert_allclose(got[10:], 1e-6, rtol=RTOL)


def test_weight_decay_momentum_and_teacher_temperature():
    assert_schedule_matches(
        schedules.weight_decay_schedule(0.04, 0.4, 40), np_cosine_scheduler(0.04, 0.4, 40, 0)
    )
    assert_schedule_matches(
        schedules.teacher_momentum_schedule(0.994, 40), np_cosine_scheduler(0.994, 1.0, 40, 0)
    )
    temperature = evaluate(schedules.teacher_temperature_schedule(0.04, 0.07, 30), 40)
    expected = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(10, 0.07)])
    np.testing.assert_allclose(temperature, expected, rtol=RTOL)
    zero_warmup = evaluate(schedules.teacher_temperature_schedule(0.04, 0.07, 0), 3)
    np.testing.assert_allclose(zero_warmup, 0.07, rtol=RTOL)


def test_build_schedules_bundle():
    bundle = schedules.build_schedules(
        base_lr=2e-4,
        global_batch=2560,
        total_steps=100,
        warmup_steps=10,
        freeze_last_layer_steps=5,
        min_lr=1e-6,
        weight_decay=0.04,
        weight_decay_end=0.2,
        momentum_teacher=0.994,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_steps=30,
    )
    peak = 2e-4 * math.sqrt(2560 / 1024)
    steps = 105
    assert_schedule_matches(bundle.lr, np_cosine_scheduler(peak, 1e-6, 100, 10))
    last_layer = np_cosine_scheduler(peak, 1e-6, 100, 10)
    last_layer[:5] = 0.0
    assert_schedule_matches(bundle.last_layer_lr, last_layer)
    assert_schedule_matches(bundle.weight_decay, np_cosine_scheduler(0.04, 0.2, 100, 0))
    assert_schedule_matches(bundle.teacher_momentum, np_cosine_scheduler(0.994, 1.0, 100, 0))
    temperature = evaluate(bundle.teacher_temperature, steps)
    np.testing.assert_allclose(temperature[:30], np.linspace(0.04, 0.07, 30), rtol=RTOL)
    np.testing.assert_allclose(temperature[30:], 0.07, rtol=RTOL)
