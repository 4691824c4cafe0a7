"""Import PyTorch DINOv2 / RAD-DINO weights into a raddino_jax parameter checkpoint.

Accepted inputs (recipe s9):
- a transformers `Dinov2Model` / `Dinov2WithRegistersModel` folder (config.json +
  model.safetensors or pytorch_model.bin, v4 or v5 names);
- an original dinov2 checkpoint (.pth / .safetensors): a raw hub state dict, or a training
  checkpoint nested as {"model": ...} / {"teacher": ...} / {"student": ...} with `backbone.`,
  `dino_head.`, `ibot_head.` prefixes and FSDP-chunked `blocks.<chunk>.<i>` keys;
- RAD-DINO's `backbone_compatible.safetensors` (+ `dino_head.safetensors` via `heads`).
The import is strict: every tensor consumed, every parameter filled, every shape checked.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
from etils import epath

from raddino_jax.convert import declared, names
from raddino_jax.models import ModelSpec, abstract_params
from raddino_jax.models.heads import HeadConfig
from raddino_jax.models.vit import ViTConfig

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def load_tensor_file(path: str | epath.Path) -> dict:
    """A .safetensors or torch pickle file -> nested dict whose leaves are float32 NumPy arrays."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        from safetensors.numpy import load as load_np

        try:
            return {k: v.astype(np.float32) for k, v in load_np(data).items()}
        except (TypeError, ValueError):  # e.g. bfloat16 tensors numpy cannot hold
            from safetensors.torch import load as load_torch

            return {k: v.float().numpy() for k, v in load_torch(data).items()}
    if path.suffix in TORCH_SUFFIXES:
        return _load_torch_pickle(data, path)
    raise ValueError(
        f"{path}: unknown weight file type; expected .safetensors or one of {TORCH_SUFFIXES}"
    )


def _load_torch_pickle(data: bytes, path) -> dict:
    try:
        import io

        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs torch; install requirements-test.txt") from err
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return _to_numpy_tree(obj)


def _to_numpy_tree(obj):
    if isinstance(obj, dict):
        return {k: _to_numpy_tree(v) for k, v in obj.items()}
    if hasattr(obj, "detach"):
        return obj.detach().float().numpy()
    return obj


def _read_hf_folder(folder: epath.Path) -> tuple[dict, dict]:
    config = json.loads((folder / "config.json").read_text())
    if (folder / "model.safetensors").exists():
        return config, load_tensor_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        state: dict = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_tensor_file(folder / shard))
        return config, state
    if (folder / "pytorch_model.bin").exists():
        return config, load_tensor_file(folder / "pytorch_model.bin")
    raise FileNotFoundError(f"{folder}: no model.safetensors / pytorch_model.bin next to "
                            "config.json")


def _unwrap(obj: dict, which: str) -> dict:
    """Peel training-checkpoint nesting ({"model": ...}, {"teacher": ...}) down to tensors."""
    while True:
        if which in obj and isinstance(obj[which], dict):
            obj = obj[which]
        elif "model" in obj and isinstance(obj["model"], dict):
            obj = obj["model"]
        elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        else:
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not tensors:
        raise ValueError(f"no tensors found (top-level keys: {sorted(obj)[:10]})")
    # module. (DDP) prefixes
    return {re.sub(r"^module\.", "", k): v for k, v in tensors.items()}


def infer_vit_config(state: dict, hf_config: dict | None = None, **overrides) -> ViTConfig:
    """Architecture from hub-layout tensors (+ transformers config.json when available).

    Head count is not recoverable from weights alone: taken from config.json, else D // 64 (all
    DINOv2 models use 64-dim heads), else `num_heads` in overrides.
    """
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise names.ConversionError("cannot infer the architecture", missing=[key])
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    declared = overrides.get("patch_size") or (hf_config or {}).get("patch_size")
    if declared is not None and declared != patch:
        raise names.ConversionError(
            "patch size disagrees with the weights",
            misshaped=[
                f"patch_embed.proj.weight: {patch}x{patch} kernel, but patch_size={declared} "
                "(from config.json or --patch-size)"
            ],
        )
    in_chans = state["patch_embed.proj.weight"].shape[1]
    positions = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise ValueError(f"pos_embed has {positions} patch positions: not a square grid")
    block_ids = {int(m[1]) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))}
    depth = max(block_ids) + 1 if block_ids else 0
    swiglu = "blocks.0.mlp.w12.weight" in state
    hidden = (
        state["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state else 4 * dim
    )
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    heads = (hf_config or {}).get("num_attention_heads") or max(dim // 64, 1)
    mlp_ratio = (hf_config or {}).get("mlp_ratio") or (4.0 if swiglu else hidden / dim)
    kwargs = dict(
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        patch_size=patch,
        img_size=grid * patch,
        in_chans=in_chans,
        mlp_ratio=float(mlp_ratio),
        ffn_layer="swiglu" if swiglu else "mlp",
        num_register_tokens=registers,
        interpolate_mode="size_antialias" if registers else "offset",
    )
    if hf_config is not None:
        kwargs["layer_norm_eps"] = hf_config.get("layer_norm_eps", 1e-6)
        kwargs["interpolate_mode"] = "size_antialias" if registers else "size"
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return ViTConfig(**kwargs)


def infer_head_config(state: dict, dtype: str = "float32") -> HeadConfig:
    """DINO head sizes from its tensors (mlp.{0,2,4}, last_layer.weight_g/v)."""
    layers = sorted(int(m[1]) for k in state if (m := re.match(r"^mlp\.(\d+)\.weight$", k)))
    if not layers or "last_layer.weight_v" not in state:
        raise names.ConversionError(
            "not a DINO head state dict", missing=["mlp.0.weight", "last_layer.weight_v"]
        )
    first, last = state[f"mlp.{layers[0]}.weight"], state[f"mlp.{layers[-1]}.weight"]
    return HeadConfig(
        in_dim=first.shape[1],
        hidden_dim=first.shape[0],
        bottleneck_dim=last.shape[0],
        out_dim=state["last_layer.weight_v"].shape[0],
        nlayers=len(layers),
        dtype=dtype,
    )


def read_torch_weights(
    input_path: str | epath.Path,
    heads_path: str | epath.Path | None = None,
    which: str = "teacher",
    **overrides,
) -> tuple[ModelSpec, dict]:
    """Read any supported PyTorch source -> (spec, params) with strict name/shape checks."""
    input_path = epath.Path(input_path)
    hf_config = None
    if input_path.is_dir():
        if not (input_path / "config.json").exists():
            raise FileNotFoundError(f"{input_path}: a folder input needs a transformers "
                                    "config.json")
        hf_config, raw = _read_hf_folder(input_path)
    else:
        raw = load_tensor_file(input_path)
    state = _unwrap(raw, which)
    groups = names.split_prefixed(state, ("backbone", "dino_head", "ibot_head"))
    backbone = groups.pop("backbone", None) or groups.pop("", {})
    if "" in groups:  # unprefixed leftovers next to prefixed groups
        backbone = {**backbone, **{f"(unprefixed) {k}": v for k, v in groups.pop("").items()}}
    if any(k.startswith(("embeddings.", "encoder.layer.", "dinov2.")) for k in backbone):
        hf_config = hf_config or {}
        backbone = names.hf_to_dinov2(backbone)
    backbone = names.unchunk_blocks(backbone)
    declared.check_overrides(hf_config, overrides)
    if all(k in backbone for k in ("cls_token", "pos_embed", "patch_embed.proj.weight")):
        declared.check_backbone(backbone, hf_config, str(input_path))

    head_states = {k: names.weight_norm_aliases(v) for k, v in groups.items()}
    if heads_path is not None:
        if "dino_head" in head_states:
            raise ValueError(
                f"{input_path} already contains a dino_head; drop --heads {heads_path}"
            )
        head_raw = _unwrap(load_tensor_file(heads_path), which)
        head_raw = names.split_prefixed(head_raw, ("dino_head",))
        head_states["dino_head"] = names.weight_norm_aliases(
            head_raw.get("dino_head") or head_raw.get("", {})
        )
        infer_head_config(head_states["dino_head"])  # a clear error when it is not a head
        declared.check_head(head_states["dino_head"], heads_path)

    vit = infer_vit_config(backbone, hf_config, **overrides)
    spec = ModelSpec(vit, **{h: infer_head_config(state) for h, state in head_states.items()})
    abstract = abstract_params(spec)
    sources = {"backbone": (backbone, names.BACKBONE_RULES, input_path)}
    for head, head_state in head_states.items():
        sources[head] = (head_state, names.HEAD_RULES, heads_path or input_path)
    params = {}
    for part, (state, rules, source) in sources.items():
        expected = {k: tuple(v.shape) for k, v in names.flatten(abstract[part]).items()}
        flat = names.torch_to_ours(state, expected, rules, f"{part} of {source}")
        params[part] = names.unflatten(flat)
    return spec, params
