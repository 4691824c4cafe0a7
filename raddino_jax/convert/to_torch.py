"""Export raddino_jax parameters to PyTorch layouts: transformers folders and the dinov2 hub layout.

Export needs only NumPy and safetensors. Weights are written with transformers v4 names (v4 and
v5 both load them, docs/conventions.md) and the original hub names (unchunked `blocks.<i>`).
"""

from __future__ import annotations

import json

import numpy as np
from etils import epath

from raddino_jax.checkpoint import Preprocessing
from raddino_jax.convert import names
from raddino_jax.models import ModelSpec


def to_numpy_flat(tree: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32) for k, v in names.flatten(tree).items()}


def backbone_to_dinov2(params: dict) -> dict[str, np.ndarray]:
    """Backbone params -> hub-layout state dict (175 tensors for ViT-B/14, recipe s9)."""
    return names.ours_to_torch(to_numpy_flat(params["backbone"]), names.BACKBONE_RULES)


def head_to_dinov2(head_params: dict) -> dict[str, np.ndarray]:
    """DINO head params -> RAD-DINO `dino_head.safetensors` names."""
    return names.ours_to_torch(to_numpy_flat(head_params), names.HEAD_RULES)


def hf_config(spec: ModelSpec) -> dict:
    """A transformers config.json with every field explicit."""
    vit = spec.backbone
    registers = vit.num_register_tokens > 0
    if vit.ffn_layer == "mlp" and int(vit.embed_dim * vit.mlp_ratio) != vit.ffn_hidden:
        raise ValueError("mlp_ratio does not give an integer hidden size transformers can rebuild")
    config = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": vit.embed_dim,
        "num_hidden_layers": vit.depth,
        "num_attention_heads": vit.num_heads,
        "mlp_ratio": vit.mlp_ratio if vit.mlp_ratio != int(vit.mlp_ratio) else int(vit.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": vit.layer_norm_eps,
        "image_size": vit.img_size,
        "patch_size": vit.patch_size,
        "num_channels": vit.in_chans,
        "qkv_bias": True,
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": vit.ffn_layer == "swiglu",
        "use_mask_token": True,
        "apply_layernorm": True,
        "reshape_hidden_states": True,
        "out_features": [f"stage{vit.depth}"],
        "out_indices": [vit.depth],
        "stage_names": ["stem"] + [f"stage{i}" for i in range(1, vit.depth + 1)],
        "torch_dtype": "float32",
    }
    if registers:
        config["num_register_tokens"] = vit.num_register_tokens
    return config


def preprocessor_config(pre: Preprocessing) -> dict:
    """BitImageProcessor settings for the project's radiograph preprocessing (recipe s8)."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": pre.image_size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": pre.image_size, "width": pre.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [pre.mean] * 3,
        "image_std": [pre.std] * 3,
        "do_convert_rgb": True,
    }


def write_hf(
    out: str | epath.Path, spec: ModelSpec, params: dict, pre: Preprocessing
) -> epath.Path:
    """Write config.json, model.safetensors (v4 names) and preprocessor_config.json."""
    from safetensors.numpy import save as save_np

    out = epath.Path(out)
    tensors = names.dinov2_to_hf(backbone_to_dinov2(params))
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(save_np(tensors, metadata={"format": "pt"}))
    (out / "config.json").write_text(json.dumps(hf_config(spec), indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(pre), indent=2))
    return out


def write_state_dict(
    path: str | epath.Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> epath.Path:
    """.safetensors with NumPy only (with `metadata` in its header); .pth / .pt through torch."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save as save_np

        path.write_bytes(save_np(tensors, metadata={"format": "pt", **(metadata or {})}))
    elif path.suffix in (".pth", ".pt"):
        import io

        import torch

        buffer = io.BytesIO()
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
                   buffer)
        path.write_bytes(buffer.getvalue())
    else:
        raise ValueError(f"{path}: output must end in .safetensors, .pth or .pt")
    return path
