"""`ReferenceConfig`: every number of one reference train step, as plain JSON.

Scope: what the reference models: the "centering" teacher, one DINO head shared with iBOT, MLP
blocks without registers, no stochastic depth, no Gram anchoring, float32. `from_config` raises
ValueError for anything else. This module imports neither torch nor JAX at import time.
"""

from __future__ import annotations

import dataclasses
import json

# torch.optim.AdamW implementations: multi-tensor (foreach) or the fused CPU/GPU kernel.
ADAMW_IMPLS = ("foreach", "fused")


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """Every number of one train step (architecture, objective, optimiser, schedules)."""

    # backbone
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    in_chans: int
    mlp_ratio: float
    layer_norm_eps: float
    interpolate_offset: float
    # the DINO head, shared with iBOT
    head_hidden_dim: int
    head_bottleneck_dim: int
    head_out_dim: int
    head_nlayers: int
    # objective
    student_temperature: float
    center_momentum: float
    dino_weight: float
    ibot_weight: float
    koleo_weight: float
    koleo_group_size: int
    # optimiser
    b1: float
    b2: float
    eps: float
    clip_norm: float
    layerwise_decay: float
    patch_embed_lr_mult: float
    # schedules (lengths in steps; base_lr per 1024 images, sqrt scaling)
    base_lr: float
    global_batch: int
    total_steps: int
    warmup_steps: int
    min_lr: float
    freeze_last_layer_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    warmup_teacher_temp: float
    teacher_temp: float
    warmup_teacher_temp_steps: int
    adamw: str = "foreach"
    # integer crops (pixel levels) are normalised with these: (x / dtype max - mean) / std
    pixel_mean: float | None = None
    pixel_std: float | None = None

    def __post_init__(self) -> None:
        if self.adamw not in ADAMW_IMPLS:
            raise ValueError(f"adamw must be one of {ADAMW_IMPLS}, got {self.adamw!r}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ReferenceConfig:
        return cls(**json.loads(text))


def from_config(config, adamw: str = "foreach") -> ReferenceConfig:
    """The `ReferenceConfig` of a raddino_jax config (one device); ValueError for what the
    reference does not model.

    Every number comes from the run's own builders (`train.build`) under the same name: the
    schedules' arguments, the objective, the optimiser, the backbone and, with a "head_"
    prefix, the head; the pixel statistics from `config.data.mean / std`. The reference
    computes its schedules, rules and losses itself.
    """
    from raddino_jax.train import build as build_lib
    from raddino_jax.train.optim import OptimizerConfig

    spec = build_lib.model_spec(config)
    vit, head = spec.backbone, spec.dino_head
    objective = build_lib.objective_config(config, 1)
    optim = build_lib.optimizer_config(config)
    defaults = OptimizerConfig()
    unsupported = {
        "separate iBOT head": spec.ibot_head is not None,
        "register tokens": vit.num_register_tokens > 0,
        "SwiGLU": vit.ffn_layer != "mlp",
        "drop path": vit.drop_path_rate > 0,
        "non-float32 compute": vit.dtype != "float32" or head.dtype != "float32",
        "interpolation other than 'offset'": vit.interpolate_mode != "offset",
        "Sinkhorn-Knopp": objective.centering != "centering",
        "Gram anchoring": objective.gram_enabled,
        "custom optimiser rules": any(
            getattr(optim, name) != getattr(defaults, name)
            for name in ("lr_mult_rules", "wd_mult_rules", "layer_id_rules", "last_layer_regex")
        ),
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ValueError(f"the torch reference does not implement: {', '.join(found)}")
    values = {
        **dataclasses.asdict(vit),
        **{f"head_{k}": v for k, v in dataclasses.asdict(head).items()},
        **dataclasses.asdict(objective),
        **dataclasses.asdict(optim),
        **build_lib.schedule_args(config),
        "pixel_mean": config.data.mean,
        "pixel_std": config.data.std,
    }
    fields = {f.name for f in dataclasses.fields(ReferenceConfig)} - {"adamw"}
    missing = sorted(fields - set(values))
    if missing:
        raise ValueError(f"no value in the config for the reference's {missing}")
    return ReferenceConfig(**{name: values[name] for name in fields}, adamw=adamw)
