"""Config schema, validation (before anything compiles) and the builders that read it.

Every experiment is a `configs/<name>.py` whose `get_config()` starts from `base_config()` and
changes values. The ConfigDict is locked, so a mistyped key (in a config file or a
`--config.key=value` override) is an error, never a silent default.

One schema, one place per default: the frozen dataclasses the code consumes (`ViTConfig`,
`HeadConfig`, `ObjectiveConfig`, `OptimizerConfig`, `MultiCropConfig`) *are* the schema of
their config sections. `base_config()` generates those sections from the dataclass fields and
defaults (`_section`), and the builders construct the dataclasses back from the sections
(`_build`), so a new dataclass field is a new config key with no other edit. Each dataclass
validates its own fields in `__post_init__`; `validate()` turns those errors into `ConfigError`
naming the key and adds only the checks that span sections (mesh, batch, sizes, paths). Keys
that exist only at the run level (steps, schedules, teacher, data source, eval) are declared
here once. `docs/architecture.md` describes the mechanism; `tests/test_config.py` walks it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import ml_collections
from etils import epath

from raddino_jax.data.augment import MultiCropConfig
from raddino_jax.models import ModelSpec
from raddino_jax.models.heads import HeadConfig
from raddino_jax.models.vit import ARCHS, ViTConfig, vit_config
from raddino_jax.parallel.sharding import TENSOR_RULES
from raddino_jax.ssl.objective import ObjectiveConfig
from raddino_jax.ssl.schedules import Schedules, build_schedules
from raddino_jax.train.optim import OptimizerConfig


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and what to do."""


# Dataclass fields whose config value is derived from other keys. The config holds a sentinel
# (0) meaning "derive it"; the builder fills it in. Listed so the schema walk can account for
# every field.
DERIVED_FIELDS: dict[str, str] = {
    "model.embed_dim": "0: model.arch's width",
    "model.depth": "0: model.arch's depth",
    "model.num_heads": "0: model.arch's head count",
    "model.ffn_layer": "'': model.arch's FFN (SwiGLU for vit_giant2, else MLP)",
    "model.img_size": "0: data.global_size",
    "model.head_in_dim": "the backbone width",
    "model.head_dtype": "model.dtype",
    "optim.n_blocks": "the backbone depth",
    "optim.join_warmup_steps": "optim.warmup_steps (the backbone's lr ramp after the heads-only "
    "phase, optim.freeze_backbone_steps)",
    "ssl.pixel_mean": "data.mean (the train step normalises integer crops with it)",
    "ssl.pixel_std": "data.std",
}
_SENTINELS = {"embed_dim": 0, "depth": 0, "num_heads": 0, "img_size": 0, "ffn_layer": ""}

# Which dataclass fills which config section, with the key prefix its fields get there.
SECTIONS: tuple[tuple[str, type, str], ...] = (
    ("model", ViTConfig, ""),
    ("model", HeadConfig, "head_"),
    ("ssl", ObjectiveConfig, ""),
    ("optim", OptimizerConfig, ""),
    ("data", MultiCropConfig, ""),
)


def _section(cls: type, prefix: str, section: str) -> dict[str, Any]:
    """{prefix + field: default} for every field of `cls` the config sets (derived ones get
    their sentinel, or are left out when the builder supplies them)."""
    values = {}
    for field in dataclasses.fields(cls):
        key = f"{section}.{prefix}{field.name}"
        if key in DERIVED_FIELDS:
            if field.name in _SENTINELS and not prefix:
                values[field.name] = _SENTINELS[field.name]
            continue
        values[prefix + field.name] = field.default
    return values


def _build(cls: type, section: ml_collections.ConfigDict, name: str, prefix: str = "", **derived):
    """`cls(**fields read from section)`, derived values given; its validation errors become
    ConfigError naming `config.<name>.<key>`."""
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in derived:
            kwargs[field.name] = derived[field.name]
        elif prefix + field.name in section:
            value = section[prefix + field.name]
            kwargs[field.name] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        message = str(err)
        field = next(
            (f.name for f in dataclasses.fields(cls) if re.match(rf"{f.name}\b", message)), None
        )
        key = f"{name}.{prefix}{field}" if field else name
        raise ConfigError(f"config.{key}: {message}") from err


def base_config() -> ml_collections.ConfigDict:
    """All keys with their defaults; experiment configs override values.

    Section defaults come from the dataclasses (`SECTIONS`); the run-level keys below are
    declared only here.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 100_000
    c.log_every = 10
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.batch_size = 1024  # global, all processes
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.peak_tflops_per_device = 0.0  # 0: look the device kind up (raddino_jax.flops)
    c.profile_steps = ""  # "START:STOP" writes a profiler trace for those steps
    # Several processes agree on a SIGTERM/SIGINT (an all-gather) every N steps and on
    # checkpoint steps: a signal is honoured within N steps. One process checks every step.
    c.preemption_check_every = 10
    # Later resolution stages: ((start step, global size, local size, batch size), ...); the
    # first stage is data.global_size/local_size and batch_size from step 0 (train/stages.py).
    c.stages = ()

    sections: dict[str, dict[str, Any]] = {}
    for name, cls, prefix in SECTIONS:
        sections.setdefault(name, {}).update(_section(cls, prefix, name))

    c.model = ml_collections.ConfigDict({"arch": "vit_base", **sections["model"]})
    c.model.separate_ibot_head = False  # a second head for iBOT (DINOv2 L/g configs)
    c.model.ibot_out_dim = 0  # 0: head_out_dim
    c.model.ibot_bottleneck_dim = 256

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""  # from-torch output dir, or a DINOv2 / RAD-DINO torch file / HF folder
    c.init.heads = ""  # optional head file (RAD-DINO dino_head.safetensors)
    c.init.which = "teacher"  # model of a dinov2 training checkpoint

    c.data = ml_collections.ConfigDict(sections["data"])
    c.data.dir = ""  # tfds data_dir (local or gs://); "" = built-in samples
    c.data.name = ""
    c.data.split = "train"
    # A weighted mixture instead of data.dir/data.name: ((tfds name, data_dir, weight), ...),
    # weights all numbers or all "proportional" (to the sources' sizes); data/pipeline.Mixture.
    c.data.sources = ()
    c.data.fraction = 1.0  # share of patients kept (nested subsets; raddino_jax.scaling)
    c.data.builtin_phantoms = 96
    c.data.builtin_size = 256  # shorter side of the built-in samples' records
    c.data.mask_group_size = 0  # images per iBOT mask draw; 0: the per-device batch
    c.data.mask_ratio_min_max = (0.1, 0.5)
    c.data.mask_sample_probability = 0.5
    c.data.num_workers = 0
    c.data.read_threads = 0
    c.data.prefetch = 2
    # Global batches kept on the devices ahead of the step by a background thread (data/
    # prefetch.DevicePrefetcher); 0 or 1: the loop builds each right after dispatching a step.
    c.data.device_prefetch = 2

    c.ssl = ml_collections.ConfigDict(sections["ssl"])

    c.optim = ml_collections.ConfigDict(sections["optim"])
    c.optim.base_lr = 4e-3  # per 1024 images, sqrt scaling (recipe s4)
    c.optim.min_lr = 1e-6
    c.optim.warmup_steps = 12_500
    c.optim.weight_decay = 0.04
    c.optim.weight_decay_end = 0.4
    c.optim.freeze_last_layer_steps = 1250

    c.teacher = ml_collections.ConfigDict()
    c.teacher.momentum = 0.992
    c.teacher.warmup_temperature = 0.04
    c.teacher.temperature = 0.07
    c.teacher.warmup_temperature_steps = 37_500

    # (regex on the "/"-joined parameter path, per-dimension tensor-parallel placement);
    # FSDP then takes the largest free dimension (raddino_jax.parallel.sharding).
    c.sharding = ml_collections.ConfigDict({"tensor_rules": TENSOR_RULES})

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # kNN on a held-out labelled split every N steps (0: off)
    c.eval.label = ""
    c.eval.train_split = "train"
    c.eval.eval_split = "val"
    c.eval.max_examples = 512
    return c


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def validate(config: ml_collections.ConfigDict, *, n_devices: int, process_count: int) -> None:
    """Every check that can fail before compilation, each naming the offending key."""
    from raddino_jax.parallel.mesh import resolve_mesh_shape

    _require(config.total_steps > 0, "total_steps", f"must be > 0, got {config.total_steps}")
    _require(config.log_every > 0, "log_every", f"must be > 0, got {config.log_every}")
    _require(config.checkpoint_every > 0, "checkpoint_every", "must be > 0")
    _require(config.keep_checkpoints > 0, "keep_checkpoints", "must be > 0")
    _require(
        config.preemption_check_every > 0,
        "preemption_check_every",
        f"must be > 0 (steps between multi-process signal checks), got "
        f"{config.preemption_check_every}",
    )
    _require(0 <= config.seed < 2**31, "seed", "must be in [0, 2**31)")
    m, d, o = config.model, config.data, config.optim
    _require(m.arch in ARCHS, "model.arch", f"unknown {m.arch!r}; expected one of {sorted(ARCHS)}")
    for key in ("global_size", "local_size"):
        size = d[key]
        _require(
            size > 0 and size % m.patch_size == 0,
            f"data.{key}",
            f"{size} is not a positive multiple of model.patch_size={m.patch_size}",
        )
    # Each section's own fields: validated once, by its dataclass.
    spec = model_spec(config)
    optimizer = optimizer_config(config)
    crop_config(config)
    _require(o.base_lr > 0, "optim.base_lr", f"must be > 0, got {o.base_lr}")
    _require(
        0 <= o.warmup_steps <= config.total_steps,
        "optim.warmup_steps",
        f"must be in [0, total_steps={config.total_steps}]",
    )
    _require(0.0 < config.teacher.momentum <= 1.0, "teacher.momentum", "must be in (0, 1]")
    _require(
        config.teacher.temperature > 0 and config.teacher.warmup_temperature > 0,
        "teacher.temperature",
        "temperatures must be > 0",
    )
    try:
        mesh_shape = resolve_mesh_shape(dict(config.mesh), n_devices)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    shards = mesh_shape[0] * mesh_shape[1]
    _require(
        config.batch_size > 0 and config.batch_size % shards == 0,
        "batch_size",
        f"{config.batch_size} is not divisible by the {shards} batch shards of mesh "
        f"{dict(zip(('data', 'fsdp', 'tensor'), mesh_shape, strict=True))}",
    )
    _require(
        config.batch_size % process_count == 0,
        "batch_size",
        f"{config.batch_size} is not divisible by the {process_count} processes",
    )
    group = mask_group_size(config, n_devices)
    per_process = config.batch_size // process_count
    _require(
        per_process % group == 0,
        "data.mask_group_size",
        f"{group} does not divide the per-process batch {per_process}",
    )
    _require(
        (config.batch_size // group) % shards == 0,
        "data.mask_group_size",
        f"the {config.batch_size // group} mask groups do not split over {shards} batch shards;"
        " use the per-device batch or a divisor of it",
    )
    koleo = objective_config(config, n_devices).koleo_group_size
    _require(
        config.batch_size % koleo == 0,
        "ssl.koleo_group_size",
        f"{koleo} does not divide batch_size {config.batch_size}",
    )
    _check_rules_match(spec, optimizer)
    if config.profile_steps:
        parts = config.profile_steps.split(":")
        _require(
            len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[0]) < int(parts[1]),
            "profile_steps",
            f"{config.profile_steps!r} must look like START:STOP",
        )
    _require(
        d.device_prefetch >= 0,
        "data.device_prefetch",
        f"must be >= 0 (global batches prepared ahead; 0 or 1: none in the background), got "
        f"{d.device_prefetch}",
    )
    _validate_sources(d)
    _validate_stages(config, n_devices=n_devices, process_count=process_count)
    if d.dir or d.name:
        _require(bool(d.dir) and bool(d.name), "data.dir", "set both data.dir and data.name")
        path = epath.Path(d.dir) / d.name
        _require(
            path.exists(),
            "data.dir",
            f"{path} does not exist; build it with `python -m data_prep.build` or leave "
            "data.dir/data.name empty to use the built-in samples",
        )
    if config.init.checkpoint:
        _require(
            epath.Path(config.init.checkpoint).exists(),
            "init.checkpoint",
            f"{config.init.checkpoint} does not exist",
        )
    if config.init.heads:
        _require(bool(config.init.checkpoint), "init.heads", "needs init.checkpoint too")
        _require(
            epath.Path(config.init.heads).exists(),
            "init.heads",
            f"{config.init.heads} does not exist",
        )
    if config.eval.every:
        _require(bool(config.eval.label), "eval.label", "set the label field for periodic kNN")


def _validate_sources(d: ml_collections.ConfigDict) -> None:
    """data.sources entries and data.fraction (the datasets must exist)."""
    _require(0 < d.fraction <= 1, "data.fraction", f"must be in (0, 1], got {d.fraction}")
    if not d.sources:
        return
    _require(
        not d.dir and not d.name,
        "data.sources",
        "set either data.sources or data.dir/data.name, not both",
    )
    for i, entry in enumerate(d.sources):
        key = f"data.sources[{i}]"
        _require(
            isinstance(entry, list | tuple) and len(entry) == 3,
            key,
            f"{entry!r} must be (tfds name, data_dir, weight)",
        )
        name, data_dir, weight = entry
        _require(
            isinstance(name, str) and isinstance(data_dir, str) and bool(name) and bool(data_dir),
            key,
            f"{entry!r}: name and data_dir must be non-empty strings",
        )
        _require(
            weight == "proportional"
            or (isinstance(weight, int | float) and not isinstance(weight, bool) and weight > 0),
            key,
            f"weight {weight!r} must be a number > 0 or 'proportional'",
        )
        path = epath.Path(data_dir) / name
        _require(
            path.exists(), key, f"{path} does not exist; build it with `python -m data_prep.build`"
        )
    kinds = {entry[2] == "proportional" for entry in d.sources}
    _require(
        len(kinds) == 1,
        "data.sources",
        "weights must all be numbers or all be 'proportional'",
    )


def _validate_stages(config: ml_collections.ConfigDict, *, n_devices: int, process_count: int):
    """Each later stage is checked like a run of its own sizes; errors name the entry."""
    if not config.stages:
        return
    from raddino_jax.train.stages import StageError, stage_table

    try:
        table = stage_table(config)
    except StageError as err:
        raise ConfigError(str(err)) from err
    for stage in table[1:]:
        try:
            validate(stage.config, n_devices=n_devices, process_count=process_count)
        except ConfigError as err:
            raise ConfigError(
                f"config.stages[{stage.index - 1}] "
                f"{(stage.start_step, stage.global_size, stage.local_size, stage.batch_size)}: "
                f"{err}"
            ) from err


def per_device_batch(config: ml_collections.ConfigDict, n_devices: int) -> int:
    """Images per batch shard (data x fsdp) of the configured mesh."""
    from raddino_jax.parallel.mesh import resolve_mesh_shape

    shape = resolve_mesh_shape(dict(config.mesh), n_devices)
    return max(config.batch_size // (shape[0] * shape[1]), 1)


def mask_group_size(config: ml_collections.ConfigDict, n_devices: int) -> int:
    """Images per iBOT mask draw: `data.mask_group_size`, or the per-device batch."""
    return config.data.mask_group_size or per_device_batch(config, n_devices)


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def _check_rules_match(spec: ModelSpec, optimizer: OptimizerConfig) -> None:
    """A rule regex that matches no parameter is almost always a typo: refuse it at startup."""
    from raddino_jax.models import abstract_params
    from raddino_jax.train.optim import unmatched_rules

    params = abstract_params(spec)
    unused = unmatched_rules(params, optimizer)
    _require(
        not unused,
        "optim",
        f"rule regexes {unused} match no parameter path (e.g. 'backbone/blocks/0/attn/qkv/"
        "kernel'); fix the regex or remove the rule",
    )


def model_spec(config: ml_collections.ConfigDict) -> ModelSpec:
    """Backbone + heads from `config.model` (arch presets fill width/depth/heads left at 0)."""
    m = config.model
    if m.arch not in ARCHS:
        raise ConfigError(f"config.model.arch: unknown {m.arch!r}; expected one of {sorted(ARCHS)}")
    preset = vit_config(m.arch)
    derived = {
        k: m[k] or getattr(preset, k) for k in ("embed_dim", "depth", "num_heads", "ffn_layer")
    }
    derived["img_size"] = m.img_size or config.data.global_size
    backbone = _build(ViTConfig, m, "model", **derived)
    head = _build(HeadConfig, m, "model", "head_", in_dim=backbone.embed_dim, dtype=backbone.dtype)
    ibot = None
    if m.separate_ibot_head:
        ibot = head.replace(
            out_dim=m.ibot_out_dim or m.head_out_dim, bottleneck_dim=m.ibot_bottleneck_dim
        )
    return ModelSpec(backbone=backbone, dino_head=head, ibot_head=ibot)


def objective_config(config: ml_collections.ConfigDict, n_devices: int) -> ObjectiveConfig:
    """`config.ssl`, with koleo_group_size 0 resolved to the per-device batch (as the reference)
    and the pixel statistics the step normalises integer crops with from `config.data`."""
    group = config.ssl.koleo_group_size or per_device_batch(config, n_devices)
    return _build(
        ObjectiveConfig,
        config.ssl,
        "ssl",
        koleo_group_size=group,
        pixel_mean=config.data.mean,
        pixel_std=config.data.std,
    )


def schedules(config: ml_collections.ConfigDict) -> Schedules:
    o, t = config.optim, config.teacher
    return build_schedules(
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


def optimizer_config(config: ml_collections.ConfigDict) -> OptimizerConfig:
    """`config.optim`'s optimiser fields; the block count comes from the model."""
    depth = model_spec(config).backbone.depth
    return _build(
        OptimizerConfig,
        config.optim,
        "optim",
        n_blocks=depth,
        join_warmup_steps=config.optim.warmup_steps,
    )


def crop_config(config: ml_collections.ConfigDict) -> MultiCropConfig:
    return _build(MultiCropConfig, config.data, "data")


def tensor_rules(config: ml_collections.ConfigDict) -> tuple:
    """`config.sharding.tensor_rules` as the tuple table `parallel.sharding` takes."""
    return tuple((pattern, tuple(placement)) for pattern, placement in config.sharding.tensor_rules)


def mask_spec(
    config: ml_collections.ConfigDict,
    n_devices: int,
    patch_size: int,
    per_process_batch: int | None = None,
):
    """Static iBOT mask shapes of one host batch (default: one process holds the whole batch)."""
    from raddino_jax.data.pipeline import MaskSpec

    grid = config.data.global_size // patch_size
    return MaskSpec(
        per_process_batch or config.batch_size,
        mask_group_size(config, n_devices),
        (grid, grid),
        tuple(config.data.mask_ratio_min_max),
        config.data.mask_sample_probability,
    )


def step_flops(config: ml_collections.ConfigDict, spec: ModelSpec, n_devices: int) -> float:
    """Analytic FLOPs of one global train step (`flops.ssl_step_flops`): what the loop's MFU and
    the sweep both use. The iBOT buffer is the static one, padding included."""
    from raddino_jax import flops

    masks = mask_spec(config, n_devices, spec.backbone.patch_size)
    n_groups = config.batch_size // masks.mask_group_size
    return flops.ssl_step_flops(
        spec,
        global_size=config.data.global_size,
        local_size=config.data.local_size,
        n_local=config.data.n_local,
        batch=config.batch_size,
        n_masked_tokens=masks.upper_bound * n_groups,
        separate_ibot_head=spec.ibot_head is not None,
        remat=spec.backbone.remat == "full",
    )["total"]


def describe(config: ml_collections.ConfigDict) -> str:
    """One line with the run's shape, for the console."""
    peak = config.optim.base_lr * math.sqrt(config.batch_size / 1024)
    return (
        f"{config.model.arch} {config.data.global_size}/{config.data.local_size}px "
        f"x{2 + config.data.n_local} crops, batch {config.batch_size}, "
        f"{config.total_steps} steps, lr peak {peak:.3g}, mesh {dict(config.mesh)}"
    )
