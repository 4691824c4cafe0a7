"""One builder for a training run: everything the step needs, from the config, for some devices.

`build(config, devices)` makes the mesh, the model spec, the objective, the schedules, the
optimizer, the abstract train state with its shardings, the jitted step and the iBOT mask spec,
and allocates nothing. The training loop builds its run with it (and one `Run.for_stage` per
resolution stage), the mesh sweep builds one per layout, the memory preflight compiles what it
built, and the benchmarks and tests time and check the same step, so a new piece of the state
or the step is wired once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import ml_collections
import optax

from raddino_jax import config as config_lib
from raddino_jax.data.layout import BATCH_KEYS
from raddino_jax.data.pipeline import MaskSpec
from raddino_jax.models import ModelSpec, abstract_params, init_params
from raddino_jax.parallel.mesh import make_mesh
from raddino_jax.ssl.objective import ObjectiveConfig
from raddino_jax.ssl.schedules import Schedules
from raddino_jax.train import state as train_state
from raddino_jax.train.optim import build_optimizer
from raddino_jax.train.step import compile_train_step


@dataclasses.dataclass
class Run:
    """A training run built for a mesh (no device memory allocated yet)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    spec: ModelSpec
    objective: ObjectiveConfig
    schedules: Schedules
    optimizer: optax.GradientTransformation
    abstract_state: train_state.TrainState  # ShapeDtypeStructs carrying their shardings
    shardings: object
    step_fn: object  # jitted train_step: (state, batch, key) -> (state, metrics), state donated
    mask_spec: MaskSpec
    tensor_rules: tuple  # config.sharding.tensor_rules, for states created from this run
    gram: bool = False  # the state carries a Gram teacher (ssl.gram_weight > 0)

    @property
    def n_devices(self) -> int:
        return int(self.mesh.devices.size)

    def for_stage(self, stage_config: ml_collections.ConfigDict) -> Run:
        """This run at a resolution stage's crop sizes and batch (`train/stages.py`): the same
        mesh, optimizer and state; the stage's objective (KoLeo groups follow the per-device
        batch), jitted step and mask spec."""
        objective = config_lib.objective_config(stage_config, self.n_devices)
        return dataclasses.replace(
            self,
            config=stage_config,
            objective=objective,
            step_fn=_compile(self.mesh, self.shardings, self.spec, objective, self.optimizer,
                             self.schedules),  # fmt: skip
            mask_spec=config_lib.mask_spec(
                stage_config, self.n_devices, self.spec.backbone.patch_size
            ),
        )

    def create_state(self, seed: int, params: dict | None = None) -> train_state.TrainState:
        """A fresh train state in this run's shardings (random init from `seed`, or `params`)."""
        return train_state.create_state(
            self.spec,
            self.optimizer,
            self.mesh,
            seed=seed,
            params=params,
            rules=self.tensor_rules,
            gram=self.gram,
        )


def _compile(mesh, shardings, spec, objective, optimizer, schedules):
    return compile_train_step(
        mesh,
        shardings,
        BATCH_KEYS,
        spec=spec,
        objective=objective,
        optimizer=optimizer,
        schedules=schedules,
    )


@functools.lru_cache(maxsize=8)
def _param_shapes(spec: ModelSpec) -> dict:
    """`abstract_params`, cached: tracing a 40-block init takes seconds, layouts share it."""
    return abstract_params(spec)


_STATE_SHAPES: dict = {}


def _state_shapes(spec: ModelSpec, optimizer_config, optimizer, gram: bool) -> object:
    """Unsharded ShapeDtypeStruct train state, cached per (spec, optimizer config, gram): the
    optimizer state's shapes follow the parameter tree and the config, not the schedules'
    values (which change with the batch size), so the first optimizer seen stands for all."""
    key = (spec, optimizer_config, gram)
    if key not in _STATE_SHAPES:
        _STATE_SHAPES[key] = jax.eval_shape(
            lambda: train_state.new_state(init_params(spec, 0), optimizer, spec, gram)
        )
    return _STATE_SHAPES[key]


def build(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> Run:
    """The run of `config` on `devices` (its mesh over them; config.mesh's -1 takes the rest)."""
    n_devices = len(devices)
    mesh = make_mesh(dict(config.mesh), devices)
    spec = config_lib.model_spec(config)
    schedules = config_lib.schedules(config)
    optimizer_config = config_lib.optimizer_config(config)
    optimizer = build_optimizer(
        _param_shapes(spec),
        optimizer_config,
        lr_schedule=schedules.lr,
        last_layer_lr_schedule=schedules.last_layer_lr,
        wd_schedule=schedules.weight_decay,
    )
    rules = config_lib.tensor_rules(config)
    objective = config_lib.objective_config(config, n_devices)
    gram = objective.gram_enabled
    shapes = _state_shapes(spec, optimizer_config, optimizer, gram)
    shardings = train_state.state_shardings(shapes, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    return Run(
        config=config,
        mesh=mesh,
        spec=spec,
        objective=objective,
        schedules=schedules,
        optimizer=optimizer,
        abstract_state=abstract,
        shardings=shardings,
        step_fn=_compile(mesh, shardings, spec, objective, optimizer, schedules),
        mask_spec=config_lib.mask_spec(config, n_devices, spec.backbone.patch_size),
        tensor_rules=rules,
        gram=gram,
    )
