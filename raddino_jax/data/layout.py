"""The batch contract: the arrays of one batch (names, shapes, dtypes), the axis of each that
indexes images, and what the crops' pixel levels mean (``normalise``).

The pipeline builds batches to it (``data/pipeline.py``), the prefetcher checks and places them
(``data/prefetch.py``), the sharding rules split them (``parallel/sharding.py``), the step
compiles for it (``train/build.py``'s ``Run.batch``), and the sweep and the memory preflight
compile and size the step from it without building a batch. No Grain or OpenCV here, so any
layer can import it.

A batch of B images (``N = (G // patch)**2`` tokens per global crop, ``b`` = mask_group_size,
``n_groups = B / b``, ``U = MaskSpec.upper_bound``):

- ``global_crops`` [2, B, G, G, 1]; ``local_crops`` [n_local, B, L, L, 1], in the transfer dtype
  (``config.data.transfer_dtype``): uint8 (default) or uint16 pixel levels, which the step
  normalises on the device (``normalise``), or float32 already normalised on the host
- ``masks`` bool [2, B, N]
- ``mask_indices`` int32 [n_groups, U]: flat ``crop * N + patch`` into the group's [2, b, N]
  tokens (crop = k * b + i for global crop k of the group's image i)
- ``mask_weights`` float32 [n_groups, U]; ``mask_valid`` bool [n_groups, U]

A loop's host batch (``pipeline.make_dataset(host_counts=True)``) also holds ``HOST_KEYS``,
which the prefetcher keeps on the host: they never reach the step.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import numpy as np

from raddino_jax.ssl import masking

if TYPE_CHECKING:
    from raddino_jax.data.augment import MultiCropConfig

# Axis of each batch array that indexes images; it is the axis that is split across
# processes and devices (see ``prefetch.to_global_batch``). In the order the step takes them.
IMAGE_AXIS: dict[str, int] = {
    "global_crops": 1,
    "local_crops": 1,
    "masks": 1,
    "mask_indices": 0,
    "mask_weights": 0,
    "mask_valid": 0,
}
BATCH_KEYS: tuple[str, ...] = tuple(IMAGE_AXIS)
CROP_KEYS: tuple[str, ...] = ("global_crops", "local_crops")
# Host-side entries of a loop's host batch: int64 scalar, records of the batch's positions that
# did not decode (``pipeline.DecodedStream``); int32 [B], the mixture source of each image
# (``mixture.SOURCE_FIELD``; 0 for a single source).
RECORDS_SKIPPED = "records_skipped"
SOURCE_IDS = "source_ids"
HOST_KEYS: tuple[str, ...] = (RECORDS_SKIPPED, SOURCE_IDS)


def normalise(levels, mean: float, std: float, dtype=np.float32):
    """Pixel levels (uint8 / uint16, a NumPy or JAX array) -> network input in ``dtype``:
    ``(levels / dtype max - mean) / std``.

    The one definition of the input normalisation: the step applies it on the device to the
    crops the pipeline ships as levels, the float32 transfer and the augmentation's lookup
    tables apply it on the host, and evaluation and export preprocessing apply it with the
    checkpoint's statistics. x / 255 == 257 x / 65535, so uint8 images shipped as uint16 give
    the same values.
    """
    scale = float(np.iinfo(levels.dtype).max)
    return (levels.astype(dtype) / scale - mean) / std


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static shapes of the iBOT masks of a batch of ``batch_size`` images (a host batch in the
    pipeline; the global batch in ``train.build.Run``)."""

    batch_size: int
    mask_group_size: int
    grid_hw: tuple[int, int]
    mask_ratio_min_max: tuple[float, float]
    mask_sample_probability: float

    @property
    def n_groups(self) -> int:
        return self.batch_size // self.mask_group_size

    @property
    def n_tokens(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def upper_bound(self) -> int:
        """U, the static masked-token buffer per group (recipe s7)."""
        return masking.mask_upper_bound(
            2 * self.mask_group_size,
            self.n_tokens,
            self.mask_ratio_min_max,
            self.mask_sample_probability,
        )


def batch_spec(crops: MultiCropConfig, masks: MaskSpec) -> dict[str, jax.ShapeDtypeStruct]:
    """Every array of a batch of ``masks.batch_size`` images (module docstring), unsharded, in
    ``BATCH_KEYS`` order: what the pipeline builds and the step is compiled for."""
    b, g, loc = masks.batch_size, crops.global_size, crops.local_size
    pixels = np.dtype(crops.transfer_dtype)
    buffer = (masks.n_groups, masks.upper_bound)
    shapes = {
        "global_crops": ((2, b, g, g, 1), pixels),
        "local_crops": ((crops.n_local, b, loc, loc, 1), pixels),
        "masks": ((2, b, masks.n_tokens), np.bool_),
        "mask_indices": (buffer, np.int32),
        "mask_weights": (buffer, np.float32),
        "mask_valid": (buffer, np.bool_),
    }
    return {key: jax.ShapeDtypeStruct(*shapes[key]) for key in BATCH_KEYS}
