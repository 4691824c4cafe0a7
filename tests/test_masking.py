"""Tests for raddino_jax.ssl.masking (recipe s6, s7)."""

import math

import numpy as np
import pytest

from raddino_jax.ssl import masking

GRID = (16, 16)
N_TOKENS = 256
N_CROPS = 16  # 2B for B = 8
N_BATCHES = 200


def reference_block_mask(rng, grid_hw, target, min_patches=4, max_patches=None, min_aspect=0.3):
    """Cell-by-cell transcription of the recipe s6 loop, drawing from `rng` in the same order."""
    height, width = grid_hw
    if max_patches is None:
        max_patches = ((0.5 * height * 14) // 14 * width * 14) // 14  # 0.5*G//14*G//14
    log_min, log_max = math.log(min_aspect), math.log(1 / min_aspect)
    mask = np.zeros(grid_hw, dtype=bool)
    count = 0
    while count < target:
        limit = min(target - count, max_patches)
        delta = 0
        for _ in range(10):
            area = min_patches + (limit - min_patches) * rng.random()
            ratio = math.exp(rng.uniform(log_min, log_max))
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if w < width and h < height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                cells = [(i, j) for i in range(top, top + h) for j in range(left, left + w)]
                already = sum(mask[i, j] for i, j in cells)
                if 0 < h * w - already <= limit:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i, j]:
                                mask[i, j] = True
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(1234)
    return [masking.sample_ibot_masks(rng, N_CROPS, GRID) for _ in range(N_BATCHES)]


def test_default_max_block_patches_matches_recipe():
    assert masking.default_max_block_patches((16, 16)) == 128
    assert masking.default_max_block_patches((37, 37)) == 666  # not 0.5 * 37 * 37


def test_mask_upper_bound_recipe_examples():
    assert masking.mask_upper_bound(80, 1369) == 16682  # B=40 at 518
    assert masking.mask_upper_bound(128, 256) == 4941  # B=64 at 224
    # 4 crops, 2 masked: edges (0.1, 0.3, 0.5): int(10 * 0.3) + int(10 * 0.5) = 3 + 5.
    assert masking.mask_upper_bound(4, 10) == 8


@pytest.mark.parametrize("target", [0, 3, 20, 60, 128, 200])
def test_block_mask_matches_cell_by_cell_reference(target):
    for seed in range(5):
        got = masking.sample_block_mask(np.random.default_rng(seed), (12, 14), target)
        expected = reference_block_mask(np.random.default_rng(seed), (12, 14), target)
        np.testing.assert_array_equal(got, expected)
        assert got.sum() <= target


def test_block_mask_shortfall_is_small():
    """The recipe's mask 'can fall slightly short of T'; measure how short."""
    rng = np.random.default_rng(0)
    shortfalls = []
    for _ in range(300):
        target = int(rng.integers(25, 129))
        count = int(masking.sample_block_mask(rng, GRID, target).sum())
        assert count <= target
        shortfalls.append((target - count) / target)
    shortfalls = np.asarray(shortfalls)
    print(
        f"block-mask shortfall: mean {shortfalls.mean():.4f},"
        f" p95 {np.quantile(shortfalls, 0.95):.4f},"
        f" max {shortfalls.max():.4f}, exact hits {np.mean(shortfalls == 0):.2f}"
    )
    assert shortfalls.mean() < 0.02
    assert np.mean(shortfalls == 0) > 0.5


def test_single_block_aspect_ratio_within_bounds():
    """One block placed on an empty grid: h = round(sqrt(a r)), w = round(sqrt(a / r)) with
    r log-uniform in [0.3, 1/0.3], so h / w equals r up to rounding each side."""
    rng = np.random.default_rng(5)
    log_range = (math.log(0.3), math.log(1 / 0.3))
    aspects = []
    for _ in range(500):
        mask = np.zeros(GRID, dtype=bool)
        added = masking._place_block(rng, mask, 60, 4, log_range)
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert added == h * w == mask.sum()  # one full rectangle
        assert 1 <= added <= 60
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3, (h, w)
        aspects.append(h / w)
    aspects = np.asarray(aspects)
    # Both orientations and elongated blocks occur; log-uniform r is symmetric around 1.
    assert aspects.min() < 0.4 and aspects.max() > 2.5
    assert abs(np.mean(np.log(aspects))) < 0.1


def test_stratified_ratios_per_masked_crop():
    """Crop k of the n_m masked crops gets int(N * U(edges[k], edges[k+1])) before the shuffle."""
    rng = np.random.default_rng(3)
    edges = masking.stratified_mask_ratios(N_CROPS)
    np.testing.assert_allclose(edges, np.linspace(0.1, 0.5, 9))
    shortfall = []
    for _ in range(N_BATCHES):
        crop_masks = masking._stratified_crop_masks(rng, N_CROPS, GRID, (0.1, 0.5), 0.5)
        counts = np.array([m.sum() for m in crop_masks])
        np.testing.assert_array_equal(counts[8:], 0)
        assert (counts[:8] <= (N_TOKENS * edges[1:]).astype(int)).all()
        shortfall.append(np.maximum(np.floor(N_TOKENS * edges[:-1]) - counts[:8], 0))
    shortfall = np.concatenate(shortfall)
    print(f"below stratum lower edge: {np.mean(shortfall > 0):.3f} of crops, max {shortfall.max()}")
    assert np.mean(shortfall > 0) < 0.1
    assert shortfall.max() <= 8


def test_batch_statistics(batches):
    n_masked_crops = np.array([(b.masks.sum(axis=1) > 0).sum() for b in batches])
    np.testing.assert_array_equal(n_masked_crops, 8)  # fraction 0.5 in every batch
    edges = np.linspace(0.1, 0.5, 9)
    for batch in batches:
        ratios = np.sort(batch.masks.sum(axis=1)[batch.masks.sum(axis=1) > 0] / N_TOKENS)
        # The k-th smallest masked ratio cannot exceed the k-th stratum's upper edge.
        assert (ratios <= edges[1:] + 1e-12).all()
        assert ratios.max() <= 0.5
    mean_ratio = np.mean([b.masks.mean() for b in batches])
    assert abs(mean_ratio - 0.5 * 0.3) < 0.01  # half the crops, mean ratio (0.1 + 0.5) / 2


def test_buffers_are_consistent_with_masks(batches):
    upper_bound = masking.mask_upper_bound(N_CROPS, N_TOKENS)
    for batch in batches:
        assert batch.masks.shape == (N_CROPS, N_TOKENS) and batch.masks.dtype == bool
        for array, dtype in [
            (batch.indices, np.int32),
            (batch.weights, np.float32),
            (batch.valid, bool),
        ]:
            assert array.shape == (upper_bound,) and array.dtype == dtype
        n = int(batch.n_masked)
        assert batch.n_masked.dtype == np.int32 and batch.n_masked.shape == ()
        assert n == batch.masks.sum() <= upper_bound
        np.testing.assert_array_equal(batch.valid, np.arange(upper_bound) < n)
        flat = np.zeros(N_CROPS * N_TOKENS, dtype=bool)
        flat[batch.indices[:n]] = True
        np.testing.assert_array_equal(flat.reshape(N_CROPS, N_TOKENS), batch.masks)
        assert (np.diff(batch.indices[:n]) > 0).all()
        np.testing.assert_array_equal(batch.indices[n:], 0)
        np.testing.assert_array_equal(batch.weights[n:], 0.0)
        crop_of_token = batch.indices[:n] // N_TOKENS
        weight_per_crop = np.bincount(crop_of_token, weights=batch.weights[:n], minlength=N_CROPS)
        masked = batch.masks.any(axis=1)
        np.testing.assert_allclose(weight_per_crop[masked], 1.0, rtol=1e-5)
        np.testing.assert_array_equal(weight_per_crop[~masked], 0.0)


def test_masked_crops_are_shuffled(batches):
    masked = np.stack([b.masks.any(axis=1) for b in batches])  # [batches, crops]
    first_half = np.zeros(N_CROPS, dtype=bool)
    first_half[:8] = True
    assert not (masked == first_half).all(axis=1).any()
    frequency = masked.mean(axis=0)
    assert (np.abs(frequency - 0.5) < 0.15).all(), frequency
    # An image's two global crops (rows i and i + B) are sometimes both masked, sometimes not.
    both = masked[:, :8] & masked[:, 8:]
    assert 0 < both.mean() < 0.5


def test_same_seed_same_masks_other_seed_different():
    def draw(seed):
        return masking.sample_ibot_masks(np.random.default_rng(seed), 8, (8, 8))

    first, again, other = draw(7), draw(7), draw(8)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.masks, other.masks)


def test_custom_upper_bound_too_small_raises():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="upper_bound"):
        masking.sample_ibot_masks(rng, 4, GRID, upper_bound=5)


def test_custom_upper_bound_pads_further():
    batch = masking.sample_ibot_masks(np.random.default_rng(0), 4, (6, 6), upper_bound=100)
    assert batch.indices.shape == (100,)
    assert int(batch.n_masked) == batch.masks.sum() == batch.valid.sum()
