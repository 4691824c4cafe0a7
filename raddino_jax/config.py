"""Config schema, validation (before anything compiles) and the builders that read it.

Every experiment is a `configs/<name>.py` whose `get_config()` starts from `base_config()` and
changes values. The ConfigDict is locked, so a mistyped key (in a config file or a
`--config.key=value` override) is an error, never a silent default.
"""

from __future__ import annotations

import math

import ml_collections
from etils import epath

from raddino_jax.data.augment import MultiCropConfig
from raddino_jax.models import ModelSpec
from raddino_jax.models.heads import HeadConfig
from raddino_jax.models.vit import ARCHS, vit_config
from raddino_jax.ssl.objective import CENTERINGS, ObjectiveConfig
from raddino_jax.ssl.schedules import Schedules, build_schedules
from raddino_jax.train.optim import OptimizerConfig


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and what to do."""


def base_config() -> ml_collections.ConfigDict:
    """All keys with DINOv2 defaults (recipe s3-s7). Experiment configs override values."""
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
    c.debug_nan_step = -1  # testing aid: make the loss NaN at this step
    c.debug_kill_after_step = -1  # testing aid: SIGKILL this process after this step

    c.model = ml_collections.ConfigDict()
    c.model.arch = "vit_base"
    c.model.embed_dim = 0  # 0: the arch's value
    c.model.depth = 0
    c.model.num_heads = 0
    c.model.patch_size = 14
    c.model.img_size = 0  # positional grid; 0: data.global_size
    c.model.num_register_tokens = 0
    c.model.layerscale_init = 1e-5
    c.model.drop_path_rate = 0.3
    c.model.interpolate_mode = "offset"
    c.model.dtype = "bfloat16"
    c.model.remat = False
    c.model.attention_impl = ""  # "" (jax picks), "xla", "cudnn"
    c.model.head_out_dim = 65536
    c.model.head_hidden_dim = 2048
    c.model.head_bottleneck_dim = 256
    c.model.head_nlayers = 3
    c.model.separate_ibot_head = False
    c.model.ibot_out_dim = 0  # 0: head_out_dim
    c.model.ibot_bottleneck_dim = 256

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""  # from-torch output dir, or a DINOv2 / RAD-DINO torch file / HF folder
    c.init.heads = ""  # optional head file (RAD-DINO dino_head.safetensors)
    c.init.which = "teacher"  # model of a dinov2 training checkpoint

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # tfds data_dir (local or gs://); "" = built-in samples
    c.data.name = ""
    c.data.split = "train"
    c.data.builtin_phantoms = 96
    c.data.builtin_size = 256  # shorter side of the built-in samples' records
    c.data.global_size = 224
    c.data.local_size = 98
    c.data.n_local = 8
    c.data.global_scale = (0.32, 1.0)
    c.data.local_scale = (0.05, 0.32)
    c.data.mean = 0.5307
    c.data.std = 0.2583
    c.data.mask_group_size = 0  # images per iBOT mask draw; 0: the per-device batch
    c.data.mask_ratio_min_max = (0.1, 0.5)
    c.data.mask_sample_probability = 0.5
    c.data.num_workers = 0
    c.data.read_threads = 0
    c.data.prefetch = 2

    c.ssl = ml_collections.ConfigDict()
    c.ssl.student_temperature = 0.1
    c.ssl.centering = "centering"
    c.ssl.center_momentum = 0.9
    c.ssl.sinkhorn_iterations = 3
    c.ssl.dino_weight = 1.0
    c.ssl.ibot_weight = 1.0
    c.ssl.koleo_weight = 0.1
    c.ssl.koleo_group_size = 0  # 0: the per-device batch (as the reference)

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 4e-3  # per 1024 images, sqrt scaling (recipe s4)
    c.optim.min_lr = 1e-6
    c.optim.warmup_steps = 12_500
    c.optim.weight_decay = 0.04
    c.optim.weight_decay_end = 0.4
    c.optim.layerwise_decay = 0.9
    c.optim.patch_embed_lr_mult = 0.2
    c.optim.clip_norm = 3.0
    c.optim.freeze_last_layer_steps = 1250
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999

    c.teacher = ml_collections.ConfigDict()
    c.teacher.momentum = 0.992
    c.teacher.warmup_temperature = 0.04
    c.teacher.temperature = 0.07
    c.teacher.warmup_temperature_steps = 37_500

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
    _require(0 <= config.seed < 2**31, "seed", "must be in [0, 2**31)")
    m, d, s, o = config.model, config.data, config.ssl, config.optim
    _require(m.arch in ARCHS, "model.arch", f"unknown {m.arch!r}; expected one of {sorted(ARCHS)}")
    _require(m.dtype in ("float32", "bfloat16"), "model.dtype", "must be float32 or bfloat16")
    _require(0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
    _require(s.centering in CENTERINGS, "ssl.centering", f"must be one of {CENTERINGS}")
    _require(s.student_temperature > 0, "ssl.student_temperature", "must be > 0")
    _require(o.base_lr > 0, "optim.base_lr", f"must be > 0, got {o.base_lr}")
    _require(
        0 <= o.warmup_steps <= config.total_steps,
        "optim.warmup_steps",
        f"must be in [0, total_steps={config.total_steps}]",
    )
    _require(0 < o.clip_norm, "optim.clip_norm", "must be > 0")
    _require(0.0 < config.teacher.momentum <= 1.0, "teacher.momentum", "must be in (0, 1]")
    _require(
        config.teacher.temperature > 0 and config.teacher.warmup_temperature > 0,
        "teacher.temperature",
        "temperatures must be > 0",
    )
    for key in ("global_size", "local_size"):
        size = d[key]
        _require(
            size > 0 and size % m.patch_size == 0,
            f"data.{key}",
            f"{size} is not a positive multiple of model.patch_size={m.patch_size}",
        )
    _require(d.n_local >= 0, "data.n_local", "must be >= 0")
    _require(0 < d.std, "data.std", "must be > 0")
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
    koleo = s.koleo_group_size or config.batch_size // shards
    _require(
        config.batch_size % koleo == 0,
        "ssl.koleo_group_size",
        f"{koleo} does not divide batch_size {config.batch_size}",
    )
    if config.profile_steps:
        parts = config.profile_steps.split(":")
        _require(
            len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[0]) < int(parts[1]),
            "profile_steps",
            f"{config.profile_steps!r} must look like START:STOP",
        )
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


def model_spec(config: ml_collections.ConfigDict) -> ModelSpec:
    m = config.model
    overrides = {k: m[k] for k in ("embed_dim", "depth", "num_heads") if m[k]}
    backbone = vit_config(
        m.arch,
        **overrides,
        patch_size=m.patch_size,
        img_size=m.img_size or config.data.global_size,
        num_register_tokens=m.num_register_tokens,
        layerscale_init=m.layerscale_init,
        drop_path_rate=m.drop_path_rate,
        interpolate_mode=m.interpolate_mode,
        dtype=m.dtype,
        remat=m.remat,
        attention_impl=m.attention_impl or None,
    )
    head = HeadConfig(
        in_dim=backbone.embed_dim,
        out_dim=m.head_out_dim,
        hidden_dim=m.head_hidden_dim,
        bottleneck_dim=m.head_bottleneck_dim,
        nlayers=m.head_nlayers,
        dtype=m.dtype,
    )
    ibot = None
    if m.separate_ibot_head:
        ibot = head.replace(
            out_dim=m.ibot_out_dim or m.head_out_dim, bottleneck_dim=m.ibot_bottleneck_dim
        )
    return ModelSpec(backbone=backbone, dino_head=head, ibot_head=ibot)


def objective_config(config: ml_collections.ConfigDict, n_devices: int) -> ObjectiveConfig:
    s = config.ssl
    return ObjectiveConfig(
        student_temperature=s.student_temperature,
        centering=s.centering,
        center_momentum=s.center_momentum,
        sinkhorn_iterations=s.sinkhorn_iterations,
        dino_weight=s.dino_weight,
        ibot_weight=s.ibot_weight,
        koleo_weight=s.koleo_weight,
        koleo_group_size=s.koleo_group_size or per_device_batch(config, n_devices),
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
    o = config.optim
    return OptimizerConfig(
        b1=o.b1,
        b2=o.b2,
        clip_norm=o.clip_norm,
        layerwise_decay=o.layerwise_decay,
        patch_embed_lr_mult=o.patch_embed_lr_mult,
    )


def crop_config(config: ml_collections.ConfigDict) -> MultiCropConfig:
    d = config.data
    return MultiCropConfig(
        global_size=d.global_size,
        local_size=d.local_size,
        n_local=d.n_local,
        global_scale=tuple(d.global_scale),
        local_scale=tuple(d.local_scale),
        mean=d.mean,
        std=d.std,
    )


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
        remat=spec.backbone.remat,
    )["total"]


def describe(config: ml_collections.ConfigDict) -> str:
    """One line with the run's shape, for the console."""
    peak = config.optim.base_lr * math.sqrt(config.batch_size / 1024)
    return (
        f"{config.model.arch} {config.data.global_size}/{config.data.local_size}px "
        f"x{2 + config.data.n_local} crops, batch {config.batch_size}, "
        f"{config.total_steps} steps, lr peak {peak:.3g}, mesh {dict(config.mesh)}"
    )
