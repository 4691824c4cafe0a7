"""Our jitted train step equals the PyTorch reference step (raddino_jax/reference/).

Same weights, same batch, two steps of the tiny model (configs/tiny.py: 2 blocks, width 32,
2 heads, K 64, 56 px globals + 2 x 28 px locals) at batch 4: the losses agree to 1e-5
relative, and after the two steps the student, teacher (EMA) and centres agree. Step 0 has
the last layer frozen (`freeze_last_layer_steps=1`) and step 1 moves it; the teacher
temperature, momentum and weight decay change between the steps, so every schedule and
per-parameter rule is exercised.

Tolerances (float32, different kernels and summation orders): losses and metrics 1e-5
relative, centres 1e-5; per student and teacher tensor, in norm, |ours - torch| <= 1e-3 x
the change the two steps made to it (Adam moves each entry by ~lr) + 1e-6 x the tensor
(float32 resolution: the teacher EMA's changes to weights of 1.0 are ~10 ulp), and the
student's change 1e-3 relative. The key third of each qkv bias has a zero gradient in
exact arithmetic, so both sides move it by rounding noise: it is only bounded, by the lr
(`reference.compare.split_key_bias`).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch reference step needs torch")

from configs import tiny  # noqa: E402
from raddino_jax.reference import compare  # noqa: E402
from raddino_jax.reference import config as reference_config  # noqa: E402
from raddino_jax.reference import step as reference_step  # noqa: E402
from raddino_jax.reference.model import SSLModel  # noqa: E402
from raddino_jax.train import build as build_lib  # noqa: E402

LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-3
UPDATE_RTOL = 1e-3
RESOLUTION = 1e-6  # ~8 float32 ulp, relative to the tensor's norm
METRICS = (
    "loss",
    "dino_loss",
    "ibot_loss",
    "koleo_loss",
    "teacher_entropy",
    "student_teacher_kl",
    "masked_tokens",
    "lr",
    "last_layer_lr",
    "wd",
    "momentum",
    "teacher_temperature",
    "grad_norm/backbone",
    "grad_norm/dino_head",
)


def tiny_config():
    """The tiny model as the reference implements it, batch 4; the last layer frozen at step
    0 and a 2-step teacher temperature warm-up, so every schedule moves between the steps."""
    config = compare.comparable(tiny.get_config(), batch=4)
    config.seed = 3
    config.optim.freeze_last_layer_steps = 1
    config.teacher.warmup_temperature_steps = 2
    return config


@pytest.fixture(scope="module")
def two_steps():
    """(initial student weights, [per-step (ours, torch) metrics], final ours, final torch)."""
    torch.manual_seed(0)
    config = tiny_config()
    ours = compare.OursStep(config, jax.devices()[0])
    initial = ours.student_weights()
    reference = reference_step.ReferenceStep(reference_config.from_config(config), initial)
    batch = reference_step.batch_to_torch(ours.host_batch)
    metrics = [(ours(), reference(batch)) for _ in range(2)]
    return initial, metrics, ours.named_state(), dict(reference.named_state())


def test_losses_and_metrics_agree(two_steps):
    _, metrics, _, _ = two_steps
    for step, (ours, theirs) in enumerate(metrics):
        assert ours["finite"] == theirs["finite"] == 1.0
        assert ours["masked_tokens"] > 0, "the batch must mask some tokens"
        for key in METRICS:
            np.testing.assert_allclose(
                ours[key], theirs[key], rtol=LOSS_RTOL, atol=1e-7, err_msg=f"step {step} {key}"
            )
    # The schedules really change between the two steps (so both values were checked).
    for key in ("last_layer_lr", "teacher_temperature", "momentum", "wd"):
        assert metrics[0][0][key] != metrics[1][0][key], key


def test_state_after_two_steps_agrees(two_steps):
    initial, metrics, ours, theirs = two_steps
    report = compare.compare_states(initial, ours, theirs)
    assert report["student update rel (worst tensor)"] < UPDATE_RTOL, report
    for model in ("student", "teacher"):
        assert report[f"{model} params rel"] < PARAM_RTOL, report
    # Per tensor (norms): the disagreement is a small part of the steps' change, up to float32
    # resolution (the teacher's EMA moves LayerScale / norm weights of 1.0 by ~1e-6, about
    # 10 ulp, so its change alone cannot be compared relatively).
    split = compare.split_key_bias
    for name, start in initial.items():
        for model in ("student", "teacher"):
            mine, _ = split(name, ours[f"{model}.{name}"])
            ref, _ = split(name, theirs[f"{model}.{name}"])
            change = np.linalg.norm(ref - split(name, start)[0])
            bound = UPDATE_RTOL * change + RESOLUTION * np.linalg.norm(ref)
            assert np.linalg.norm(mine - ref) <= bound, (model, name)
    # The key third of the qkv biases moves by Adam-scaled rounding noise on both sides
    # (`split_key_bias`): bounded by the lr, not equal.
    assert report["key bias max abs"] <= sum(ours["lr"] for ours, _ in metrics), report
    for centre in ("dino_center", "ibot_center"):
        np.testing.assert_allclose(ours[centre], theirs[centre], rtol=1e-5, atol=1e-7)
    # The steps moved every student tensor: the comparison is not of unchanged weights.
    for name, start in initial.items():
        assert np.any(ours[f"student.{name}"] != start), name


def test_global_crops_only_step_agrees():
    """data.n_local 0 (DINO on the two global crops only): the step skips the empty local
    pass and its losses equal the reference's, which runs the same batch."""
    torch.manual_seed(0)
    config = tiny_config()
    config.data.n_local = 0
    ours = compare.OursStep(config, jax.devices()[0])
    assert ours.host_batch["local_crops"].shape[0] == 0
    reference = reference_step.ReferenceStep(
        reference_config.from_config(config), ours.student_weights()
    )
    mine, theirs = ours(), reference(reference_step.batch_to_torch(ours.host_batch))
    assert mine["finite"] == theirs["finite"] == 1.0
    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "student_teacher_kl"):
        np.testing.assert_allclose(mine[key], theirs[key], rtol=LOSS_RTOL, atol=1e-7, err_msg=key)


def test_reference_param_rules_match_ours():
    """The reference's per-parameter lr / wd multipliers and last-layer flags equal ours."""
    from raddino_jax.models import abstract_params
    from raddino_jax.train.optim import param_multipliers

    config = tiny_config()
    shapes = abstract_params(build_lib.model_spec(config))
    lr_mult, wd_mult, last = param_multipliers(shapes, build_lib.optimizer_config(config))
    cfg = reference_config.from_config(config)

    def as_torch_names(tree):
        filled = jax.tree.map(lambda s, v: np.full(s.shape, float(v), np.float32), shapes, tree)
        return compare.torch_named(filled)

    lr_named, wd_named, last_named = map(as_torch_names, (lr_mult, wd_mult, last))
    ours = {
        name: (lr_named[name].flat[0], wd_named[name].flat[0], bool(last_named[name].flat[0]))
        for name in lr_named
    }
    model = SSLModel(cfg)
    assert set(ours) == {name for name, _ in model.named_parameters()}
    for name, (lr, wd, is_last) in ours.items():
        rule = reference_step.param_rule(name, cfg)
        assert rule.lr_mult == pytest.approx(lr, rel=1e-6), name
        assert (rule.wd_mult, rule.last_layer) == (wd, is_last), name
