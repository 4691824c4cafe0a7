"""One pure train step `(state, batch, rng) -> (state, metrics)` and its sharded compilation.

student forward/backward on 2 masked globals + n locals, teacher forward on the 2 unmasked
globals, DINO + iBOT + KoLeo, AdamW update with per-parameter rules, teacher EMA, lagged centre
update (recipe s3, s4). Schedules are evaluated at `state.step`, inside the step.
The crops arrive as the pipeline ships them (`config.data.transfer_dtype`): integer pixel
levels are normalised first, on the device (`normalise_crops`, with config.data.mean / std);
float crops are used as given.
With Gram anchoring on (`objective.gram_weight` > 0), the Gram teacher is refreshed from the
EMA teacher at the start of refresh steps, with `jnp.where` on the step so the step compiles
once (recipe, "Gram anchoring (DINOv3)").
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from raddino_jax.data.layout import CROP_KEYS, normalise
from raddino_jax.models import ModelSpec
from raddino_jax.parallel import sharding
from raddino_jax.ssl import gram
from raddino_jax.ssl.objective import ObjectiveConfig, ssl_loss
from raddino_jax.ssl.schedules import Schedules
from raddino_jax.train.optim import submodule_grad_norms
from raddino_jax.train.state import TrainState


def ema(teacher: dict, student: dict, momentum: jax.Array) -> dict:
    """theta_t <- m theta_t + (1 - m) theta_s over every teacher parameter (recipe s4)."""
    momentum = jnp.asarray(momentum, jnp.float32)
    return jax.tree.map(lambda t, s: t * momentum + s * (1.0 - momentum), teacher, student)


def refresh_gram_teacher(state: TrainState, objective: ObjectiveConfig) -> dict | None:
    """The Gram teacher this step uses: a copy of the EMA teacher's backbone on refresh steps
    of the "ema" Gram teacher (the teacher after `state.step` EMA updates), else the stored one.
    "initial" never changes. None when Gram anchoring is off."""
    if not objective.gram_enabled or objective.gram_teacher != "ema":
        return state.gram_teacher
    if state.gram_teacher is None:
        raise ValueError(
            "ssl.gram_weight > 0 needs a Gram teacher in the train state: create the state "
            "with train.state.create_state(..., gram=True)"
        )
    refresh = gram.is_refresh_step(
        state.step, objective.gram_start_step, objective.gram_update_every
    )
    ema_backbone = {"backbone": state.teacher["backbone"]}
    return jax.tree.map(
        lambda old, new: jnp.where(refresh, new, old), state.gram_teacher, ema_backbone
    )


def normalise_crops(
    batch: dict[str, jax.Array], pixel_stats: tuple[float, float]
) -> dict[str, jax.Array]:
    """The batch with integer crops (uint8 / uint16 pixel levels) normalised to float32 by
    `layout.normalise` with `pixel_stats` = (mean, std): the host pipeline's normalisation, so
    shipping levels and normalising here gives the host-normalised crops to float32 rounding
    while moving a quarter (uint8) of the bytes. Float crops pass through unchanged."""
    out = dict(batch)
    for key in CROP_KEYS:
        crops = batch.get(key)
        if crops is not None and jnp.issubdtype(crops.dtype, jnp.integer):
            out[key] = normalise(crops, *pixel_stats)
    return out


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    spec: ModelSpec,
    objective: ObjectiveConfig,
    optimizer: optax.GradientTransformation,
    schedules: Schedules,
    pixel_stats: tuple[float, float],
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The pure step. `rng` drives stochastic depth (and nothing else).

    `batch` is the pipeline's layout (`data/layout.py`); integer crops are normalised first
    with `pixel_stats` = (mean, std) (`normalise_crops`).

    Returns the next state and float32 scalar metrics: the losses, the schedule values used,
    teacher entropy, student-teacher KL, masked-token count and one `grad_norm/<submodule>`
    per top-level submodule; `gram_loss` too when Gram anchoring is on (0 before its start).

    Guard: when the loss or a gradient norm is not finite, the returned state is the input
    state (nothing is updated) and `metrics["finite"]` is 0, so the loop can stop with the last
    good state and checkpoint intact.
    """
    batch = normalise_crops(batch, pixel_stats)
    step = state.step
    teacher_temperature = schedules.teacher_temperature(step)
    momentum = schedules.teacher_momentum(step)
    gram_teacher = refresh_gram_teacher(state, objective)

    loss_fn = functools.partial(ssl_loss, spec=spec, cfg=objective)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.student,
        state.teacher,
        state.dino_center,
        state.ibot_center,
        batch,
        rng,
        teacher_temperature,
        gram_teacher,
        step >= objective.gram_start_step,
    )
    with jax.named_scope("optimizer"):  # named scopes: sweep/profile.py sums time by them
        updates, opt_state = optimizer.update(grads, state.opt_state, state.student)
        student = optax.apply_updates(state.student, updates)
    with jax.named_scope("teacher_ema"):
        teacher = ema(state.teacher, student, momentum)

    metrics = {
        "loss": loss,
        "dino_loss": aux["dino_loss"],
        "ibot_loss": aux["ibot_loss"],
        "koleo_loss": aux["koleo_loss"],
        "lr": schedules.lr(step),
        "last_layer_lr": schedules.last_layer_lr(step),
        "wd": schedules.weight_decay(step),
        "momentum": momentum,
        "teacher_temperature": teacher_temperature,
        "teacher_entropy": aux["teacher_entropy"],
        "student_teacher_kl": aux["student_teacher_kl"],
        "masked_tokens": aux["masked_tokens"],
    }
    if objective.gram_enabled:
        metrics["gram_loss"] = aux["gram_loss"]
    grad_norms = submodule_grad_norms(grads)
    metrics.update({f"grad_norm/{name}": norm for name, norm in grad_norms.items()})
    finite = jnp.all(jnp.isfinite(jnp.stack([loss, *grad_norms.values()])))
    metrics["finite"] = finite
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    new_state = state.replace(
        step=step + 1,
        student=student,
        teacher=teacher,
        opt_state=opt_state,
        dino_center=aux["next_dino_center"],
        ibot_center=aux["next_ibot_center"],
        gram_teacher=gram_teacher,
    )
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state, metrics


def compile_train_step(
    mesh: Mesh,
    state_shardings,
    batch_keys,
    *,
    spec: ModelSpec,
    objective: ObjectiveConfig,
    optimizer: optax.GradientTransformation,
    schedules: Schedules,
    pixel_stats: tuple[float, float],
) -> Callable:
    """`jax.jit` of `train_step` with explicit in/out shardings and the state donated.

    Tracing and compilation happen on the first call (and again only if an input's shape,
    dtype or sharding changes); calls return as soon as the step is dispatched.

    Kernels are chosen for the mesh's platform (`ModelSpec.for_platform`: splash attention on
    TPU, cuDNN on GPU, einsum on CPU), and the step is traced under the mesh's abstract mesh
    so that a kernel that needs shard_map (splash) finds its axes.
    """
    spec = spec.for_platform(mesh.devices.flat[0].platform)

    def traced_under_mesh(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return train_step(*args, **kwargs)

    step_fn = functools.partial(
        traced_under_mesh,
        spec=spec,
        objective=objective,
        optimizer=optimizer,
        schedules=schedules,
        pixel_stats=pixel_stats,
    )
    replicated = sharding.replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, sharding.batch_shardings(batch_keys, mesh), replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
