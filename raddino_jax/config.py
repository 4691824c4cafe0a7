"""Config schema and its validation (before anything compiles).

Every experiment is a `configs/<name>.py` whose `get_config()` starts from `base_config()` and
changes values. The ConfigDict is locked, so a mistyped key (in a config file or a
`--config.key=value` override) is an error, never a silent default.

One schema, one place per default: the frozen dataclasses the code consumes (`ViTConfig`,
`HeadConfig`, `ObjectiveConfig`, `OptimizerConfig`, `MultiCropConfig`) *are* the schema of
their config sections. `base_config()` generates those sections from the dataclass fields and
defaults (`_section`), and `train/build.py` constructs the dataclasses back from the sections
(`from_section`), so a new dataclass field is a new config key with no other edit. Each dataclass
validates its own fields in `__post_init__`; `validate()` turns those errors into `ConfigError`
naming the key and adds only the checks that span sections (mesh, batch, sizes, paths). Keys
that exist only at the run level (steps, schedules, teacher, data source, eval) are declared
here once. `docs/architecture.md` describes the mechanism; `tests/test_config.py` walks it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import ml_collections
from etils import epath

from raddino_jax.data.augment import MultiCropConfig
from raddino_jax.models import ModelSpec
from raddino_jax.models.heads import HeadConfig
from raddino_jax.models.vit import ARCHS, ViTConfig
from raddino_jax.parallel.sharding import TENSOR_RULES
from raddino_jax.ssl.objective import ObjectiveConfig
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


def from_section(
    cls: type, section: ml_collections.ConfigDict, name: str, prefix: str = "", **derived
):
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
    # Memory preflight (raddino_jax/sweep/preflight.py): the compiled step's peak per device is
    # checked against the device before any data is read; over it the run stops, naming the
    # nearest layouts that fit, unless allow_over_memory. device_memory_gib: the capacity per
    # device by hand (0: bytes_limit; on CPU the available RAM shared by the local devices).
    c.allow_over_memory = False
    c.device_memory_gib = 0.0
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
    c.data.dir = ""  # tfds data_dir (local or gs://), with data.name
    c.data.name = ""
    c.data.split = "train"
    # A weighted mixture instead of data.dir/data.name: ((tfds name, data_dir, weight), ...),
    # weights all numbers or all "proportional" (to the sources' sizes); data/mixture.Mixture.
    c.data.sources = ()
    c.data.fraction = 1.0  # share of patients kept (nested subsets; raddino_jax.scaling)
    # Train on the built-in samples (phantoms + pydicom-data radiographs, built once into
    # WORKDIR/builtin) instead of data.dir or data.sources; never implied by an empty data.dir.
    c.data.builtin = False
    c.data.builtin_phantoms = 96
    c.data.builtin_size = 256  # shorter side of the built-in samples' records
    c.data.mask_group_size = 0  # images per iBOT mask draw; 0: the per-device batch
    c.data.mask_ratio_min_max = (0.1, 0.5)
    c.data.mask_sample_probability = 0.5
    # Undecodable records are skipped and counted (records_skipped in metrics.jsonl); more than
    # this fraction of the images read so far stops the run.
    c.data.max_bad_fraction = 0.01
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
    # "DATA_DIR/NAME" to evaluate on; "": each training source that has eval.label, reported
    # per source with a mixture (eval_datasets)
    c.eval.data = ""
    c.eval.train_split = "train"
    c.eval.eval_split = "val"
    c.eval.max_examples = 512
    return c


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (`configs/vitb14.py`, or `path:arg`) with
    `--config.key=value` overrides, parsed exactly as the drivers' `--config` flag does
    (ml_collections `config_flags`: literal values, tuples, unknown keys refused, naming them).
    The scaling CLI and the benchmarks load configs with it; main and the sweep get the same
    from their absl flag."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    argv = ["load_config", f"--config={path}", *overrides]
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                    sys_argv=argv)  # fmt: skip
    try:
        values(argv)
        return values.config
    except (AttributeError, KeyError, flags.Error) as err:  # an unknown key or a bad value
        raise ConfigError(f"--config {path} {' '.join(overrides)}: {err}") from err


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def validate(
    config: ml_collections.ConfigDict, *, n_devices: int, process_count: int, data: bool = True
) -> None:
    """Every check that can fail before compilation, each naming the offending key.

    `data=False` skips the choice of training data (a sweep compiles the step on a synthetic
    batch, so it needs none)."""
    from raddino_jax.parallel.mesh import resolve_mesh_shape
    from raddino_jax.train.build import (
        crop_config,
        mask_group_size,
        model_spec,
        objective_config,
        optimizer_config,
    )

    require(config.total_steps > 0, "total_steps", f"must be > 0, got {config.total_steps}")
    require(config.log_every > 0, "log_every", f"must be > 0, got {config.log_every}")
    require(config.checkpoint_every > 0, "checkpoint_every", "must be > 0")
    require(config.keep_checkpoints > 0, "keep_checkpoints", "must be > 0")
    require(
        config.preemption_check_every > 0,
        "preemption_check_every",
        f"must be > 0 (steps between multi-process signal checks), got "
        f"{config.preemption_check_every}",
    )
    require(0 <= config.seed < 2**31, "seed", "must be in [0, 2**31)")
    m, d, o = config.model, config.data, config.optim
    require(m.arch in ARCHS, "model.arch", f"unknown {m.arch!r}; expected one of {sorted(ARCHS)}")
    for key in ("global_size", "local_size"):
        size = d[key]
        require(
            size > 0 and size % m.patch_size == 0,
            f"data.{key}",
            f"{size} is not a positive multiple of model.patch_size={m.patch_size}",
        )
    # Each section's own fields: validated once, by its dataclass.
    spec = model_spec(config)
    optimizer = optimizer_config(config)
    crop_config(config)
    require(o.base_lr > 0, "optim.base_lr", f"must be > 0, got {o.base_lr}")
    require(
        0 <= o.warmup_steps <= config.total_steps,
        "optim.warmup_steps",
        f"must be in [0, total_steps={config.total_steps}]; to shorten a config, "
        "train.stages.scale_to_steps scales every schedule length with the run",
    )
    require(0.0 < config.teacher.momentum <= 1.0, "teacher.momentum", "must be in (0, 1]")
    require(
        config.teacher.temperature > 0 and config.teacher.warmup_temperature > 0,
        "teacher.temperature",
        "temperatures must be > 0",
    )
    try:
        mesh_shape = resolve_mesh_shape(dict(config.mesh), n_devices)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    shards = mesh_shape[0] * mesh_shape[1]
    require(
        config.batch_size > 0 and config.batch_size % shards == 0,
        "batch_size",
        f"{config.batch_size} is not divisible by the {shards} batch shards of mesh "
        f"{dict(zip(('data', 'fsdp', 'tensor'), mesh_shape, strict=True))}",
    )
    require(
        config.batch_size % process_count == 0,
        "batch_size",
        f"{config.batch_size} is not divisible by the {process_count} processes",
    )
    group = mask_group_size(config, n_devices)
    per_process = config.batch_size // process_count
    require(
        per_process % group == 0,
        "data.mask_group_size",
        f"{group} does not divide the per-process batch {per_process}",
    )
    require(
        (config.batch_size // group) % shards == 0,
        "data.mask_group_size",
        f"the {config.batch_size // group} mask groups do not split over {shards} batch shards;"
        " use the per-device batch or a divisor of it",
    )
    chunk = config.ssl.prototype_chunk
    for head in (spec.dino_head, spec.ibot_head):
        require(
            not chunk or head is None or head.out_dim % chunk == 0,
            "ssl.prototype_chunk",
            f"{chunk} does not divide the head's {head and head.out_dim} prototypes "
            "(model.head_out_dim / model.ibot_out_dim); 0 turns chunking off",
        )
    koleo = objective_config(config, n_devices).koleo_group_size
    require(
        config.batch_size % koleo == 0,
        "ssl.koleo_group_size",
        f"{koleo} does not divide batch_size {config.batch_size}",
    )
    _check_rules_match(spec, optimizer)
    if config.profile_steps:
        parts = config.profile_steps.split(":")
        require(
            len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[0]) < int(parts[1]),
            "profile_steps",
            f"{config.profile_steps!r} must look like START:STOP",
        )
    require(
        d.device_prefetch >= 0,
        "data.device_prefetch",
        f"must be >= 0 (global batches prepared ahead; 0 or 1: none in the background), got "
        f"{d.device_prefetch}",
    )
    require(
        0 <= d.max_bad_fraction <= 1,
        "data.max_bad_fraction",
        f"must be in [0, 1], got {d.max_bad_fraction}",
    )
    require(
        config.device_memory_gib >= 0,
        "device_memory_gib",
        f"must be >= 0 (0: from the device), got {config.device_memory_gib}",
    )
    from raddino_jax.data.sources import validate_data

    validate_data(d, choice=data)
    _validate_stages(config, n_devices=n_devices, process_count=process_count, data=data)
    if config.init.checkpoint:
        require(
            epath.Path(config.init.checkpoint).exists(),
            "init.checkpoint",
            f"{config.init.checkpoint} does not exist",
        )
    if config.init.heads:
        require(bool(config.init.checkpoint), "init.heads", "needs init.checkpoint too")
        require(
            epath.Path(config.init.heads).exists(),
            "init.heads",
            f"{config.init.heads} does not exist",
        )
    _validate_gram(config)
    if config.eval.every:
        require(bool(config.eval.label), "eval.label", "set the label field for periodic kNN")
        if d.dir or d.sources or config.eval.data:  # the built-in samples: checked once built
            from raddino_jax.data.sources import training_datasets
            from raddino_jax.eval.hook import eval_datasets

            eval_datasets(config, training_datasets(config))


def _validate_gram(config: ml_collections.ConfigDict) -> None:
    """Gram anchoring that would never start is refused: its teacher would still be carried in
    memory and in every checkpoint for nothing."""
    s = config.ssl
    if s.gram_weight <= 0:
        return
    require(
        s.gram_start_step < config.total_steps,
        "ssl.gram_start_step",
        f"{s.gram_start_step} is not before config.total_steps={config.total_steps}: Gram "
        "anchoring would never turn on (yet its teacher would fill memory and checkpoints). "
        "Start it earlier (DINOv3 anchors the later part of a run), raise total_steps, or set "
        "ssl.gram_weight=0",
    )


def _validate_stages(
    config: ml_collections.ConfigDict, *, n_devices: int, process_count: int, data: bool = True
):
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
            validate(stage.config, n_devices=n_devices, process_count=process_count, data=data)
        except ConfigError as err:
            raise ConfigError(
                f"config.stages[{stage.index - 1}] "
                f"{(stage.start_step, stage.global_size, stage.local_size, stage.batch_size)}: "
                f"{err}"
            ) from err


@functools.lru_cache(maxsize=8)
def _unmatched_rules(spec: ModelSpec, optimizer: OptimizerConfig) -> tuple:
    """The optimizer's rule regexes that match no parameter of `spec` (remembered per pair:
    tracing the abstract parameters takes about a second, and every stage and every run of a
    sweep validates the same model)."""
    from raddino_jax.models import abstract_params
    from raddino_jax.train.optim import unmatched_rules

    return tuple(unmatched_rules(abstract_params(spec), optimizer))


def _check_rules_match(spec: ModelSpec, optimizer: OptimizerConfig) -> None:
    """A rule regex that matches no parameter is almost always a typo: refuse it at startup."""
    try:
        hash((spec, optimizer))
    except TypeError:  # a rule table holding lists: not cacheable, compute it
        unused = list(_unmatched_rules.__wrapped__(spec, optimizer))
    else:
        unused = list(_unmatched_rules(spec, optimizer))
    require(
        not unused,
        "optim",
        f"rule regexes {unused} match no parameter path (e.g. 'backbone/blocks/0/attn/qkv/"
        "kernel'); fix the regex or remove the rule",
    )


def describe(config: ml_collections.ConfigDict) -> str:
    """One line with the run's shape, for the console."""
    peak = config.optim.base_lr * math.sqrt(config.batch_size / 1024)
    return (
        f"{config.model.arch} {config.data.global_size}/{config.data.local_size}px "
        f"x{2 + config.data.n_local} crops, batch {config.batch_size}, "
        f"{config.total_steps} steps, lr peak {peak:.3g}, mesh {dict(config.mesh)}"
    )
