"""Per-core throughput of the multi-crop input path: ours (OpenCV/NumPy) vs a plain-PIL reference.

Both sides do the full per-sample work of recipe s5 on the same PNG: decode, 2 global + 8
local RandomResizedCrops (bicubic), flip, brightness/contrast jitter in random order, Gaussian
blur (p 0 / 0.9 / 0.5), solarize (global 2), normalise to float32. The input is a real chest
radiograph (pydicom-data ``RG1_UNCR.dcm``), min-max scaled to uint8 and resized to a shorter
side of 518, like RAD-DINO's preprocessed PNGs (recipe s8). One process, one thread:
``cv2.setNumThreads(1)``; PIL is single-threaded. Rounds alternate ours / PIL so both see the
same machine load; the table reports the median round.

The last column times the whole Grain pipeline (``make_dataset``: shuffle, decode, crops,
batching, iBOT masks) at batch 32, num_workers=0, to show the per-batch overhead. Each figure
is the median of the interleaved rounds, with the (min-max) spread.

``--accuracy`` also prints how far the fast antialiased resize (``augment.resize_crop``) is
from PIL's antialiased bicubic, next to the previous path (cv2's generic INTER_AREA), on 300
recipe-s5 boxes of the radiograph, and the time of the PNG decoders.

Run: .venv/bin/python benchmarks/data_throughput.py [--samples 100] [--rounds 5] [--accuracy]
"""

from __future__ import annotations

import argparse
import functools
import io
import statistics
import time
from collections.abc import Callable

import cv2
import harness
import numpy as np
import pydicom
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from raddino_jax.data import augment, pipeline
from raddino_jax.data.layout import normalise
from raddino_jax.data.png import decode_image

DICOM_NAME = "RG1_UNCR.dcm"


def radiograph_png(shorter_side: int = 518) -> tuple[bytes, tuple[int, int]]:
    """The pydicom-data chest CR as an 8-bit PNG with the given shorter side, and its shape."""
    import data_store  # pydicom-data's package; local file, no download

    path = f"{data_store.__path__[0]}/data/{DICOM_NAME}"
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = pixels.max() - pixels
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255
    h, w = pixels.shape
    s = shorter_side / min(h, w)
    size = (round(w * s), round(h * s))
    img = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA).round().astype(np.uint8)
    return cv2.imencode(".png", img)[1].tobytes(), img.shape


# ---------------------------------------------------------------------------------------------
# The plain-PIL reference (torchvision-free, same recipe)
# ---------------------------------------------------------------------------------------------


def _pil_crop(
    img: Image.Image,
    rng: np.random.Generator,
    cfg: augment.MultiCropConfig,
    size: int,
    scale: tuple[float, float],
    blur_p: float,
    solarize_p: float,
) -> np.ndarray:
    top, left, h, w = augment.sample_resized_crop_box(rng, img.height, img.width, scale, cfg.ratio)
    crop = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    if rng.random() < cfg.flip_p:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < cfg.jitter_p:
        b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
        c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        ops = [(ImageEnhance.Brightness, b), (ImageEnhance.Contrast, c)]
        if rng.random() < 0.5:
            ops.reverse()
        for enhancer, factor in ops:
            crop = enhancer(crop).enhance(factor)
    if blur_p > 0 and rng.random() < blur_p:
        crop = crop.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*cfg.blur_sigma)))
    if solarize_p > 0 and rng.random() < solarize_p:
        crop = ImageOps.solarize(crop, cfg.solarize_threshold)
    return normalise(np.asarray(crop), cfg.mean, cfg.std)


def pil_sample(png: bytes, rng: np.random.Generator, cfg: augment.MultiCropConfig) -> dict:
    """PIL decode + multi-crop of one PNG -> the same arrays as ``multi_crop``."""
    img = Image.open(io.BytesIO(png))
    img.load()
    settings = ((cfg.blur_p[0], 0.0), (cfg.blur_p[1], cfg.solarize_p))
    globals_ = [
        _pil_crop(img, rng, cfg, cfg.global_size, cfg.global_scale, bp, sp) for bp, sp in settings
    ]
    locals_ = [
        _pil_crop(img, rng, cfg, cfg.local_size, cfg.local_scale, cfg.blur_p[2], 0.0)
        for _ in range(cfg.n_local)
    ]
    return {
        "global_crops": np.stack(globals_)[..., None],
        "local_crops": np.stack(locals_)[..., None],
    }


def ours_sample(png: bytes, rng: np.random.Generator, cfg: augment.MultiCropConfig) -> dict:
    """Our per-sample path: cv2 decode + ``multi_crop`` (what the Grain transform runs)."""
    return augment.multi_crop(decode_image(png), rng, cfg)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def samples_per_second(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def pipeline_samples_per_second(png: bytes, cfg: augment.MultiCropConfig, batches: int) -> float:
    source = [{"image": png}] * 64
    ds = pipeline.make_dataset(
        source,
        seed=0,
        per_process_batch=32,
        crop_cfg=cfg,
        mask_group_size=32,
        process_index=0,
        process_count=1,
    )
    it = iter(ds)
    next(it)  # warm-up
    return 32 * samples_per_second(lambda: next(it), batches)


def _area_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The previous resize path for shrinks >= 1.25x: cv2's generic INTER_AREA."""
    t, l, h, w = box
    return cv2.resize(image[t : t + h, l : l + w], (size, size), interpolation=cv2.INTER_AREA)


def _mean_rmse(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([np.sqrt(np.mean((x - y) ** 2)) for x, y in zip(a, b, strict=True)]))


def _ms_per_box(fn: Callable[..., object], image, boxes, size: int, rounds: int) -> float:
    """Best-of-rounds milliseconds per box of ``fn(image, box, size)``."""
    best = []
    for _ in range(rounds):
        start = time.perf_counter()
        for box in boxes:
            fn(image, box, size)
        best.append((time.perf_counter() - start) / len(boxes) * 1e3)
    return min(best)


def _fast_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    return augment.resize_crop(image, box, size, 1.25)


def resize_accuracy(png: bytes, rounds: int = 3) -> None:
    """RMSE (8-bit levels) vs PIL of the fast resize and of cv2's generic INTER_AREA."""
    image = decode_image(png)
    pil = Image.fromarray(image)
    print(
        "\n| crop | boxes shrunk >= 1.25x | RMSE vs PIL: ours | generic INTER_AREA "
        "| ours vs INTER_AREA | ms ours | ms INTER_AREA |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, size, scale in (("global 224", 224, (0.32, 1.0)), ("local 98", 98, (0.05, 0.32))):
        rng = np.random.default_rng(0)
        boxes = [
            augment.sample_resized_crop_box(rng, *image.shape, scale, (3 / 4, 4 / 3))
            for _ in range(300)
        ]
        boxes = [b for b in boxes if min(b[2], b[3]) / size >= 1.25]
        ours = [_fast_resize(image, b, size).astype(np.float64) for b in boxes]
        area = [_area_resize(image, b, size).astype(np.float64) for b in boxes]
        refs = [
            np.asarray(pil.resize((size, size), Image.BICUBIC, box=(l, t, l + w, t + h)))
            for t, l, h, w in boxes
        ]
        t_ours = _ms_per_box(_fast_resize, image, boxes, size, rounds)
        t_area = _ms_per_box(_area_resize, image, boxes, size, rounds)
        print(
            f"| {name} | {len(boxes)} | {_mean_rmse(ours, refs):.3f} "
            f"| {_mean_rmse(area, refs):.3f} | {_mean_rmse(ours, area):.3f} "
            f"| {t_ours:.3f} | {t_area:.3f} |"
        )

    encoded = np.frombuffer(png, np.uint8)
    decoders = {
        "decode_image (fast PNG path)": lambda: decode_image(png),
        "cv2.imdecode IMREAD_UNCHANGED": lambda: cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED),
        "cv2.imdecode IMREAD_GRAYSCALE": lambda: cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE),
        "PIL open + load": lambda: Image.open(io.BytesIO(png)).load(),
    }
    times = harness.interleaved(
        {name: lambda fn=fn: [fn() for _ in range(50)] for name, fn in decoders.items()}, 5
    )
    rows = [[name, f"{min(t) * 20:.2f}", f"{statistics.median(t) * 20:.2f}"]
            for name, t in times.items()]  # fmt: skip
    print()
    print(harness.markdown_table(["PNG decode", "ms, min of 5", "median"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="samples per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per size")
    parser.add_argument("--pipeline-batches", type=int, default=3)
    parser.add_argument("--accuracy", action="store_true", help="resize error + decode times")
    args = parser.parse_args()

    cv2.setNumThreads(1)
    png, shape = radiograph_png()
    print(harness.machine_header())
    print(f"input: {DICOM_NAME} -> {shape[0]}x{shape[1]} uint8 PNG, {len(png)} bytes")
    print(f"one process, one thread; {args.rounds} alternating rounds of {args.samples} samples")
    rows = []
    for global_size in (224, 518):
        cfg = augment.MultiCropConfig(global_size=global_size, local_size=98, n_local=8)
        rng_ours, rng_pil = np.random.default_rng(0), np.random.default_rng(0)
        ours, pil, grain_rates = [], [], []
        for _ in range(args.rounds):
            run_ours = functools.partial(ours_sample, png, rng_ours, cfg)
            run_pil = functools.partial(pil_sample, png, rng_pil, cfg)
            ours.append(samples_per_second(run_ours, args.samples))
            pil.append(samples_per_second(run_pil, args.samples))
            grain_rates.append(pipeline_samples_per_second(png, cfg, args.pipeline_batches))
        rows.append((global_size, ours, pil, grain_rates))

    print()
    header = ["crops", "ours (samples/s/core)", "PIL (samples/s/core)", "ours/PIL per round",
              "grain pipeline, B=32 (samples/s)"]  # fmt: skip
    table = [[f"{g}/98 x2+8", harness.spread(ours, ".1f"), harness.spread(pil, ".1f"),
              harness.format_paired(ours, pil), harness.spread(grain, ".1f")]
             for g, ours, pil, grain in rows]  # fmt: skip
    print(harness.markdown_table(header, table))
    if args.accuracy:
        resize_accuracy(png)


if __name__ == "__main__":
    main()
