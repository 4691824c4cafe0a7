"""Positional-embedding resampling that reproduces PyTorch's bicubic `F.interpolate` exactly.

Recipe s1 ("Positional-embedding interpolation"): three behaviours exist in the wild and a JAX
port must pick the one the weights were trained/exported with:

- ``"offset"``: original dinov2 without registers. torch is called with
  ``scale_factor = (h0 + 0.1) / M`` (no antialias), so the output size is ``floor(M * s) = h0``
  but the *coordinate map* uses the scale factor, not the size ratio.
- ``"size"``: transformers' ``Dinov2Model`` (and dinov2 with ``interpolate_offset=0``):
  ``size=(h0, w0)``, plain bicubic.
- ``"size_antialias"``: register models (dinov2 ``_reg`` and transformers'
  ``Dinov2WithRegistersModel``): ``size=(h0, w0)`` with ``antialias=True``.

Shapes are static under jit, so the 1-D interpolation matrices are built in float64 NumPy at trace
time and applied as two small matmuls: no gather, and the same numbers on every backend.
"""

from __future__ import annotations

import functools
import math

import numpy as np

INTERPOLATE_MODES = ("offset", "size", "size_antialias")

# torch's non-antialiased bicubic kernel uses A = -0.75 (upsample_bicubic2d); its antialiased
# separable kernel uses Keys' A = -0.5 (like PIL).
_TORCH_CUBIC_A = -0.75
_TORCH_AA_CUBIC_A = -0.5


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a` at distances `x`, elementwise, float64
    (both pieces are 0 at |x| = 1 and the far one at |x| = 2)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| < 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 <= |x| < 2
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _plain_bicubic_matrix(in_size: int, out_size: int, ratio: float) -> np.ndarray:
    """[out, in] matrix of torch's align_corners=False bicubic with source = (dst+0.5)*ratio-0.5.

    Border taps are clamped to the edge pixel (torch's `upsample_get_value_bounded`).
    torch evaluates the ratio in float32 (opmath of a float tensor); we round it the same way.
    """
    ratio = float(np.float32(ratio))
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    for dst in range(out_size):
        src = float(np.float32(ratio * (dst + 0.5) - 0.5))
        base = math.floor(src)
        t = src - base
        weights = _cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), _TORCH_CUBIC_A)  # taps -1..2
        for tap, weight in zip(range(base - 1, base + 3), weights):
            mat[dst, min(max(tap, 0), in_size - 1)] += weight
    return mat


def _antialias_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of torch's `_upsample_bicubic2d_aa` (PIL-style separable filter).

    The filter support widens by the downscale factor, taps outside the input are dropped and the
    remaining weights renormalised (no clamping).
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    for dst in range(out_size):
        center = scale * (dst + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        weights = _cubic((taps - center + 0.5) * inv_scale, _TORCH_AA_CUBIC_A)
        total = weights.sum()
        mat[dst, lo:hi] = weights / total if total != 0 else weights
    return mat


@functools.lru_cache(maxsize=64)
def interpolation_matrix(in_size: int, out_size: int, mode: str, offset: float = 0.1) -> np.ndarray:
    """The [out_size, in_size] float64 matrix resampling one axis like torch does in `mode`."""
    if mode == "offset":
        scale_factor = (out_size + offset) / in_size  # python double, as dinov2 computes it
        if math.floor(in_size * scale_factor) != out_size:
            raise ValueError(f"offset interpolation cannot produce {out_size} from {in_size}")
        return _plain_bicubic_matrix(in_size, out_size, 1.0 / scale_factor)
    if mode == "size":
        return _plain_bicubic_matrix(in_size, out_size, in_size / out_size)
    if mode == "size_antialias":
        return _antialias_bicubic_matrix(in_size, out_size)
    raise ValueError(f"unknown interpolate mode {mode!r}; expected one of {INTERPOLATE_MODES}")


def resample_grid(grid, out_hw: tuple[int, int], mode: str, offset: float = 0.1):
    """Resample a [M, M, D] (or [..., M, M, D]) grid to [h0, w0, D] like torch bicubic.

    Works on NumPy and JAX arrays alike (two `matmul`s, computed in float32).
    """
    in_h, in_w = grid.shape[-3], grid.shape[-2]
    rows = interpolation_matrix(in_h, out_hw[0], mode, offset).astype(np.float32)
    cols = interpolation_matrix(in_w, out_hw[1], mode, offset).astype(np.float32)
    # out[i, j, d] = sum_{a, b} rows[i, a] * cols[j, b] * grid[a, b, d]
    tmp = (rows @ grid.reshape(*grid.shape[:-3], in_h, in_w * grid.shape[-1])).reshape(
        *grid.shape[:-3], out_hw[0], in_w, grid.shape[-1]
    )
    return (cols @ tmp).reshape(*grid.shape[:-3], out_hw[0], out_hw[1], grid.shape[-1])
