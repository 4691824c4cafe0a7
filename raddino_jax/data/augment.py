"""DINOv2 multi-crop augmentation for grayscale radiographs, in NumPy/OpenCV (recipe s5).

One call of :func:`multi_crop` turns one decoded image (uint8 or uint16, [H, W] or [H, W, 1])
into 2 global and ``n_local`` local crops, normalised float32. Per crop, in DINOv2's order:

1. RandomResizedCrop with torchvision's box sampling, then a bicubic resize (``resize_crop``
   switches to area averaging for strong downscales, see there), then horizontal flip.
2. With probability ``jitter_p``: brightness and contrast jitter in a random order, as
   torchvision's ColorJitter permutes its ops. Saturation, hue and RandomGrayscale are identity
   ops on a grayscale image replicated to RGB (recipe s5), so they are not implemented.
3. Gaussian blur (kernel 9, sigma ~ U(0.1, 2.0)) with the probabilities DINOv2 *actually*
   trained with: its GaussianBlur wrapper passes ``1 - p`` to RandomApply, so the nominal
   1.0 / 0.1 / 0.5 of (global 1, global 2, locals) became 0.0 / 0.9 / 0.5 (recipe s5).
4. Solarize (global 2 only, p 0.2, threshold 128 on the 0-255 scale).
5. ``(x / dtype_max - mean) / std`` with RAD-DINO's radiograph statistics (recipe s8).

Pixel ops 2-4 are pointwise except the blur, so they run as lookup tables on the integer
image (``data/lut.py``): exact PIL/torchvision uint8 semantics (truncation after each blend)
and fast. Everything after the blur (or after the jitter when there is no blur) folds into one
level -> level table per crop; :func:`multi_crop_levels` returns the integer crops with those
tables, and :func:`apply_tables` writes each crop through its table once, into the batch's
``transfer_dtype`` (or, for :func:`multi_crop`, normalised float32). All randomness comes from
the ``np.random.Generator`` passed in (Grain hands one per element).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np

from raddino_jax.data import lut

# How crops travel from the host to the devices (``MultiCropConfig.transfer_dtype``): integer
# levels, normalised inside the train step, or float32 normalised on the host.
TRANSFER_DTYPES: tuple[str, ...] = ("uint8", "uint16", "float32")


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
    """Multi-crop recipe (recipe s5; defaults are the DINOv2 vitl14/vitg14 224/98 setting).

    ``blur_p`` is (global 1, global 2, locals) as DINOv2 actually trained it: its GaussianBlur
    wrapper inverts the nominal 1.0 / 0.1 / 0.5 into 0.0 / 0.9 / 0.5 (recipe s5, pitfall 10).
    ``solarize_threshold`` is on the 0-255 scale and is rescaled for uint16 images.
    ``mean`` / ``std`` are RAD-DINO's MIMIC-CXR statistics (recipe s8), applied after scaling
    to [0, 1]. ``antialias_min_downscale``: crops shrunk by at least this factor are resized
    with area averaging instead of plain bicubic (see ``resize_crop``).

    ``transfer_dtype`` is the dtype of the batch's crop arrays (``TRANSFER_DTYPES``): "uint8"
    (default: a quarter of float32's bytes) or "uint16" ship integer levels that the train step
    normalises on the device; uint8 images shipped as uint16 are exact (x * 257), uint16 images
    need "uint16". "float32" normalises on the host.
    """

    global_size: int = 224
    local_size: int = 98
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    blur_p: tuple[float, float, float] = (0.0, 0.9, 0.5)
    blur_kernel: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    solarize_threshold: int = 128
    mean: float = 0.5307
    std: float = 0.2583
    antialias_min_downscale: float = 1.25
    transfer_dtype: str = "uint8"

    def __post_init__(self) -> None:
        if self.blur_kernel % 2 != 1:
            raise ValueError(f"blur_kernel must be odd, got {self.blur_kernel}")
        if not 0 < self.global_scale[0] <= self.global_scale[1] <= 1:
            raise ValueError(f"bad global_scale {self.global_scale}")
        if not 0 < self.local_scale[0] <= self.local_scale[1] <= 1:
            raise ValueError(f"bad local_scale {self.local_scale}")
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {self.n_local}")
        if self.transfer_dtype not in TRANSFER_DTYPES:
            raise ValueError(
                f"transfer_dtype must be one of {TRANSFER_DTYPES}, got {self.transfer_dtype!r}"
            )


@dataclasses.dataclass(frozen=True)
class CropParams:
    """The random choices made for one crop (for tests and debugging).

    ``box`` is (top, left, height, width) in source pixels. ``brightness`` / ``contrast`` are
    the jitter factors (1.0 when jitter was not applied); ``blur_sigma`` is 0.0 when no blur.
    """

    box: tuple[int, int, int, int]
    flipped: bool
    jittered: bool
    brightness: float
    contrast: float
    brightness_first: bool
    blur_sigma: float
    solarized: bool


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def sample_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """Samples a RandomResizedCrop box (top, left, h, w) with torchvision's semantics.

    Ten attempts of area ~ U(scale) * H*W and aspect w/h ~ log-uniform(ratio); the first box
    that fits is placed uniformly at random. Otherwise fall back to a central crop whose aspect
    is the image's, clamped into ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_crop(
    image: np.ndarray, box: tuple[int, int, int, int], size: int, antialias_min_downscale: float
) -> np.ndarray:
    """Crops ``box`` from a [H, W] image and resizes it to [size, size], same dtype.

    torchvision resizes PIL images with PIL's antialiased bicubic filter. cv2's INTER_CUBIC is
    not antialiased and aliases badly when shrinking, so crops shrunk by at least
    ``antialias_min_downscale`` (the smaller of the two axis factors) take an antialiased path,
    :func:`_antialiased_shrink`; milder shrinks and upscales use INTER_CUBIC. The crop is a
    view: cv2 reads the ROI through its row stride, nothing is copied.
    """
    top, left, h, w = box
    crop = image[top : top + h, left : left + w]
    shrink = min(h / size, w / size)
    if shrink >= antialias_min_downscale:
        return _antialiased_shrink(crop, size, shrink)
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_CUBIC)


def _antialiased_shrink(crop: np.ndarray, size: int, shrink: float) -> np.ndarray:
    """[h, w] -> [size, size] antialiased: bilinear to k*size, then exact k x k box averaging.

    ``k = ceil(shrink)`` makes the bilinear step an upscale on the short axis (and at most a
    4/3 shrink on the long one, the aspect-ratio bound of RandomResizedCrop), so it cannot
    alias; cv2's INTER_AREA with an integer factor is its fast exact box-average path. The
    result is a low-pass of about ``shrink`` source pixels, like cv2's generic INTER_AREA (the
    previous path) and close to PIL's antialiased bicubic. Measured on one core against PIL
    (RMSE in 8-bit levels, 200 recipe-s5 boxes, ``benchmarks/data_throughput.py
    --accuracy``): radiograph 224 globals 0.57 (generic INTER_AREA 0.55), 98 locals 0.57
    (0.55); blurred-noise texture 224: mean 2.9 / max 3.8 (2.8 / 5.9). It is ~2x faster than
    generic INTER_AREA for the 224 globals (~0.38 vs ~0.75 ms on a loaded core).
    """
    factor = math.ceil(shrink - 1e-9)
    upscaled = cv2.resize(crop, (factor * size, factor * size), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(upscaled, (size, size), interpolation=cv2.INTER_AREA)


def gaussian_blur(image: np.ndarray, sigma: float, kernel: int) -> np.ndarray:
    """torchvision GaussianBlur: separable ``kernel`` x ``kernel`` Gaussian, reflect padding.

    cv2's BORDER_REFLECT_101 is torch's "reflect" padding; the kernel is the same sampled,
    normalised Gaussian. On uint8, cv2 computes in fixed point: results are within one level
    of torchvision's float-then-round, unbiased (tested).
    """
    return cv2.GaussianBlur(
        image, (kernel, kernel), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101
    )


# ---------------------------------------------------------------------------------------------
# One crop and the full multi-crop
# ---------------------------------------------------------------------------------------------


def augment_crop_levels(
    image: np.ndarray,
    rng: np.random.Generator,
    cfg: MultiCropConfig,
    *,
    size: int,
    scale: tuple[float, float],
    blur_p: float,
    solarize_p: float,
) -> tuple[np.ndarray, np.ndarray | None, CropParams]:
    """One augmented crop of a [H, W] integer image, before its last lookup table.

    Returns ([size, size] integer levels, integer level -> level table or None, params):
    ``apply_table(levels, table)`` is the crop (``levels`` itself when the table is None),
    still unnormalised. Without blur the jitter table is folded into that table, so the
    jittered image is never materialised.
    """
    box = sample_resized_crop_box(rng, image.shape[0], image.shape[1], scale, cfg.ratio)
    crop = resize_crop(image, box, size, cfg.antialias_min_downscale)
    flipped = bool(rng.random() < cfg.flip_p)
    if flipped:
        crop = cv2.flip(crop, 1)

    jittered = bool(rng.random() < cfg.jitter_p)
    brightness = contrast = 1.0
    brightness_first = True
    pending = None  # integer table not yet applied to ``crop``
    if jittered:
        brightness = float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness))
        contrast = float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast))
        brightness_first = bool(rng.random() < 0.5)
        pending = lut.jitter_table(crop, brightness, contrast, brightness_first)

    blur_sigma = 0.0
    if blur_p > 0 and rng.random() < blur_p:
        blur_sigma = float(rng.uniform(cfg.blur_sigma[0], cfg.blur_sigma[1]))
        if pending is not None:
            crop, pending = lut.apply_table(crop, pending), None
        crop = gaussian_blur(crop, blur_sigma, cfg.blur_kernel)

    # Solarize is pointwise too: one integer table with any pending jitter.
    solarized = bool(solarize_p > 0 and rng.random() < solarize_p)
    threshold = lut.scaled_solarize_threshold(cfg.solarize_threshold, crop.dtype)
    table = lut.finishing_table(crop.dtype, pending, threshold if solarized else None)
    params = CropParams(
        box, flipped, jittered, brightness, contrast, brightness_first, blur_sigma, solarized
    )
    return crop, table, params


class MultiCropLevels(NamedTuple):
    """One image's crops as integer levels plus the table that finishes each (recipe s5).

    ``apply_table(global_levels[k], global_tables[k])`` is global crop k's final integer levels
    (``global_levels[k]`` itself where the table is None; likewise for the locals); only the
    normalisation is left. Tables are often shared, cached read-only arrays.

    Attributes:
      global_levels: [2, G, G] uint8/uint16.
      global_tables: 2 integer [dtype_max + 1] tables of the levels' dtype, or None.
      local_levels: [n_local, L, L] uint8/uint16.
      local_tables: n_local such tables.
      params: the 2 + n_local ``CropParams`` (global 1, global 2, locals).
    """

    global_levels: np.ndarray
    global_tables: tuple[np.ndarray | None, ...]
    local_levels: np.ndarray
    local_tables: tuple[np.ndarray | None, ...]
    params: tuple[CropParams, ...]


def multi_crop_levels(
    image: np.ndarray, rng: np.random.Generator, cfg: MultiCropConfig
) -> MultiCropLevels:
    """DINOv2 multi-crop of one [H, W(, 1)] uint8/uint16 image, before the last tables.

    Draws exactly what :func:`multi_crop` draws, in the same order, from ``rng``.
    """
    image = lut.as_2d_image(image)
    g, l = cfg.global_size, cfg.local_size
    global_levels = np.empty((2, g, g), image.dtype)
    local_levels = np.empty((cfg.n_local, l, l), image.dtype)
    # (scale, blur_p, solarize_p) per crop: the effective blur probabilities and
    # solarize-on-global-2-only, recipe s5.
    settings = [
        (cfg.global_scale, cfg.blur_p[0], 0.0),
        (cfg.global_scale, cfg.blur_p[1], cfg.solarize_p),
        *[(cfg.local_scale, cfg.blur_p[2], 0.0)] * cfg.n_local,
    ]
    tables, params = [], []
    for out, (scale, blur_p, solarize_p) in zip([*global_levels, *local_levels], settings):
        out[...], table, p = augment_crop_levels(
            image, rng, cfg, size=len(out), scale=scale, blur_p=blur_p, solarize_p=solarize_p
        )
        tables.append(table)
        params.append(p)
    return MultiCropLevels(
        global_levels, tuple(tables[:2]), local_levels, tuple(tables[2:]), tuple(params)
    )


def apply_tables(
    levels: np.ndarray,
    tables: Sequence[np.ndarray | None],
    out: np.ndarray,
    *,
    mean: float | None = None,
    std: float | None = None,
) -> np.ndarray:
    """Finishes crops: [n, S, S] levels through their n tables into ``out``, in its dtype.

    - ``out`` of the levels' dtype: ``table[levels]``, a plain copy where the table is None;
    - uint16 ``out``, uint8 levels: ``257 * table[levels]``, the same normalised values;
    - float32 ``out``: ``(table[levels] / max - mean) / std`` through one float table
      (``mean`` and ``std`` required).
    uint16 levels do not fit uint8 (ValueError). ``out`` may be any array whose [k] slices are
    C-contiguous [S, S], e.g. a strided crop-major batch view ``batch[:, i, :, :, 0]``: each
    crop is written there directly. Returns ``out``.
    """
    dtype = levels.dtype
    if out.dtype == np.float32:
        if mean is None or std is None:
            raise ValueError("float32 crops are normalised: pass mean and std")
        for k, table in enumerate(tables):
            lut.apply_table(levels[k], lut.float_table(dtype, table, mean, std), out=out[k])
    elif out.dtype == dtype:
        for k, table in enumerate(tables):
            if table is None:
                np.copyto(out[k], levels[k])
            else:
                lut.apply_table(levels[k], table, out=out[k])
    elif dtype == np.uint8 and out.dtype == np.uint16:
        for k, table in enumerate(tables):
            lut.apply_table(levels[k], lut.widened_table(table), out=out[k])
    else:
        raise ValueError(f"{dtype} levels do not fit {out.dtype} crops without losing levels")
    return out


def multi_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    cfg: MultiCropConfig,
    *,
    return_params: bool = False,
) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], list[CropParams]]:
    """DINOv2 multi-crop of one image (recipe s5).

    Args:
      image: [H, W] or [H, W, 1] uint8/uint16 radiograph.
      rng: the only source of randomness.
      cfg: the recipe.
      return_params: also return the 2 + n_local ``CropParams`` (global 1, global 2, locals).

    Returns:
      {"global_crops": float32 [2, G, G, 1], "local_crops": float32 [n_local, L, L, 1]},
      normalised; plus the params list when ``return_params``.
    """
    levels = multi_crop_levels(image, rng, cfg)
    finish = functools.partial(apply_tables, mean=cfg.mean, std=cfg.std)
    global_crops = np.empty((*levels.global_levels.shape, 1), np.float32)
    local_crops = np.empty((*levels.local_levels.shape, 1), np.float32)
    finish(levels.global_levels, levels.global_tables, global_crops[..., 0])
    finish(levels.local_levels, levels.local_tables, local_crops[..., 0])
    crops = {"global_crops": global_crops, "local_crops": local_crops}
    if return_params:
        return crops, list(levels.params)
    return crops
