"""The one device mesh: axes ("data", "fsdp", "tensor") built with `jax.make_mesh`.

`data` replicates parameters and splits the batch, `fsdp` splits both the batch and the
parameters (ZeRO-3 style, GSPMD inserts the all-gathers), `tensor` splits attention/MLP weights
(Megatron style). Sizes come from the config as a mapping with at most one -1 ("the rest").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the image axis of every batch array is split over these


def resolve_mesh_shape(mesh_config: Mapping[str, int], n_devices: int) -> tuple[int, int, int]:
    """{"data": -1, "fsdp": 2, "tensor": 1} -> (n/2, 2, 1), with clear errors."""
    unknown = sorted(set(mesh_config) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {unknown}; allowed: {MESH_AXES}")
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(mesh_config)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(mesh_config)}")
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(
                f"config.mesh {dict(mesh_config)}: {n_devices} devices are not divisible by {known}"
            )
        sizes[sizes.index(-1)] = n_devices // known
    elif known != n_devices:
        raise ValueError(
            f"config.mesh {dict(mesh_config)} uses {known} devices but {n_devices} are available"
        )
    return tuple(sizes)


def make_mesh(
    mesh_config: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh over all (or the given) devices; `jax.make_mesh` picks a topology-aware order."""
    devices = list(devices) if devices is not None else jax.devices()
    if not isinstance(mesh_config, Mapping):
        mesh_config = dict(zip(MESH_AXES, mesh_config, strict=True))
    shape = resolve_mesh_shape(mesh_config, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len({getattr(d, "core_on_chip", 0) for d in devices}) > 1:
        # One device per TensorCore (a deviceless v4 topology, sweep/topology.py): jax's
        # topology-aware ordering only knows one device per chip, so keep the given order,
        # which puts the two cores of a chip next to each other.
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        # jax.make_mesh maps each logical axis onto whole physical axes, so 8x8 over a 4x4x4
        # torus (v5p-64) has no assignment; splitting a physical axis across two logical ones
        # still gives a topology-aware order.
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


def parse_layout(text: str) -> tuple[int, int, int]:
    """ "2x4x1" (data x fsdp x tensor) -> (2, 4, 1)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"mesh layout {text!r} must look like DATAxFSDPxTENSOR, e.g. 2x4x1")
    return tuple(int(p) for p in parts)
