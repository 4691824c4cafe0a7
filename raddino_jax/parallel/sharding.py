"""The ONE place that maps parameter / state / batch names to mesh axes.

Parameters: tensor parallelism is declared per name pattern (attention and MLP weights, the head's
prototype axis); FSDP then takes the largest remaining dimension divisible by the fsdp size.
The pattern table is data: `TENSOR_RULES` is the default of `config.sharding.tensor_rules`, and
every function takes the table in force as `rules`.
Anything else is replicated. Optimizer-state leaves inherit the spec of the parameter whose path
they end with (Adam's mu/nu mirror the parameter tree), scalars are replicated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from raddino_jax.data.layout import IMAGE_AXIS
from raddino_jax.parallel.mesh import BATCH_AXES

Rules = tuple[tuple[str, tuple[str | None, ...]], ...]

# (regex on the "/"-joined path, per-dimension tensor-parallel placement); first match wins.
TENSOR_RULES: Rules = (
    (r"attn/qkv/kernel$", (None, "tensor")),  # column parallel
    (r"attn/qkv/bias$", ("tensor",)),
    (r"attn/proj/kernel$", ("tensor", None)),  # row parallel
    (r"mlp/(fc1|w12)/kernel$", (None, "tensor")),
    (r"mlp/(fc1|w12)/bias$", ("tensor",)),
    (r"mlp/(fc2|w3)/kernel$", ("tensor", None)),
    (r"last_layer/weight_v$", (None, "tensor")),  # prototypes K split over tensor
    (r"last_layer/weight_g$", ("tensor",)),
)


def path_str(path) -> str:
    """A pytree path as "a/b/0/c" (the names the rules match)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def param_spec(
    path: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules = TENSOR_RULES
) -> PartitionSpec:
    """PartitionSpec of one parameter: tensor rule, then FSDP on the largest divisible dim."""
    dims: list[str | None] = [None] * len(shape)
    tensor = mesh.shape["tensor"]
    for pattern, placement in rules:
        if re.search(pattern, path) and len(placement) == len(shape):
            for i, axis in enumerate(placement):
                if axis is not None and tensor > 1 and shape[i] % tensor == 0:
                    dims[i] = axis
            break
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1:
        free = [i for i in range(len(shape)) if dims[i] is None and shape[i] % fsdp == 0]
        if free:
            dims[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    return PartitionSpec(*dims)


def _suffix_index(
    param_tree, mesh: Mesh, rules: Rules
) -> dict[str, tuple[tuple[int, ...], PartitionSpec]]:
    flat = jax.tree_util.tree_flatten_with_path(param_tree)[0]
    return {
        path_str(p): (tuple(x.shape), param_spec(path_str(p), tuple(x.shape), mesh, rules))
        for p, x in flat
    }


def state_specs(state, params_like: Mapping[str, object], mesh: Mesh, rules: Rules = TENSOR_RULES):
    """Specs for any tree containing parameter-shaped leaves (train state, optimizer state).

    A leaf whose path ends with a parameter path (e.g. ".../mu/backbone/blocks/0/attn/qkv/kernel"
    or "student/backbone/...") and has that parameter's shape gets the parameter's spec.
    """
    index = _suffix_index(params_like, mesh, rules)

    def spec(path, leaf) -> PartitionSpec:
        text = path_str(path)
        shape = tuple(getattr(leaf, "shape", ()))
        parts = text.split("/")
        for start in range(len(parts)):
            hit = index.get("/".join(parts[start:]))
            if hit is not None and hit[0] == shape:
                return hit[1]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, state)


def to_shardings(specs, mesh: Mesh):
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_shardings(keys, mesh: Mesh) -> dict[str, NamedSharding]:
    """Every batch array splits its image axis (`data.layout.IMAGE_AXIS`) over ("data", "fsdp")."""
    shardings = {}
    for key in keys:
        if key not in IMAGE_AXIS:
            raise KeyError(f"no sharding rule for batch key {key!r}")
        spec = PartitionSpec(*([None] * IMAGE_AXIS[key]), BATCH_AXES)
        shardings[key] = NamedSharding(mesh, spec)
    return shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
