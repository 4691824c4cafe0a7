"""Declarative name maps between our Flax parameters and the PyTorch layouts (recipe s9).

Three layouts meet here:
- **ours**: nested dict paths like ("blocks", 3, "attn", "qkv", "kernel").
- **dinov2** (original / torch hub / RAD-DINO `backbone_compatible.safetensors`):
  "blocks.3.attn.qkv.weight". This is the hub layout used as the pivot of every conversion.
- **hf**: transformers `Dinov2Model` / `Dinov2WithRegistersModel` with v4 names
  ("encoder.layer.3.attention.attention.query.weight"); v5 names (q_proj, ...) are accepted on
  import and mapped to v4 first.

Each rule is (dinov2 regex, our path template, transform). Transforms are pure NumPy functions,
so export needs neither torch nor JAX.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import numpy as np

Array = np.ndarray


class ConversionError(ValueError):
    """A strict conversion failed; the message lists every offending tensor name."""

    def __init__(self, what: str, missing=(), unexpected=(), misshaped=(), conflicts=()):
        self.missing, self.unexpected, self.misshaped, self.conflicts = map(
            list, (missing, unexpected, misshaped, conflicts)
        )
        lines = [f"{what}: nothing was written."]
        for title, items in (
            ("missing (expected but absent)", self.missing),
            ("unexpected (present but unused)", self.unexpected),
            ("wrong shape", self.misshaped),
            ("declared architecture disagrees", self.conflicts),
        ):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in items)
        super().__init__("\n".join(lines))


# --- transforms: torch tensor -> our array, and the inverse -----------------------------------


def _identity(x: Array) -> Array:
    return x


def _linear_to_ours(w: Array) -> Array:  # torch Linear (out, in) -> Dense kernel (in, out)
    return np.ascontiguousarray(w.T)


def _conv_to_ours(w: Array) -> Array:  # torch Conv (O, I, kh, kw) -> Flax (kh, kw, I, O)
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _conv_to_torch(w: Array) -> Array:
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1))


def _gain_to_ours(g: Array) -> Array:  # weight_norm gain (K, 1) -> (K,)
    return g.reshape(-1)


def _gain_to_torch(g: Array) -> Array:
    return g.reshape(-1, 1)


TRANSFORMS: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    "identity": (_identity, _identity),
    "linear": (_linear_to_ours, _linear_to_ours),  # a transpose is its own inverse
    "conv": (_conv_to_ours, _conv_to_torch),
    "gain": (_gain_to_ours, _gain_to_torch),
}

_LINEAR = r"(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|mlp\.w12|mlp\.w3)"

# (dinov2 key regex, our path template with \1-style groups, transform name)
BACKBONE_RULES: list[tuple[str, str, str]] = [
    (r"^(cls_token|pos_embed|mask_token|register_tokens)$", r"\1", "identity"),
    (r"^patch_embed\.proj\.weight$", "patch_embed/proj/kernel", "conv"),
    (r"^patch_embed\.proj\.bias$", "patch_embed/proj/bias", "identity"),
    (rf"^blocks\.(\d+)\.{_LINEAR}\.weight$", r"blocks/\1/\2/kernel", "linear"),
    (rf"^blocks\.(\d+)\.{_LINEAR}\.bias$", r"blocks/\1/\2/bias", "identity"),
    (r"^blocks\.(\d+)\.(norm1|norm2)\.weight$", r"blocks/\1/\2/scale", "identity"),
    (r"^blocks\.(\d+)\.(norm1|norm2)\.bias$", r"blocks/\1/\2/bias", "identity"),
    (r"^blocks\.(\d+)\.(ls1|ls2)\.gamma$", r"blocks/\1/\2/gamma", "identity"),
    (r"^norm\.weight$", "norm/scale", "identity"),
    (r"^norm\.bias$", "norm/bias", "identity"),
]

# RAD-DINO / dinov2 DINOHead: torch mlp.{0,2,4} (GELUs at 1, 3) are our mlp.{0,1,2}.
HEAD_RULES: list[tuple[str, str, str]] = [
    (r"^mlp\.(\d+)\.weight$", "mlp/{half}/kernel", "linear"),
    (r"^mlp\.(\d+)\.bias$", "mlp/{half}/bias", "identity"),
    (r"^last_layer\.weight_g$", "last_layer/weight_g", "gain"),
    (r"^last_layer\.weight_v$", "last_layer/weight_v", "linear"),
]


def _our_path(template: str, match: re.Match) -> str:
    path = match.expand(template)
    if "{half}" in path:  # torch Sequential index 2i -> our list index i
        index = int(match.group(1))
        if index % 2:
            raise KeyError(match.string)
        path = path.replace("{half}", str(index // 2))
    return path.replace(".", "/")


def _rule_for(key: str, rules: list[tuple[str, str, str]]) -> tuple[str, str] | None:
    for pattern, template, transform in rules:
        match = re.match(pattern, key)
        if match:
            try:
                return _our_path(template, match), transform
            except KeyError:
                return None
    return None


def flatten(tree: dict, prefix: tuple = ()) -> dict[str, object]:
    """Nested dict -> {"a/b/0/c": leaf}."""
    flat = {}
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, dict):
            flat.update(flatten(value, path))
        else:
            flat["/".join(path)] = value
    return flat


def unflatten(flat: dict[str, object]) -> dict:
    """{"a/b/0/c": leaf} -> nested dict; all-digit components become int keys (NNX lists)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        parts = [int(p) if p.isdigit() else p for p in path.split("/")]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def torch_to_ours(
    state: dict[str, Array],
    expected: dict[str, tuple[int, ...]],
    rules: list[tuple[str, str, str]],
    what: str,
) -> dict[str, Array]:
    """Strictly map a torch state dict onto our flat paths with the given expected shapes.

    Every source tensor must be consumed, every expected path filled, every shape right;
    otherwise `ConversionError` names them all.
    """
    out: dict[str, Array] = {}
    unexpected, misshaped = [], []
    for key in sorted(state):
        rule = _rule_for(key, rules)
        if rule is None or rule[0] not in expected:
            unexpected.append(key)
            continue
        path, transform = rule
        value = TRANSFORMS[transform][0](np.asarray(state[key]))
        if tuple(value.shape) != tuple(expected[path]):
            misshaped.append(
                f"{key} -> {path}: got {tuple(value.shape)}, expected {tuple(expected[path])}"
            )
            continue
        out[path] = value
    missing = sorted(
        set(expected) - set(out) - {m.split(" -> ")[1].split(":")[0] for m in misshaped}
    )
    if unexpected or misshaped or missing:
        raise ConversionError(what, missing=missing, unexpected=unexpected, misshaped=misshaped)
    return out


def _torch_key(path: str) -> str:
    """Our flat path -> the dinov2 key it maps from (`ours_to_torch` checks it against the
    forward rules): kernel/scale are torch's weight, our head `mlp/i` is torch's `mlp.2i`."""
    key = re.sub(r"/(kernel|scale)$", "/weight", path)
    key = re.sub(r"^mlp/(\d+)/", lambda m: f"mlp/{2 * int(m[1])}/", key)
    return key.replace("/", ".")


def ours_to_torch(flat: dict[str, Array], rules: list[tuple[str, str, str]]) -> dict[str, Array]:
    """Inverse of `torch_to_ours` for a complete flat parameter dict."""
    out = {}
    for path, value in flat.items():
        key = _torch_key(path)
        rule = _rule_for(key, rules)
        if rule is None or rule[0] != path:
            raise KeyError(f"no torch name for parameter {path!r}")
        out[key] = TRANSFORMS[rule[1]][1](np.asarray(value))
    return out


# --- dinov2 <-> transformers -------------------------------------------------------------------

_HF_EMBED = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_HF_BLOCK = {  # dinov2 block suffix -> HF v4 layer suffix (qkv is split separately)
    "norm1": "norm1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w12": "mlp.weights_in",
    "mlp.w3": "mlp.weights_out",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "attn.proj": "attention.output.dense",
}
# transformers 5 in-memory names -> v4 on-disk names (recipe s9)
_HF_V5_TO_V4 = [
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.down_proj\.", ".mlp.weights_out."),
]


def dinov2_to_hf(state: dict[str, Array]) -> dict[str, Array]:
    """Hub-layout state dict -> transformers v4 names (223 tensors for ViT-B, recipe s9)."""
    out = {}
    for key, value in state.items():
        if key in _HF_EMBED:
            out[_HF_EMBED[key]] = value
            continue
        match = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key)
        if not match:
            raise KeyError(f"no transformers name for {key!r}")
        layer, module, kind = match.groups()
        prefix = f"encoder.layer.{layer}."
        if module == "attn.qkv":
            q, k, v = np.split(value, 3, axis=0)  # rows q | k | v
            for name, part in zip(("query", "key", "value"), (q, k, v)):
                out[f"{prefix}attention.attention.{name}.{kind}"] = np.ascontiguousarray(part)
        elif kind == "gamma":
            out[prefix + _HF_BLOCK[f"{module}.gamma"]] = value
        else:
            out[f"{prefix}{_HF_BLOCK[module]}.{kind}"] = value
    return out


def hf_to_dinov2(state: dict[str, Array]) -> dict[str, Array]:
    """transformers Dinov2(WithRegisters)Model tensors (v4 or v5 names) -> hub layout.

    Keys it cannot place are kept unchanged so that the strict check reports them.
    """
    state = {re.sub(r"^(dinov2|dinov2_with_registers)\.", "", k): v for k, v in state.items()}
    v4: dict[str, Array] = {}
    gate_up: dict[str, dict[str, Array]] = {}
    for key, value in state.items():
        for pattern, repl in _HF_V5_TO_V4:
            key = re.sub(pattern, repl, key)
        match = re.match(r"^(encoder\.layer\.\d+)\.mlp\.(gate_proj|up_proj)\.(weight|bias)$", key)
        if match:
            gate_up.setdefault(f"{match[1]}.mlp.weights_in.{match[3]}", {})[match[2]] = value
            continue
        v4[key] = value
    for key, parts in gate_up.items():  # v5 splits weights_in into gate (x1) | up (x2)
        if set(parts) != {"gate_proj", "up_proj"}:
            v4[key.replace("weights_in", "gate_or_up_proj_unpaired")] = next(iter(parts.values()))
            continue
        v4[key] = np.concatenate([parts["gate_proj"], parts["up_proj"]], axis=0)

    embed_inverse = {hf: ours for ours, hf in _HF_EMBED.items()}
    block_inverse = {hf: ours for ours, hf in _HF_BLOCK.items()}
    out: dict[str, Array] = {}
    qkv: dict[tuple[str, str], dict[str, Array]] = {}
    for key, value in v4.items():
        if key in embed_inverse:
            out[embed_inverse[key]] = value
            continue
        match = re.match(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", key)
        if not match:
            out[key] = value  # unknown: reported by the strict check
            continue
        layer, module, kind = match.groups()
        qkv_match = re.match(r"^attention\.attention\.(query|key|value)$", module)
        if qkv_match:
            qkv.setdefault((layer, kind), {})[qkv_match[1]] = value
        elif kind == "lambda1" and f"{module}.lambda1" in block_inverse:
            out[f"blocks.{layer}.{block_inverse[f'{module}.lambda1']}"] = value
        elif module in block_inverse:
            out[f"blocks.{layer}.{block_inverse[module]}.{kind}"] = value
        else:
            out[key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            prefix = f"encoder.layer.{layer}.attention.attention"
            out.update({f"{prefix}.{name}.{kind}(incomplete qkv)": v for name, v in parts.items()})
            continue
        out[f"blocks.{layer}.attn.qkv.{kind}"] = np.concatenate(
            [parts["query"], parts["key"], parts["value"]], axis=0
        )
    return out


def unchunk_blocks(state: dict[str, Array]) -> dict[str, Array]:
    """FSDP training keys `blocks.<chunk>.<i>.x` -> hub keys `blocks.<i>.x` (recipe s1)."""
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}


def weight_norm_aliases(state: dict[str, Array]) -> dict[str, Array]:
    """torch>=2.1 parametrize.weight_norm names -> classic weight_g / weight_v."""
    renames = {
        "last_layer.parametrizations.weight.original0": "last_layer.weight_g",
        "last_layer.parametrizations.weight.original1": "last_layer.weight_v",
    }
    return {renames.get(k, k): v for k, v in state.items()}


def split_prefixed(state: dict[str, Array], prefixes: Iterable[str]) -> dict[str, dict[str, Array]]:
    """{"backbone.x": a, "dino_head.y": b} -> {"backbone": {"x": a}, "dino_head": {"y": b}}.

    Keys without any of the prefixes land under "" so that they are reported, not dropped.
    """
    groups: dict[str, dict[str, Array]] = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix + "."):
                groups.setdefault(prefix, {})[key[len(prefix) + 1 :]] = value
                break
        else:
            groups.setdefault("", {})[key] = value
    return groups
