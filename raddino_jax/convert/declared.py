"""What a source *declares* about its architecture, checked against what its tensors hold.

A damaged or mismatched checkpoint must not silently become a different model: when a
transformers `config.json` sits next to the weights, every architecture field it declares has
to agree with the tensors (or with a command-line override), and a DINO head file's declared
sizes (safetensors metadata written by our exporter, or the `dino:` section of dinov2 YAML
configs next to it, as RAD-DINO ships them) have to agree with the head tensors. Any
disagreement raises `ConversionError` naming the field, before anything is written.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from etils import epath

from raddino_jax.convert.names import ConversionError

# dinov2 YAML `dino:` keys -> what they size in a DINO head state dict.
HEAD_FIELDS = ("head_n_prototypes", "head_hidden_dim", "head_bottleneck_dim", "head_nlayers")


def _registers_declared(hf_config: dict) -> int:
    """transformers' default is 4 registers for the with-registers model type, 0 otherwise."""
    with_registers = hf_config.get("model_type") == "dinov2_with_registers" or any(
        "WithRegisters" in a for a in hf_config.get("architectures") or []
    )
    return int(hf_config.get("num_register_tokens", 4 if with_registers else 0))


def swiglu_hidden(embed_dim: int, mlp_ratio: float) -> int:
    """Per-branch SwiGLU width transformers builds: round_up_8(int(int(D * ratio) * 2 / 3))."""
    hidden = int(embed_dim * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


def backbone_conflicts(state: dict[str, np.ndarray], hf_config: dict) -> list[str]:
    """Every architecture field of `hf_config` that disagrees with hub-layout `state`.

    Each entry reads `config.json <field>=<declared>: <what the weights hold>`.
    """
    conflicts: list[str] = []

    def check(field: str, actual: Any, what: str, declared: Any = None) -> None:
        declared = hf_config.get(field) if declared is None else declared
        if declared is not None and declared != actual:
            conflicts.append(f"config.json {field}={declared!r}: {what}")

    dim = state["cls_token"].shape[-1]
    kernel = state["patch_embed.proj.weight"]
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    positions = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(positions)
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    swiglu = "blocks.0.mlp.w12.weight" in state

    check("hidden_size", dim, f"cls_token has width {dim}")
    check("num_hidden_layers", depth, f"{depth} blocks in weights")
    heads = hf_config.get("num_attention_heads")
    if heads is not None and (heads <= 0 or dim % heads):
        conflicts.append(f"config.json num_attention_heads={heads!r}: does not divide width {dim}")
    check("patch_size", kernel.shape[-1], f"{kernel.shape[-1]}px kernel")
    check("num_channels", kernel.shape[1], "input channels of kernel")
    if "image_size" in hf_config and hf_config.get("patch_size", kernel.shape[-1]):
        patch = hf_config.get("patch_size", kernel.shape[-1])
        what = f"pos_embed holds a {grid}x{grid} grid ({positions} positions)"
        check("image_size", grid * patch, what)
    what = f"register_tokens holds {registers}"
    if not registers:
        what = "no embeddings.register_tokens tensor"
    check("num_register_tokens", registers, what, declared=_registers_declared(hf_config))
    what = "weights have SwiGLU (weights_in/w12) layers" if swiglu else "weights have fc1/fc2 MLPs"
    check("use_swiglu_ffn", swiglu, what, declared=bool(hf_config.get("use_swiglu_ffn", False)))
    ratio = hf_config.get("mlp_ratio")
    layer = "blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"
    if ratio is not None and layer in state:
        want = 2 * swiglu_hidden(dim, ratio) if swiglu else int(dim * ratio)
        got = state[layer].shape[0]
        if want != got:
            name = "weights_in (w12)" if swiglu else "fc1"
            conflicts.append(
                f"config.json mlp_ratio={ratio!r}: {name} has {got} rows, the ratio gives {want}"
            )
    if "layerscale_value" in hf_config and depth and "blocks.0.ls1.gamma" not in state:
        conflicts.append(
            f"config.json layerscale_value={hf_config['layerscale_value']!r}: weights have no "
            "layer-scale tensors"
        )
    if hf_config.get("qkv_bias") is False and "blocks.0.attn.qkv.bias" in state:
        conflicts.append("config.json qkv_bias=False: weights have attention biases")
    eps = hf_config.get("layer_norm_eps")
    if eps is not None and not (isinstance(eps, int | float) and eps > 0):
        conflicts.append(f"config.json layer_norm_eps={eps!r}: must be a positive number")
    act = hf_config.get("hidden_act")
    if act is not None and act != "gelu":
        conflicts.append(f"config.json hidden_act={act!r}: only exact (erf) 'gelu' is supported")
    return conflicts


def check_overrides(hf_config: dict | None, overrides: dict[str, Any]) -> None:
    """Command-line values must not contradict the architecture config.json declares."""
    if not hf_config:
        return
    pairs = {"num_heads": "num_attention_heads", "patch_size": "patch_size"}
    conflicts = [
        f"--{flag.replace('_', '-')}={overrides[flag]} but config.json {field}={hf_config[field]!r}"
        for flag, field in pairs.items()
        if overrides.get(flag) is not None
        and field in hf_config
        and overrides[flag] != hf_config[field]
    ]
    if conflicts:
        raise ConversionError("command line disagrees with config.json", conflicts=conflicts)


def check_backbone(state: dict[str, np.ndarray], hf_config: dict | None, source: str) -> None:
    """Raise when `config.json` declares an architecture the tensors do not have."""
    if not hf_config:
        return
    conflicts = backbone_conflicts(state, hf_config)
    if conflicts:
        raise ConversionError(
            f"{source}: config.json disagrees with the weights", conflicts=conflicts
        )


def _safetensors_metadata(path: epath.Path) -> dict[str, str]:
    """The `__metadata__` of a .safetensors file's JSON header (empty for other files)."""
    if path.suffix != ".safetensors":
        return {}
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return dict(header.get("__metadata__") or {})


def _yaml_dino_section(folder: epath.Path) -> tuple[dict[str, Any], list[str]]:
    """Merged `dino:` section of the dinov2 YAML configs in `folder`: `ssl_default_config.yaml`
    first, then every other `*.yaml` (sorted) over it, as dinov2 layers a run config over its
    defaults. Returns (section, files read)."""
    import yaml

    files = sorted(
        folder.glob("*.yaml"), key=lambda p: (p.name != "ssl_default_config.yaml", p.name)
    )
    merged: dict[str, Any] = {}
    read: list[str] = []
    for path in files:
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err}); fix or remove it") from err
        section = document.get("dino") if isinstance(document, dict) else None
        if isinstance(section, dict):
            merged.update({k: section[k] for k in HEAD_FIELDS if k in section})
            read.append(path.name)
    return merged, read


def declared_head_sizes(heads_path: str | epath.Path) -> dict[str, tuple[int, str]]:
    """{field: (declared value, where it is declared)} for a DINO head file."""
    path = epath.Path(heads_path)
    declared: dict[str, tuple[int, str]] = {}
    section, files = _yaml_dino_section(path.parent)
    for field, value in section.items():
        declared[field] = (int(value), f"dino.{field} in {', '.join(files)}")
    for field, value in _safetensors_metadata(path).items():
        if field in HEAD_FIELDS:
            declared[field] = (int(value), f"{field} in the metadata of {path.name}")
    return declared


def head_sizes(head_state: dict[str, np.ndarray]) -> dict[str, int]:
    """The HEAD_FIELDS a torch DINO head state dict actually has (mlp.{0,2,4}, last_layer)."""
    layers = sorted(
        int(k.split(".")[1]) for k in head_state if k.startswith("mlp.") and k.endswith(".weight")
    )
    return {
        "head_n_prototypes": head_state["last_layer.weight_v"].shape[0],
        "head_hidden_dim": head_state[f"mlp.{layers[0]}.weight"].shape[0],
        "head_bottleneck_dim": head_state[f"mlp.{layers[-1]}.weight"].shape[0],
        "head_nlayers": len(layers),
    }


def head_metadata(head_state: dict[str, np.ndarray]) -> dict[str, str]:
    """safetensors metadata declaring a head's sizes (read back by `declared_head_sizes`)."""
    return {field: str(value) for field, value in head_sizes(head_state).items()}


def check_head(head_state: dict[str, np.ndarray], heads_path: str | epath.Path) -> None:
    """Raise when a head file's declared sizes disagree with its tensors."""
    actual = head_sizes(head_state)
    conflicts = [
        f"{where} = {value}: the tensors have {actual[field]}"
        for field, (value, where) in declared_head_sizes(heads_path).items()
        if actual[field] != value
    ]
    if conflicts:
        raise ConversionError(f"{heads_path}: declared head sizes disagree", conflicts=conflicts)
