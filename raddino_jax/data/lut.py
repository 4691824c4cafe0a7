"""Integer pixel-level maths of the multi-crop: lookup tables on uint8/uint16 images (recipe s5).

The photometric ops of ``data/augment.py`` other than the blur are pointwise, so they run as
level -> level tables with PIL's integer semantics (each blend truncates), composed into one
table per crop and applied with ``apply_table`` (``cv2.LUT`` for uint8). The last table also
writes the transfer dtype: ``float_table`` (normalised float32, ``layout.normalise`` as the train
step applies it) or ``widened_table`` (uint8 -> uint16). No randomness here: ``data/augment.py``
draws the factors.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from raddino_jax.data.layout import normalise

_DTYPE_MAX = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}


def dtype_max(dtype: np.dtype) -> int:
    """Largest value of a supported integer image dtype (uint8 or uint16)."""
    try:
        return _DTYPE_MAX[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"images must be uint8 or uint16, got {np.dtype(dtype)}") from None


def as_2d_image(image: np.ndarray) -> np.ndarray:
    """Returns a [H, W] view of a [H, W] or [H, W, 1] uint8/uint16 image."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim != 2:
        raise ValueError(f"expected a [H, W] or [H, W, 1] image, got shape {image.shape}")
    dtype_max(image.dtype)
    return image


@functools.lru_cache(maxsize=4)
def _float_levels(dtype: np.dtype) -> np.ndarray:
    """[dtype_max + 1] float32 levels 0..max (cached, read-only)."""
    levels = np.arange(dtype_max(dtype) + 1, dtype=np.float32)
    levels.flags.writeable = False
    return levels


def blend_table(dtype: np.dtype, factor: float, degenerate: float) -> np.ndarray:
    """Table of PIL's ``Image.blend(degenerate, image, factor)`` on integer levels.

    out = trunc(clip(degenerate + factor * (x - degenerate), 0, max)), the truncation that
    both PIL (ImageEnhance) and torchvision's tensor ``_blend`` use for integer images.
    """
    # float32 arithmetic like PIL's ImagingBlend (exact for uint16 levels, < 2**24).
    grey = np.float32(degenerate)
    out = _float_levels(dtype) - grey
    out *= np.float32(factor)
    out += grey
    np.maximum(out, 0, out=out)
    np.minimum(out, dtype_max(dtype), out=out)
    # Non-negative, so the float -> int cast truncates like floor.
    return out.astype(dtype)


def apply_table(image: np.ndarray, table: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Applies a per-level lookup table to an integer image ([H, W] -> [H, W], table dtype).

    ``out``, a C-contiguous [H, W] array of the table's dtype, receives the result in place
    (e.g. a slice of a batch array).
    """
    if image.dtype == np.uint8:
        return cv2.LUT(image, table, dst=out)
    return np.take(table, image, out=out)


def mean_level(image: np.ndarray, table: np.ndarray | None = None) -> float:
    """Mean grey level of ``table[image]`` (of ``image`` when ``table`` is None), exactly.

    The level sum is an exact integer divided once, as PIL's ImageStat computes it (cv2.mean
    multiplies by 1/n and can be one ulp off, which matters at the int(mean + 0.5) rounding).
    """
    if table is not None:
        image = apply_table(image, table)
    if image.dtype == np.uint8:
        level_sum = int(cv2.sumElems(image)[0])  # exact: integer partial sums < 2**53
    else:
        level_sum = int(image.sum(dtype=np.uint64))
    return level_sum / image.size


def contrast_table(image: np.ndarray, factor: float, table: np.ndarray | None = None) -> np.ndarray:
    """The contrast table for ``table[image]`` (``image`` itself when ``table`` is None).

    PIL's ImageEnhance.Contrast blends with the mean grey level rounded to an integer,
    int(mean + 0.5) (DINOv2 augments PIL images, recipe s5).
    """
    grey = int(mean_level(image, table) + 0.5)
    return blend_table(image.dtype, factor, float(grey))


def jitter_table(
    image: np.ndarray, brightness: float, contrast: float, brightness_first: bool
) -> np.ndarray:
    """One integer table equal to ColorJitter's brightness and contrast in the given order.

    Each blend truncates to integers (PIL semantics), so composing the two tables is exact;
    only the contrast grey depends on the pixels, via the mean of the first op's output.
    """
    brightness_t = blend_table(image.dtype, brightness, 0.0)
    if brightness_first:
        return contrast_table(image, contrast, brightness_t)[brightness_t]
    return brightness_t[contrast_table(image, contrast)]


@functools.lru_cache(maxsize=16)
def solarize_table(dtype: np.dtype, threshold: int) -> np.ndarray:
    """PIL ``ImageOps.solarize``: levels >= threshold become max - level (cached, read-only)."""
    levels = np.arange(dtype_max(dtype) + 1)
    table = np.where(levels >= threshold, dtype_max(dtype) - levels, levels).astype(dtype)
    table.flags.writeable = False
    return table


def scaled_solarize_threshold(threshold_255: int, dtype: np.dtype) -> int:
    """The 0-255 threshold on this dtype's scale (128 -> 32896 for uint16, 128*257)."""
    return int(round(threshold_255 * dtype_max(dtype) / 255))


@functools.lru_cache(maxsize=16)
def normalise_table(dtype: np.dtype, mean: float, std: float) -> np.ndarray:
    """float32 table of ``layout.normalise`` of every level (computed in float64; cached,
    read-only)."""
    levels = np.arange(dtype_max(dtype) + 1, dtype=dtype)
    table = normalise(levels, mean, std, np.float64).astype(np.float32)
    table.flags.writeable = False
    return table


def finishing_table(
    dtype: np.dtype, jitter: np.ndarray | None, solarize_threshold: int | None
) -> np.ndarray | None:
    """A crop's last integer level -> level table: ``jitter`` (not yet applied) then solarize.

    Solarize runs when ``solarize_threshold`` is set. None when neither applies: the levels are
    final as they are and need no lookup. Integer tables compose exactly (PIL truncates after
    each op), so the crop written through this table is the one the ops give in sequence.
    """
    if solarize_threshold is None:
        return jitter
    solarize = solarize_table(dtype, solarize_threshold)
    return solarize if jitter is None else solarize[jitter]


def float_table(dtype: np.dtype, table: np.ndarray | None, mean: float, std: float) -> np.ndarray:
    """Level -> float32 table: ``table`` (None: the identity) then (level / max - mean) / std.

    ``normalise_table[table]`` holds the same float32 values as normalising ``table[levels]``,
    so a crop written through it equals the host normalisation of its finished levels.
    """
    normalise = normalise_table(dtype, mean, std)
    return normalise if table is None else normalise[table]


def widened_table(table: np.ndarray | None) -> np.ndarray:
    """uint8 level -> uint16 level table: ``table`` (None: the identity) times 257.

    x / 255 == 257 x / 65535 exactly, so uint8 crops shipped as uint16 normalise to the same
    values.
    """
    levels = np.arange(256, dtype=np.uint16) if table is None else table.astype(np.uint16)
    return levels * np.uint16(257)
