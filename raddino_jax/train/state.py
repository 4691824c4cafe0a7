"""The train state pytree and its creation directly in its sharding."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from raddino_jax.models import ModelSpec, init_params
from raddino_jax.parallel import sharding


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (the data iterator is checkpointed beside it).

    step: updates applied so far (int32 scalar).
    student / teacher: parameter dicts {"backbone", "dino_head", ["ibot_head"]}.
    opt_state: the student's optax state (holds its own step count for the schedules).
    dino_center [K] / ibot_center [K_ibot]: teacher centring EMAs (recipe s3).
    gram_teacher: {"backbone": ...}, the Gram teacher of DINOv3's Gram anchoring, or None when
      it is off (then the state has exactly the leaves it had before Gram anchoring existed, so
      shardings, checkpoints and the sweep's state accounting are unchanged).
    """

    step: jax.Array
    student: dict
    teacher: dict
    opt_state: Any
    dino_center: jax.Array
    ibot_center: jax.Array
    gram_teacher: dict | None = None


def head_sizes(spec: ModelSpec) -> tuple[int, int]:
    if spec.dino_head is None:
        raise ValueError("training needs a DINO head: set model.dino_head (HeadConfig)")
    ibot = spec.ibot_head or spec.dino_head
    return spec.dino_head.out_dim, ibot.out_dim


def new_state(
    params: dict, optimizer: optax.GradientTransformation, spec: ModelSpec, gram: bool = False
) -> TrainState:
    """Teacher starts as a copy of the student (recipe s4); centres start at zero.

    With `gram`, the Gram teacher starts as a copy of the initial backbone: the "initial" Gram
    teacher keeps it, the "ema" one replaces it at `ssl.gram_start_step`.
    """
    k_dino, k_ibot = head_sizes(spec)
    teacher = jax.tree.map(jnp.copy, params)
    gram_teacher = {"backbone": jax.tree.map(jnp.copy, params["backbone"])} if gram else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        student=params,
        teacher=teacher,
        opt_state=optimizer.init(params),
        dino_center=jnp.zeros((k_dino,), jnp.float32),
        ibot_center=jnp.zeros((k_ibot,), jnp.float32),
        gram_teacher=gram_teacher,
    )


def state_shardings(
    abstract_state: TrainState, mesh: Mesh, rules: sharding.Rules = sharding.TENSOR_RULES
):
    """NamedShardings for every leaf of a (possibly abstract) train state under `rules`
    (`config.sharding.tensor_rules`). The Gram teacher's leaves end with the backbone's
    parameter paths, so they take the same placements as the student's backbone."""
    specs = sharding.state_specs(abstract_state, abstract_state.student, mesh, rules)
    return sharding.to_shardings(specs, mesh)


def abstract_state(
    spec: ModelSpec,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding.Rules = sharding.TENSOR_RULES,
    gram: bool = False,
) -> tuple[TrainState, Any]:
    """(ShapeDtypeStruct state with shardings, shardings) without allocating anything."""
    shapes = jax.eval_shape(lambda: new_state(init_params(spec, 0), optimizer, spec, gram))
    shardings = state_shardings(shapes, mesh, rules)
    with_shardings = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    return with_shardings, shardings


def create_state(
    spec: ModelSpec,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    seed: int,
    params: dict | None = None,
    rules: sharding.Rules = sharding.TENSOR_RULES,
    gram: bool = False,
    shardings: Any = None,
) -> TrainState:
    """A train state created inside jit straight into its shardings (no single-device copy).

    `params` (e.g. imported DINOv2 / RAD-DINO weights, possibly with fresh heads merged in)
    replaces the random initialisation. `gram` adds the Gram teacher (`ssl.gram_weight` > 0).
    `shardings`: the state's shardings when the caller has them (`train.build.Run`); else they
    are traced here from `rules`.
    """
    if shardings is None:
        _, shardings = abstract_state(spec, optimizer, mesh, rules, gram)

    def make(p):
        return new_state(init_params(spec, seed) if p is None else p, optimizer, spec, gram)

    return jax.jit(make, out_shardings=shardings)(params)
