"""Model assembly: backbone + DINO head (+ optional separate iBOT head) and its JSON spec."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from flax import nnx

from raddino_jax.models.attention import resolve_attention_impl
from raddino_jax.models.heads import DINOHead, HeadConfig
from raddino_jax.models.vit import DinoVisionTransformer, ViTConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a parameter tree: stored next to every checkpoint.

    `ibot_head` is None when iBOT shares the DINO head (recipe s2 default and RAD-DINO).
    """

    backbone: ViTConfig
    dino_head: HeadConfig | None = None
    ibot_head: HeadConfig | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": "raddino_jax.model_spec/1",
                "backbone": dataclasses.asdict(self.backbone),
                "dino_head": dataclasses.asdict(self.dino_head) if self.dino_head else None,
                "ibot_head": dataclasses.asdict(self.ibot_head) if self.ibot_head else None,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        data = json.loads(text)
        if data.get("format") != "raddino_jax.model_spec/1":
            raise ValueError(f"not a raddino_jax model spec (format={data.get('format')!r})")

        def head(d: dict | None) -> HeadConfig | None:
            return HeadConfig(**d) if d else None

        return cls(ViTConfig(**data["backbone"]), head(data["dino_head"]), head(data["ibot_head"]))

    def replace(self, **kwargs: Any) -> ModelSpec:
        return dataclasses.replace(self, **kwargs)

    def for_platform(self, platform: str) -> ModelSpec:
        """This spec with the attention implementation resolved for `platform` (the platform
        of the mesh's devices the step is lowered for: "tpu", "gpu", "cpu"); a forced
        `attention_impl` is kept (`attention.resolve_attention_impl`); the lean backward passes are
        turned off for TPU unless `lean_backward` forces them (`ViTConfig.lean_backward`)."""
        backbone = self.backbone
        impl = resolve_attention_impl(backbone.attention_impl, platform, backbone.dtype)
        lean = backbone.lean_backward or ("off" if platform == "tpu" else "on")
        return self.replace(backbone=backbone.replace(attention_impl=impl, lean_backward=lean))


class SSLModel(nnx.Module):
    """Student or teacher: `backbone`, `dino_head` and, when separate, `ibot_head`."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        self.backbone = DinoVisionTransformer(spec.backbone, rngs=rngs)
        if spec.dino_head is not None:
            self.dino_head = DINOHead(spec.dino_head, rngs=rngs)
        if spec.ibot_head is not None:
            self.ibot_head = DINOHead(spec.ibot_head, rngs=rngs)


def abstract_params(spec: ModelSpec) -> dict:
    """Pure nested dict of `jax.ShapeDtypeStruct` for `spec` (no allocation)."""
    model = nnx.eval_shape(lambda: SSLModel(spec, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param).to_pure_dict()


def init_params(spec: ModelSpec, seed: int) -> dict:
    """Freshly initialised parameters (pure nested dict of arrays)."""
    model = SSLModel(spec, rngs=nnx.Rngs(seed))
    return nnx.state(model, nnx.Param).to_pure_dict()


def bind(spec: ModelSpec, params: dict) -> SSLModel:
    """An `SSLModel` whose parameters are `params` (works inside jit: no re-initialisation)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: SSLModel(spec, rngs=nnx.Rngs(0))))
    state.replace_by_pure_dict(params)
    return nnx.merge(graphdef, state)
