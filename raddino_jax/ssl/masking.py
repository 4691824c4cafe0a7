"""iBOT block masking and per-batch mask sampling (recipe s6, s7), NumPy only.

This runs in the data pipeline (host side), so it uses NumPy and an explicit
``np.random.Generator`` handed in by the caller (a Grain ``random_map`` rng, or one seeded per
batch); there is no global RNG.

Layout of a device batch of ``B`` images (recipe s7): the ``n_crops = 2B`` global crops are
crop-major, ``[crop 1 of all B images; crop 2 of all B images]``, and mask row ``i`` belongs to
global crop row ``i``. Patch positions inside a crop are row-major over the ``(h, w)`` patch
grid, ``N = h * w``. Masked tokens are addressed by the flat index ``crop * N + patch`` into the
``[2B * N]`` token sequence, and gathered into a static buffer of ``upper_bound`` rows so the
jitted step never sees a data-dependent shape (recipe s7, pitfall 11).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# Attempts per block placement in the reference MaskingGenerator (recipe s6).
_ATTEMPTS_PER_BLOCK = 10


def default_max_block_patches(grid_hw: tuple[int, int]) -> int:
    """Largest block area, as the reference computes it: ``0.5*G//14*G//14`` (recipe s6).

    Evaluated left to right with ``G = 14 * h`` this is ``(h // 2) * w``: 128 on a 16x16 grid and
    666 on 37x37 (not ``0.5 * 37 * 37 = 684.5``). The floor makes it independent of the patch
    size. For non-square grids we apply the same rule with ``h`` and ``w``.
    """
    height, width = grid_hw
    return (height // 2) * width


def _place_block(
    rng: np.random.Generator,
    mask: np.ndarray,
    max_patches: float,
    min_num_patches: float,
    log_aspect_range: tuple[float, float],
) -> int:
    """Tries up to 10 random blocks, masks the first acceptable one; returns cells newly masked.

    One attempt (recipe s6): area ~ U(min_num_patches, max_patches), aspect ``r`` log-uniform,
    ``h = round(sqrt(area * r))``, ``w = round(sqrt(area / r))``, required ``h < H`` and
    ``w < W``; a uniform top-left; accepted when ``0 < newly covered <= max_patches``.
    """
    grid_height, grid_width = mask.shape
    for _ in range(_ATTEMPTS_PER_BLOCK):
        # a + (b - a) * u, like python's random.uniform, also when max_patches < min_num_patches.
        target_area = min_num_patches + (max_patches - min_num_patches) * rng.random()
        aspect_ratio = math.exp(rng.uniform(*log_aspect_range))
        block_h = int(round(math.sqrt(target_area * aspect_ratio)))
        block_w = int(round(math.sqrt(target_area / aspect_ratio)))
        if block_w < grid_width and block_h < grid_height:
            top = int(rng.integers(0, grid_height - block_h + 1))
            left = int(rng.integers(0, grid_width - block_w + 1))
            window = mask[top : top + block_h, left : left + block_w]
            newly_masked = block_h * block_w - int(window.sum())
            if 0 < newly_masked <= max_patches:
                window[...] = True
                return newly_masked
    return 0


def sample_block_mask(
    rng: np.random.Generator,
    grid_hw: tuple[int, int],
    num_masking_patches: int,
    min_num_patches: int = 4,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
) -> np.ndarray:
    """Block-wise iBOT mask with about ``num_masking_patches`` cells (recipe s6).

    Blocks are placed until the count reaches ``num_masking_patches``; each block may cover at
    most ``min(remaining, max_num_patches)`` new cells, and masking stops early when a block
    (10 attempts) adds nothing, so the result can fall slightly short of the target but never
    exceeds it.

    Args:
      rng: NumPy generator (the only source of randomness).
      grid_hw: ``(h, w)`` patch grid.
      num_masking_patches: target count ``T`` (0 gives an empty mask).
      min_num_patches: smallest block area drawn (4 in the reference).
      max_num_patches: largest block area; default :func:`default_max_block_patches`.
      min_aspect: smallest block aspect ratio h/w (0.3).
      max_aspect: largest aspect ratio; default ``1 / min_aspect``.

    Returns:
      ``bool[h, w]`` mask with at most ``num_masking_patches`` True cells.
    """
    if max_num_patches is None:
        max_num_patches = default_max_block_patches(grid_hw)
    if max_aspect is None:
        max_aspect = 1.0 / min_aspect
    log_aspect_range = (math.log(min_aspect), math.log(max_aspect))
    mask = np.zeros(grid_hw, dtype=bool)
    mask_count = 0
    while mask_count < num_masking_patches:
        max_patches = min(num_masking_patches - mask_count, max_num_patches)
        added = _place_block(rng, mask, max_patches, min_num_patches, log_aspect_range)
        if added == 0:
            break
        mask_count += added
    return mask


def stratified_mask_ratios(
    n_crops: int,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
) -> np.ndarray:
    """Ratio bin edges ``linspace(min, max, n_m + 1)`` (``float64[n_m + 1]``) for the
    ``n_m = int(n_crops * p)`` masked crops (recipe s7); masked crop ``k`` draws its ratio from
    ``[edges[k], edges[k + 1]]``."""
    n_masked_crops = int(n_crops * mask_sample_probability)
    return np.linspace(*mask_ratio_min_max, n_masked_crops + 1)


def mask_upper_bound(
    n_crops: int,
    n_tokens: int,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
) -> int:
    """Static buffer size for masked tokens: ``sum_k int(N * edges[k + 1])`` (recipe s7).

    Crop ``k`` masks at most ``int(N * U(edges[k], edges[k+1])) <= int(N * edges[k+1])`` tokens,
    so no batch exceeds this. E.g. 16682 for 80 crops of 1369 tokens, 4941 for 128 x 256.
    """
    edges = stratified_mask_ratios(n_crops, mask_ratio_min_max, mask_sample_probability)
    return int(sum(int(n_tokens * high) for high in edges[1:]))


class IbotMasks(NamedTuple):
    """One device batch of iBOT masks with static shapes (recipe s7).

    A NamedTuple, hence a pytree that Grain batching and ``jax.device_put`` handle as is.

    Attributes:
      masks: ``bool[n_crops, N]`` per global crop (crop-major rows), row-major patches.
      indices: ``int32[U]`` flat ``crop * N + patch`` of each masked token, increasing,
        padded with 0.
      weights: ``float32[U]`` ``1 / M_i`` for a token of crop ``i`` (M_i its masked count),
        0 for padding; each masked crop's weights sum to 1.
      valid: ``bool[U]``; True for the first ``n_masked`` entries.
      n_masked: ``int32`` scalar, number of masked tokens in the batch.
    """

    masks: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    valid: np.ndarray
    n_masked: np.ndarray


def _stratified_crop_masks(
    rng: np.random.Generator,
    n_crops: int,
    grid_hw: tuple[int, int],
    mask_ratio_min_max: tuple[float, float],
    mask_sample_probability: float,
) -> list[np.ndarray]:
    """``n_crops`` flat masks, the first ``n_m`` with stratified ratios, the rest empty."""
    n_tokens = grid_hw[0] * grid_hw[1]
    edges = stratified_mask_ratios(n_crops, mask_ratio_min_max, mask_sample_probability)
    crop_masks = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        target = int(n_tokens * rng.uniform(low, high))
        crop_masks.append(sample_block_mask(rng, grid_hw, target).reshape(-1))
    empty = np.zeros(n_tokens, dtype=bool)
    crop_masks.extend(empty.copy() for _ in range(n_crops - len(crop_masks)))
    return crop_masks


def sample_ibot_masks(
    rng: np.random.Generator,
    n_crops: int,
    grid_hw: tuple[int, int],
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
    upper_bound: int | None = None,
) -> IbotMasks:
    """Samples the iBOT masks of one device batch of ``n_crops = 2B`` global crops (recipe s7).

    ``n_m = int(n_crops * p)`` crops get block masks with stratified ratios, the others none,
    and the list is then shuffled, so which crops (and which of an image's two crops) are
    masked is random.

    Args:
      rng: NumPy generator.
      n_crops: number of global crops ``2B`` in the device batch.
      grid_hw: ``(h, w)`` patch grid of a global crop.
      mask_ratio_min_max: ratio range (0.1, 0.5).
      mask_sample_probability: fraction of crops masked (0.5).
      upper_bound: static buffer size ``U``; default :func:`mask_upper_bound`.

    Raises:
      ValueError: if the masked count exceeds ``upper_bound`` (only possible with a smaller
        ``upper_bound`` than the default).
    """
    n_tokens = grid_hw[0] * grid_hw[1]
    if upper_bound is None:
        upper_bound = mask_upper_bound(
            n_crops, n_tokens, mask_ratio_min_max, mask_sample_probability
        )
    crop_masks = _stratified_crop_masks(
        rng, n_crops, grid_hw, mask_ratio_min_max, mask_sample_probability
    )
    order = rng.permutation(n_crops)
    masks = np.stack([crop_masks[i] for i in order])

    flat_indices = np.flatnonzero(masks)
    n_masked = flat_indices.size
    if n_masked > upper_bound:
        raise ValueError(
            f"{n_masked} masked tokens exceed the static buffer upper_bound={upper_bound}"
        )
    crop_weights = 1.0 / np.maximum(masks.sum(axis=1), 1).astype(np.float32)
    padding = (0, upper_bound - n_masked)
    return IbotMasks(
        masks=masks,
        indices=np.pad(flat_indices.astype(np.int32), padding),
        weights=np.pad(crop_weights[flat_indices // n_tokens], padding),
        valid=np.arange(upper_bound) < n_masked,
        n_masked=np.array(n_masked, dtype=np.int32),
    )
