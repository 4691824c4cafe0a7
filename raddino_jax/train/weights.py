"""The weights a run starts from: `config.init` (a run, an Orbax params checkpoint, or
DINOv2 / RAD-DINO PyTorch weights) with fresh heads where none match."""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections

from raddino_jax import checkpoint
from raddino_jax import config as config_lib
from raddino_jax.models import ModelSpec, abstract_params, init_params


def initial_params(
    config: ml_collections.ConfigDict, spec: ModelSpec, say: Callable[[str], None] = print
) -> dict | None:
    """Pretrained weights from `config.init` merged with fresh heads where none are given."""
    path = config.init.checkpoint
    if not path:
        return None
    if checkpoint.is_param_checkpoint(path) or checkpoint.is_run_dir(path):
        _, loaded = checkpoint.load_any_params(path, which=config.init.which)
    else:
        from raddino_jax.convert.from_torch import read_torch_weights

        _, loaded = read_torch_weights(
            path,
            config.init.heads or None,
            which=config.init.which,
            num_heads=spec.backbone.num_heads,
        )
    expected = abstract_params(spec)
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)  # noqa: E731
    if shapes(loaded["backbone"]) != shapes(expected["backbone"]):
        raise config_lib.ConfigError(
            f"config.init.checkpoint: the backbone in {path} does not match config.model "
            f"(e.g. pos_embed {loaded['backbone']['pos_embed'].shape} vs "
            f"{expected['backbone']['pos_embed'].shape}, depth/width/patch); set config.model "
            "(arch, img_size, patch_size, num_register_tokens) to the checkpoint's architecture"
        )
    fresh = init_params(spec, config.seed)
    params = {"backbone": loaded["backbone"]}
    for head in ("dino_head", "ibot_head"):
        if head not in expected:
            continue
        if head in loaded and shapes(loaded[head]) == shapes(expected[head]):
            params[head] = loaded[head]
            say(f"init: {head} from {path}")
        else:
            params[head] = fresh[head]
            say(f"init: fresh {head} (none matching in {path})")
    return params
