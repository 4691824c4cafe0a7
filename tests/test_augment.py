"""Tests for raddino_jax.data.augment and its lookup tables (data/lut.py): torchvision/PIL
semantics and the recipe's probabilities."""

import dataclasses
import math

import cv2
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from raddino_jax.data import augment, lut
from raddino_jax.data.augment import MultiCropConfig

SMALL = MultiCropConfig(global_size=28, local_size=14, n_local=4)


def _radiograph_like(rng: np.random.Generator, h: int = 72, w: int = 60) -> np.ndarray:
    """Smooth uint8 image with structure (so crops, flips and jitter all change pixels)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 120 + 60 * np.sin(x / 7.0) * np.cos(y / 11.0) + 0.8 * (x - y)
    noise = cv2.GaussianBlur(rng.normal(0, 20, (h, w)).astype(np.float32), (0, 0), 1.5)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _binomial_ok(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


# Sequential references for the fused jitter table: the pipeline never runs these, it applies
# `lut.jitter_table` (both blends composed into one table) instead.


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """torchvision/PIL brightness: blend with black, i.e. x * factor, clipped and truncated."""
    return lut.apply_table(image, lut.blend_table(image.dtype, factor, 0.0))


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """torchvision/PIL contrast: blend with the image's mean grey level rounded to an integer."""
    return lut.apply_table(image, lut.contrast_table(image, factor))


def jitter(
    image: np.ndarray, brightness: float, contrast: float, brightness_first: bool
) -> np.ndarray:
    """Brightness then contrast, or the reverse (ColorJitter's random op order)."""
    if brightness_first:
        return adjust_contrast(adjust_brightness(image, brightness), contrast)
    return adjust_brightness(adjust_contrast(image, contrast), brightness)


# ------------------------------------------------------------------------------------------
# Shapes, dtypes, normalisation, determinism
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("with_channel", [False, True])
def test_multi_crop_shapes_and_dtypes(dtype, with_channel):
    img = _radiograph_like(np.random.default_rng(0)).astype(dtype)
    if dtype == np.uint16:
        img = img * np.uint16(257)
    if with_channel:
        img = img[:, :, None]
    out = augment.multi_crop(img, np.random.default_rng(1), SMALL)
    assert set(out) == {"global_crops", "local_crops"}
    assert out["global_crops"].shape == (2, 28, 28, 1)
    assert out["local_crops"].shape == (4, 14, 14, 1)
    assert out["global_crops"].dtype == np.float32 and out["local_crops"].dtype == np.float32
    lo, hi = (0 - SMALL.mean) / SMALL.std, (1 - SMALL.mean) / SMALL.std
    for v in out.values():
        assert np.all(v >= lo - 1e-5) and np.all(v <= hi + 1e-5)


@pytest.mark.parametrize("dtype,level", [(np.uint8, 200), (np.uint16, 40000)])
def test_normalisation_of_constant_image(dtype, level):
    """No photometric op: a constant image maps to (level/max - mean)/std everywhere."""
    cfg = MultiCropConfig(
        global_size=16,
        local_size=8,
        n_local=2,
        jitter_p=0.0,
        blur_p=(0.0, 0.0, 0.0),
        solarize_p=0.0,
        mean=0.25,
        std=0.5,
    )
    img = np.full((40, 50), level, dtype)
    out = augment.multi_crop(img, np.random.default_rng(0), cfg)
    expected = (level / np.iinfo(dtype).max - 0.25) / 0.5
    np.testing.assert_allclose(out["global_crops"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["local_crops"], expected, rtol=1e-6)


def test_same_seed_same_crops_different_seed_differs():
    img = _radiograph_like(np.random.default_rng(0))
    a = augment.multi_crop(img, np.random.default_rng(5), SMALL)
    b = augment.multi_crop(img, np.random.default_rng(5), SMALL)
    c = augment.multi_crop(img, np.random.default_rng(6), SMALL)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a[k], c[k])


def test_rejects_bad_images():
    with pytest.raises(TypeError):
        augment.multi_crop(np.zeros((8, 8), np.float32), np.random.default_rng(0), SMALL)
    with pytest.raises(ValueError):
        augment.multi_crop(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0), SMALL)


# ------------------------------------------------------------------------------------------
# RandomResizedCrop box sampling
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [(0.32, 1.0), (0.05, 0.32)])
def test_resized_crop_box_bounds(scale):
    rng = np.random.default_rng(0)
    h, w = 630, 518
    ratio = (3 / 4, 4 / 3)
    fracs, log_ratios = [], []
    for _ in range(2000):
        top, left, bh, bw = augment.sample_resized_crop_box(rng, h, w, scale, ratio)
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
        # Rounding of w and h to integers moves area and ratio by at most ~1 px per side.
        frac = bh * bw / (h * w)
        assert scale[0] * (1 - 4 / math.sqrt(scale[0] * h * w)) <= frac
        assert frac <= scale[1] * (1 + 4 / math.sqrt(scale[0] * h * w))
        assert ratio[0] * (1 - 2 / bh) <= bw / bh <= ratio[1] * (1 + 2 / bh)
        fracs.append(frac)
        log_ratios.append(math.log(bw / bh))
    # Area ~ U(scale) and log-ratio ~ U(log ratio): check the first two moments.
    if scale[1] < 0.5:  # every attempt fits, so the draws are unconditioned
        assert abs(np.mean(fracs) - np.mean(scale)) < 0.01
        assert abs(np.mean(log_ratios)) < 0.02
        assert abs(np.std(log_ratios) - math.log(16 / 9) / math.sqrt(12)) < 0.01


def test_resized_crop_box_fallback_is_central_with_clamped_ratio():
    rng = np.random.default_rng(0)
    # Scale > 1 never fits: torchvision falls back to the central crop.
    assert augment.sample_resized_crop_box(rng, 100, 400, (2.0, 3.0), (3 / 4, 4 / 3)) == (
        0,
        (400 - 133) // 2,
        100,
        133,
    )
    assert augment.sample_resized_crop_box(rng, 400, 100, (2.0, 3.0), (3 / 4, 4 / 3)) == (
        (400 - 133) // 2,
        0,
        133,
        100,
    )
    assert augment.sample_resized_crop_box(rng, 90, 100, (2.0, 3.0), (3 / 4, 4 / 3)) == (
        0,
        0,
        90,
        100,
    )


def test_resize_crop_is_close_to_pil_bicubic():
    """Against PIL's antialiased bicubic (what torchvision uses on PIL images)."""
    rng = np.random.default_rng(0)
    smooth = cv2.resize(_radiograph_like(rng, 90, 80), (320, 360), interpolation=cv2.INTER_CUBIC)
    pil = Image.fromarray(smooth)
    for box, size in [((10, 20, 300, 280), 224), ((40, 30, 60, 50), 98), ((0, 0, 360, 320), 98)]:
        top, left, h, w = box
        pil_box = (left, top, left + w, top + h)
        ref = np.asarray(pil.resize((size, size), Image.BICUBIC, box=pil_box))
        out = augment.resize_crop(smooth, box, size, antialias_min_downscale=1.25)
        rmse = np.sqrt(np.mean((out.astype(np.float64) - ref) ** 2))
        assert rmse < 1.5, (box, size, rmse)


def test_strong_downscale_uses_antialiasing():
    """A 3x shrink of fine texture: the area path must be far closer to PIL than plain cubic."""
    rng = np.random.default_rng(0)
    tex = cv2.GaussianBlur(rng.integers(0, 256, (294, 294)).astype(np.uint8), (0, 0), 0.7)
    ref = np.asarray(Image.fromarray(tex).resize((98, 98), Image.BICUBIC)).astype(np.float64)
    ours = augment.resize_crop(tex, (0, 0, 294, 294), 98, antialias_min_downscale=1.25)
    plain = cv2.resize(tex, (98, 98), interpolation=cv2.INTER_CUBIC)
    err_ours = np.sqrt(np.mean((ours - ref) ** 2))
    err_plain = np.sqrt(np.mean((plain - ref) ** 2))
    assert err_ours < 0.5 * err_plain, (err_ours, err_plain)


# ------------------------------------------------------------------------------------------
# Photometric ops against PIL / independent references
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [0.6, 0.77, 1.0, 1.23, 1.4])
def test_brightness_and_contrast_match_pil(factor):
    img = _radiograph_like(np.random.default_rng(1), 50, 40)
    pil = Image.fromarray(img)
    ref_b = np.asarray(ImageEnhance.Brightness(pil).enhance(factor))
    ref_c = np.asarray(ImageEnhance.Contrast(pil).enhance(factor))
    np.testing.assert_array_equal(adjust_brightness(img, factor), ref_b)
    np.testing.assert_array_equal(adjust_contrast(img, factor), ref_c)


def test_uint16_brightness_and_contrast_formulas():
    img = (_radiograph_like(np.random.default_rng(2), 30, 20).astype(np.uint16) * 257)[:, :]
    f = 1.3
    expected_b = np.floor(np.clip(img.astype(np.float64) * f, 0, 65535))
    np.testing.assert_allclose(adjust_brightness(img, f), expected_b, atol=1)
    mean = int(img.mean() + 0.5)
    expected_c = np.floor(np.clip(mean + 0.7 * (img.astype(np.float64) - mean), 0, 65535))
    np.testing.assert_allclose(adjust_contrast(img, 0.7), expected_c, atol=1)
    assert adjust_contrast(img, 0.7).dtype == np.uint16


def test_solarize_matches_pil_and_scales_for_uint16():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ref = np.asarray(ImageOps.solarize(Image.fromarray(img), 128))
    out = lut.apply_table(img, lut.solarize_table(np.uint8, 128))
    np.testing.assert_array_equal(out, ref)
    t16 = lut.scaled_solarize_threshold(128, np.uint16)
    assert t16 == 128 * 257
    img16 = img.astype(np.uint16) * 257
    out16 = lut.apply_table(img16, lut.solarize_table(np.uint16, t16))
    np.testing.assert_array_equal(out16, ref.astype(np.uint16) * 257)


def _reference_blur(img: np.ndarray, sigma: float, kernel: int) -> np.ndarray:
    """torchvision's gaussian_blur in float64: normalised sampled kernel, reflect pad, round."""
    half = kernel // 2
    x = np.linspace(-half, half, kernel)
    k1 = np.exp(-0.5 * (x / sigma) ** 2)
    k1 /= k1.sum()
    padded = np.pad(img.astype(np.float64), half, mode="reflect")
    rows = sum(k1[i] * padded[i : i + img.shape[0], :] for i in range(kernel))
    out = sum(k1[i] * rows[:, i : i + img.shape[1]] for i in range(kernel))
    return np.round(out)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_gaussian_blur_matches_torchvision_reference(sigma):
    img = np.random.default_rng(3).integers(0, 256, (23, 31)).astype(np.uint8)
    out = augment.gaussian_blur(img, sigma, 9)
    diff = out.astype(np.float64) - _reference_blur(img, sigma, 9)
    # cv2's uint8 path is fixed-point: off by at most one level, unbiased (white noise is the
    # worst case for this; smooth images differ far less often).
    assert np.abs(diff).max() <= 1
    assert abs(diff.mean()) < 0.03 and np.abs(diff).mean() < 0.25


# ------------------------------------------------------------------------------------------
# The recorded params are what was applied, and their frequencies follow the recipe
# ------------------------------------------------------------------------------------------


def _replay(image, p: augment.CropParams, size: int, cfg: MultiCropConfig) -> np.ndarray:
    crop = augment.resize_crop(image, p.box, size, cfg.antialias_min_downscale)
    if p.flipped:
        crop = crop[:, ::-1].copy()
    if p.jittered:
        crop = jitter(crop, p.brightness, p.contrast, p.brightness_first)
    if p.blur_sigma > 0:
        crop = augment.gaussian_blur(crop, p.blur_sigma, cfg.blur_kernel)
    if p.solarized:
        crop = lut.apply_table(crop, lut.solarize_table(crop.dtype, 128))
    return ((crop.astype(np.float64) / 255 - cfg.mean) / cfg.std).astype(np.float32)


def test_params_describe_the_applied_ops():
    img = _radiograph_like(np.random.default_rng(0))
    rng = np.random.default_rng(11)
    seen = set()
    for _ in range(40):
        crops, params = augment.multi_crop(img, rng, SMALL, return_params=True)
        assert len(params) == 2 + SMALL.n_local
        stacked = [crops["global_crops"][0], crops["global_crops"][1]] + list(crops["local_crops"])
        for k, (crop, p) in enumerate(zip(stacked, params, strict=True)):
            size = SMALL.global_size if k < 2 else SMALL.local_size
            np.testing.assert_allclose(crop[:, :, 0], _replay(img, p, size, SMALL), atol=1e-5)
            seen.update({("flip", p.flipped), ("blur", p.blur_sigma > 0), ("sol", p.solarized)})
    assert len(seen) == 6  # every op was exercised both ways


def test_augmentation_probabilities_follow_recipe():
    """Blur 0 / 0.9 / 0.5 (as trained, recipe s5), solarize 0.2 on global 2 only, flip 0.5."""
    cfg = MultiCropConfig(global_size=8, local_size=8, n_local=2)
    img = _radiograph_like(np.random.default_rng(0), 24, 24)
    rng = np.random.default_rng(123)
    n = 3000
    records = [augment.multi_crop(img, rng, cfg, return_params=True)[1] for _ in range(n)]
    g1 = [r[0] for r in records]
    g2 = [r[1] for r in records]
    loc = [p for r in records for p in r[2:]]
    assert not any(p.blur_sigma > 0 for p in g1)
    assert _binomial_ok(sum(p.blur_sigma > 0 for p in g2), n, 0.9)
    assert _binomial_ok(sum(p.blur_sigma > 0 for p in loc), len(loc), 0.5)
    assert not any(p.solarized for p in g1) and not any(p.solarized for p in loc)
    assert _binomial_ok(sum(p.solarized for p in g2), n, 0.2)
    everything = g1 + g2 + loc
    assert _binomial_ok(sum(p.flipped for p in everything), len(everything), 0.5)
    jittered = [p for p in everything if p.jittered]
    assert _binomial_ok(len(jittered), len(everything), 0.8)
    assert _binomial_ok(sum(p.brightness_first for p in jittered), len(jittered), 0.5)
    b = np.array([p.brightness for p in jittered])
    c = np.array([p.contrast for p in jittered])
    assert b.min() >= 0.6 and b.max() <= 1.4 and c.min() >= 0.6 and c.max() <= 1.4
    assert abs(b.mean() - 1) < 0.02 and abs(c.mean() - 1) < 0.02
    sig = np.array([p.blur_sigma for p in everything if p.blur_sigma > 0])
    assert sig.min() >= 0.1 and sig.max() <= 2.0 and abs(sig.mean() - 1.05) < 0.03


# ------------------------------------------------------------------------------------------
# Fast paths: fused tables, integer crops + tables, antialiased shrink
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("brightness_first", [True, False])
def test_jitter_table_equals_sequential_ops(dtype, brightness_first):
    img = _radiograph_like(np.random.default_rng(4), 30, 26).astype(dtype)
    if dtype == np.uint16:
        img = img * np.uint16(257) + np.uint16(100)
    for b, c in [(0.6, 1.4), (1.37, 0.63), (1.0, 1.0), (1.21, 1.33)]:
        table = lut.jitter_table(img, b, c, brightness_first)
        expected = jitter(img, b, c, brightness_first)
        np.testing.assert_array_equal(lut.apply_table(img, table), expected)
        if dtype == np.uint8:  # and the same as PIL's two enhancers in that order
            pil = Image.fromarray(img)
            ops = [(ImageEnhance.Brightness, b), (ImageEnhance.Contrast, c)]
            for enhancer, factor in ops if brightness_first else ops[::-1]:
                pil = enhancer(pil).enhance(factor)
            np.testing.assert_array_equal(expected, np.asarray(pil))


def test_contrast_grey_rounds_half_up_like_pil():
    """Mean exactly k + 0.5: PIL's int(mean + 0.5) must round up (exact sum / n)."""
    for values in ([10, 11], [0, 255, 100, 100, 3, 4, 5, 6], [7, 8, 8, 9, 200, 201]):
        img = np.array([values], np.uint8)
        ref = np.asarray(ImageEnhance.Contrast(Image.fromarray(img)).enhance(1.7))
        np.testing.assert_array_equal(adjust_contrast(img, 1.7), ref)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_levels_and_tables_reproduce_multi_crop(dtype):
    img = _radiograph_like(np.random.default_rng(0)).astype(dtype)
    if dtype == np.uint16:
        img = img * np.uint16(257)
    crops = augment.multi_crop(img, np.random.default_rng(9), SMALL)
    levels = augment.multi_crop_levels(img, np.random.default_rng(9), SMALL)
    assert levels.global_levels.dtype == dtype and levels.global_levels.shape == (2, 28, 28)
    assert levels.local_levels.shape == (4, 14, 14) and len(levels.params) == 6
    tables = levels.global_tables + levels.local_tables
    assert all(t is None or t.dtype == dtype for t in tables)  # integer level -> level
    # Written through a strided crop-major view, as the pipeline's batch function does.
    batch = np.full((2, 3, 28, 28, 1), np.nan, np.float32)
    out = augment.apply_tables(
        levels.global_levels,
        levels.global_tables,
        batch[:, 1, ..., 0],
        mean=SMALL.mean,
        std=SMALL.std,
    )
    assert np.shares_memory(out, batch)
    np.testing.assert_array_equal(batch[:, 1], crops["global_crops"])
    assert np.isnan(batch[:, 0]).all() and np.isnan(batch[:, 2]).all()
    # The integer crops: normalised by the host table, they are multi_crop's floats bit for bit.
    finished = augment.apply_tables(
        levels.local_levels, levels.local_tables, np.empty_like(levels.local_levels)
    )
    normalise = lut.normalise_table(np.dtype(dtype), SMALL.mean, SMALL.std)
    np.testing.assert_array_equal(normalise[finished][..., None], crops["local_crops"])


def test_tables_are_none_when_no_pixel_op_applies():
    """No jitter and no solarize: the levels are final, no lookup (the pipeline copies them)."""
    cfg = MultiCropConfig(global_size=28, local_size=14, n_local=2, jitter_p=0.0, solarize_p=0.0)
    img = _radiograph_like(np.random.default_rng(1))
    levels = augment.multi_crop_levels(img, np.random.default_rng(2), cfg)
    assert all(t is None for t in levels.global_tables + levels.local_tables)
    out = augment.apply_tables(
        levels.global_levels, levels.global_tables, np.empty((2, 28, 28), np.uint8)
    )
    np.testing.assert_array_equal(out, levels.global_levels)
    solarizing = dataclasses.replace(cfg, solarize_p=1.0)
    levels = augment.multi_crop_levels(img, np.random.default_rng(2), solarizing)
    assert levels.global_tables[0] is None  # solarize is global 2 only
    assert levels.global_tables[1] is lut.solarize_table(np.dtype(np.uint8), 128)


def test_uint8_levels_as_uint16_are_exact():
    """x * 257 as uint16 normalises to exactly x's uint8 value: x / 255 == 257 x / 65535."""
    levels8 = np.arange(256, dtype=np.uint8)
    norm8 = lut.normalise_table(np.dtype(np.uint8), SMALL.mean, SMALL.std)
    norm16 = lut.normalise_table(np.dtype(np.uint16), SMALL.mean, SMALL.std)
    np.testing.assert_array_equal(norm16[levels8.astype(np.uint16) * 257], norm8)
    # Through apply_tables: a jitter-like table and the identity, written as uint16.
    img = _radiograph_like(np.random.default_rng(3))[:28, :28]
    table = lut.blend_table(np.dtype(np.uint8), 1.3, 40.0)
    crops = np.stack([img, img])
    wide = augment.apply_tables(crops, (table, None), np.empty((2, 28, 28), np.uint16))
    np.testing.assert_array_equal(wide[0], table[img].astype(np.uint16) * 257)
    np.testing.assert_array_equal(wide[1], img.astype(np.uint16) * 257)
    floats = augment.apply_tables(
        crops, (table, None), np.empty((2, 28, 28), np.float32), mean=SMALL.mean, std=SMALL.std
    )
    np.testing.assert_array_equal(norm16[wide], floats)


def test_uint16_levels_never_narrow_to_uint8():
    levels = np.zeros((1, 4, 4), np.uint16)
    with pytest.raises(ValueError, match="uint16 levels do not fit uint8"):
        augment.apply_tables(levels, (None,), np.empty((1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="mean and std"):
        augment.apply_tables(levels, (None,), np.empty((1, 4, 4), np.float32))


@pytest.mark.parametrize("value", ["int8", "bfloat16", ""])
def test_transfer_dtype_is_validated(value):
    with pytest.raises(ValueError, match="transfer_dtype"):
        MultiCropConfig(transfer_dtype=value)


def test_antialiased_shrink_is_aligned_and_averages():
    """A linear ramp shrunk by non-integer factors: output pixel j must equal the ramp at the
    centre of its source footprint, (j + 0.5) * shrink - 0.5 (no half-pixel shift)."""
    h, w = 301, 233
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    ramp = (40 + 0.5 * x + 0.3 * y).astype(np.float32)  # float input: no quantisation
    for box, size in [((0, 0, 301, 233), 98), ((20, 10, 250, 200), 112), ((0, 0, 160, 140), 56)]:
        top, left, bh, bw = box
        out = augment.resize_crop(ramp, box, size, antialias_min_downscale=1.25)
        centres_x = left + (np.arange(size) + 0.5) * bw / size - 0.5
        centres_y = top + (np.arange(size) + 0.5) * bh / size - 0.5
        expected = 40 + 0.5 * centres_x[None, :] + 0.3 * centres_y[:, None]
        inner = (slice(2, -2), slice(2, -2))  # borders replicate, as every resampler does
        np.testing.assert_allclose(out[inner], expected[inner], atol=0.02)


def test_antialiased_shrink_tracks_pil_like_area_does():
    """On recipe-s5 boxes of a textured image, the fast path is about as close to PIL's
    antialiased bicubic as cv2's generic INTER_AREA, and never much worse on one crop."""
    rng = np.random.default_rng(0)
    tex = cv2.GaussianBlur(rng.integers(0, 256, (180, 160)).astype(np.uint8), (0, 0), 0.8)
    pil = Image.fromarray(tex)
    ours_err, area_err = [], []
    for _ in range(40):
        top, left, h, w = augment.sample_resized_crop_box(rng, 180, 160, (0.3, 1.0), (0.75, 4 / 3))
        ref = np.asarray(pil.resize((40, 40), Image.BICUBIC, box=(left, top, left + w, top + h)))
        ours = augment.resize_crop(tex, (top, left, h, w), 40, antialias_min_downscale=1.25)
        crop = tex[top : top + h, left : left + w]
        area = cv2.resize(crop, (40, 40), interpolation=cv2.INTER_AREA)
        ours_err.append(np.sqrt(np.mean((ours - ref.astype(np.float64)) ** 2)))
        area_err.append(np.sqrt(np.mean((area - ref.astype(np.float64)) ** 2)))
    plain = cv2.resize(tex, (40, 40), interpolation=cv2.INTER_CUBIC)
    plain_err = np.sqrt(np.mean((plain - np.asarray(pil.resize((40, 40), Image.BICUBIC))) ** 2))
    assert np.mean(ours_err) < 1.2 * np.mean(area_err), (np.mean(ours_err), np.mean(area_err))
    assert max(ours_err) < 1.5 * max(area_err)
    assert np.mean(ours_err) < 0.5 * plain_err
