"""One builder for a training run: everything the step needs, from the config, for some devices.

The pieces come from the config's sections (`config.py` is their schema and validation):
`model_spec`, `objective_config`, `schedules`, `optimizer_config`, `crop_config`,
`tensor_rules`, `mask_spec`, and `step_flops` (the analytic count the loop's MFU and the sweep
use).

`build(config, devices)` makes the mesh, the model spec, the objective, the schedules, the
optimizer, the abstract train state with its shardings, the jitted step, the iBOT mask spec and
the global batch the step takes (`data.layout.batch_spec`), and allocates nothing. The training
loop builds its run with it (and one `Run.for_stage` per resolution stage), the mesh sweep
builds one per layout, the memory preflight compiles what it built, and the benchmarks and
tests time and check the same step, so a new piece of the state or the step is wired once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import ml_collections
import optax

from raddino_jax import config as config_lib
from raddino_jax.data.augment import MultiCropConfig
from raddino_jax.data.layout import BATCH_KEYS, MaskSpec, batch_spec
from raddino_jax.models import ModelSpec, abstract_params, init_params
from raddino_jax.models.heads import HeadConfig
from raddino_jax.models.vit import ARCHS, ViTConfig, vit_config
from raddino_jax.parallel import sharding
from raddino_jax.parallel.mesh import make_mesh
from raddino_jax.ssl.objective import ObjectiveConfig
from raddino_jax.ssl.schedules import Schedules, build_schedules
from raddino_jax.train import state as train_state
from raddino_jax.train.optim import OptimizerConfig, build_optimizer
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
    batch: dict[str, jax.ShapeDtypeStruct]  # the global batch the step takes, with shardings
    tensor_rules: tuple  # config.sharding.tensor_rules, for states created from this run
    gram: bool = False  # the state carries a Gram teacher (ssl.gram_weight > 0)

    @property
    def n_devices(self) -> int:
        return int(self.mesh.devices.size)

    def for_stage(self, stage_config: ml_collections.ConfigDict) -> Run:
        """This run at a resolution stage's crop sizes and batch (`train/stages.py`): the same
        mesh, optimizer and state; the stage's objective (KoLeo groups follow the per-device
        batch), jitted step, mask spec and batch."""
        objective = objective_config(stage_config, self.n_devices)
        masks = mask_spec(stage_config, self.n_devices, self.spec.backbone.patch_size)
        return dataclasses.replace(
            self,
            config=stage_config,
            objective=objective,
            step_fn=_compile(self.mesh, self.shardings, self.spec, objective, self.optimizer,
                             self.schedules, stage_config),  # fmt: skip
            mask_spec=masks,
            batch=global_batch(stage_config, masks, self.mesh),
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
            shardings=self.shardings,
        )


def _compile(mesh, shardings, spec, objective, optimizer, schedules, config):
    return compile_train_step(
        mesh,
        shardings,
        BATCH_KEYS,
        spec=spec,
        objective=objective,
        optimizer=optimizer,
        schedules=schedules,
        pixel_stats=(config.data.mean, config.data.std),
    )


def global_batch(
    config: ml_collections.ConfigDict, masks: MaskSpec, mesh: jax.sharding.Mesh
) -> dict[str, jax.ShapeDtypeStruct]:
    """`layout.batch_spec` of the config's global batch, each array with its batch sharding."""
    shardings = sharding.batch_shardings(BATCH_KEYS, mesh)
    return {
        key: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[key])
        for key, s in batch_spec(crop_config(config), masks).items()
    }


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
    spec = model_spec(config)
    run_schedules = schedules(config)
    optimizer_settings = optimizer_config(config)
    optimizer = build_optimizer(
        _param_shapes(spec),
        optimizer_settings,
        lr_schedule=run_schedules.lr,
        last_layer_lr_schedule=run_schedules.last_layer_lr,
        wd_schedule=run_schedules.weight_decay,
    )
    rules = tensor_rules(config)
    objective = objective_config(config, n_devices)
    gram = objective.gram_enabled
    masks = mask_spec(config, n_devices, spec.backbone.patch_size)
    shapes = _state_shapes(spec, optimizer_settings, optimizer, gram)
    shardings = train_state.state_shardings(shapes, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    return Run(
        config=config,
        mesh=mesh,
        spec=spec,
        objective=objective,
        schedules=run_schedules,
        optimizer=optimizer,
        abstract_state=abstract,
        shardings=shardings,
        step_fn=_compile(mesh, shardings, spec, objective, optimizer, run_schedules, config),
        mask_spec=masks,
        batch=global_batch(config, masks, mesh),
        tensor_rules=rules,
        gram=gram,
    )


# ----------------------------------------------------------------------------------------------
# The pieces, from the config's sections
# ----------------------------------------------------------------------------------------------


def model_spec(config: ml_collections.ConfigDict) -> ModelSpec:
    """Backbone + heads from `config.model` (arch presets fill width/depth/heads left at 0)."""
    m = config.model
    if m.arch not in ARCHS:
        raise config_lib.ConfigError(
            f"config.model.arch: unknown {m.arch!r}; expected one of {sorted(ARCHS)}"
        )
    preset = vit_config(m.arch)
    derived = {
        k: m[k] or getattr(preset, k) for k in ("embed_dim", "depth", "num_heads", "ffn_layer")
    }
    derived["img_size"] = m.img_size or config.data.global_size
    backbone = config_lib.from_section(ViTConfig, m, "model", **derived)
    head = config_lib.from_section(
        HeadConfig, m, "model", "head_", in_dim=backbone.embed_dim, dtype=backbone.dtype
    )
    ibot = None
    if m.separate_ibot_head:
        ibot = head.replace(
            out_dim=m.ibot_out_dim or m.head_out_dim, bottleneck_dim=m.ibot_bottleneck_dim
        )
    return ModelSpec(backbone=backbone, dino_head=head, ibot_head=ibot)


def objective_config(config: ml_collections.ConfigDict, n_devices: int) -> ObjectiveConfig:
    """`config.ssl`, with koleo_group_size 0 resolved to the per-device batch (as the
    reference)."""
    group = config.ssl.koleo_group_size or per_device_batch(config, n_devices)
    return config_lib.from_section(ObjectiveConfig, config.ssl, "ssl", koleo_group_size=group)


def schedule_args(config: ml_collections.ConfigDict) -> dict[str, float | int]:
    """The arguments of `build_schedules` for `config` (the torch reference reads them too)."""
    o, t = config.optim, config.teacher
    return dict(
        base_lr=o.base_lr,
        global_batch=config.batch_size,
        total_steps=config.total_steps,
        warmup_steps=o.warmup_steps,
        min_lr=o.min_lr,
        freeze_last_layer_steps=o.freeze_last_layer_steps,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=t.momentum,
        warmup_teacher_temp=t.warmup_temperature,
        teacher_temp=t.temperature,
        warmup_teacher_temp_steps=t.warmup_temperature_steps,
    )


def schedules(config: ml_collections.ConfigDict) -> Schedules:
    return build_schedules(**schedule_args(config))


def optimizer_config(config: ml_collections.ConfigDict) -> OptimizerConfig:
    """`config.optim`'s optimiser fields; the block count comes from the model."""
    depth = model_spec(config).backbone.depth
    return config_lib.from_section(
        OptimizerConfig,
        config.optim,
        "optim",
        n_blocks=depth,
        join_warmup_steps=config.optim.warmup_steps,
    )


def crop_config(config: ml_collections.ConfigDict) -> MultiCropConfig:
    return config_lib.from_section(MultiCropConfig, config.data, "data")


def tensor_rules(config: ml_collections.ConfigDict) -> tuple:
    """`config.sharding.tensor_rules` as the tuple table `parallel.sharding` takes."""
    return tuple((pattern, tuple(placement)) for pattern, placement in config.sharding.tensor_rules)


def mask_spec(config: ml_collections.ConfigDict, n_devices: int, patch_size: int) -> MaskSpec:
    """Static iBOT mask shapes of the global batch."""
    grid = config.data.global_size // patch_size
    return MaskSpec(
        config.batch_size,
        mask_group_size(config, n_devices),
        (grid, grid),
        tuple(config.data.mask_ratio_min_max),
        config.data.mask_sample_probability,
    )


def step_flops(
    config: ml_collections.ConfigDict,
    spec: ModelSpec,
    n_devices: int,
    *,
    gram_active: bool | None = None,
) -> float:
    """Analytic FLOPs of one global train step (`flops.ssl_step_flops`): what the loop's MFU and
    the sweep both use. The iBOT buffer is the static one, padding included. With Gram
    anchoring on, a step from `ssl.gram_start_step` on also runs the Gram teacher
    (`gram_active`, default: whether Gram anchoring is on at all; the loop passes whether the
    logged step is past the start, as the step skips the Gram forward before it)."""
    from raddino_jax import flops

    masks = mask_spec(config, n_devices, spec.backbone.patch_size)
    return flops.ssl_step_flops(
        spec,
        global_size=config.data.global_size,
        local_size=config.data.local_size,
        n_local=config.data.n_local,
        batch=config.batch_size,
        n_masked_tokens=masks.upper_bound * masks.n_groups,
        separate_ibot_head=spec.ibot_head is not None,
        remat=spec.backbone.remat == "full",
        gram=config.ssl.gram_weight > 0 and gram_active is not False,
    )["total"]


def per_device_batch(config: ml_collections.ConfigDict, n_devices: int) -> int:
    """Images per batch shard (data x fsdp) of the configured mesh."""
    from raddino_jax.parallel.mesh import resolve_mesh_shape

    shape = resolve_mesh_shape(dict(config.mesh), n_devices)
    return max(config.batch_size // (shape[0] * shape[1]), 1)


def mask_group_size(config: ml_collections.ConfigDict, n_devices: int) -> int:
    """Images per iBOT mask draw: `data.mask_group_size`, or the per-device batch."""
    return config.data.mask_group_size or per_device_batch(config, n_devices)
