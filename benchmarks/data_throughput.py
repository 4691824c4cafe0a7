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
import io
import statistics

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


# The plain-PIL reference (torchvision-free, same recipe).
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


def resize_row(image: np.ndarray, name: str, size: int, scale, rounds: int) -> list:
    """RMSE (8-bit levels) vs PIL's antialiased bicubic of the fast resize
    (`augment.resize_crop`) and of the previous path for shrinks >= 1.25x (cv2's generic
    INTER_AREA), on 300 recipe-s5 boxes, and ms per box of both (min of the rounds)."""
    rng = np.random.default_rng(0)
    boxes = [augment.sample_resized_crop_box(rng, *image.shape, scale, (3 / 4, 4 / 3))
             for _ in range(300)]  # fmt: skip
    boxes = [(t, l, h, w) for t, l, h, w in boxes if min(h, w) / size >= 1.25]
    resizers = {
        "ours": lambda t, l, h, w: augment.resize_crop(image, (t, l, h, w), size, 1.25),
        "area": lambda t, l, h, w: cv2.resize(
            image[t : t + h, l : l + w], (size, size), interpolation=cv2.INTER_AREA
        ),
    }
    out = {k: [fn(*b).astype(np.float64) for b in boxes] for k, fn in resizers.items()}
    pil = Image.fromarray(image)
    out["pil"] = [np.asarray(pil.resize((size, size), Image.BICUBIC, box=(l, t, l + w, t + h)))
                  for t, l, h, w in boxes]  # fmt: skip
    times = harness.interleaved(
        {k: lambda fn=fn: [fn(*b) for b in boxes] for k, fn in resizers.items()}, rounds
    )

    def rmse(a: str, b: str) -> str:
        errors = [np.sqrt(np.mean((x - y) ** 2)) for x, y in zip(out[a], out[b], strict=True)]
        return f"{np.mean(errors):.3f}"

    ms = [f"{min(times[k]) / len(boxes) * 1e3:.3f}" for k in ("ours", "area")]
    return [name, len(boxes), rmse("ours", "pil"), rmse("area", "pil"), rmse("ours", "area"), *ms]


def resize_accuracy(png: bytes, rounds: int = 3) -> None:
    """`resize_row` for the global and local crops, and the time of the PNG decoders."""
    image = decode_image(png)
    rows = [resize_row(image, "global 224", 224, (0.32, 1.0), rounds),
            resize_row(image, "local 98", 98, (0.05, 0.32), rounds)]  # fmt: skip
    print()
    print(harness.markdown_table(["crop", "boxes shrunk >= 1.25x", "RMSE vs PIL: ours",
                                  "generic INTER_AREA", "ours vs INTER_AREA", "ms ours",
                                  "ms INTER_AREA"], rows))  # fmt: skip

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


def throughput_row(png: bytes, global_size: int, args: argparse.Namespace) -> list:
    """Samples/s per core of ours and PIL and of the whole Grain pipeline, rounds interleaved."""
    cfg = augment.MultiCropConfig(global_size=global_size, local_size=98, n_local=8)
    rng_ours, rng_pil = np.random.default_rng(0), np.random.default_rng(0)
    grain = iter(pipeline.make_dataset(
        [{"image": png}] * 64, seed=0, per_process_batch=32, crop_cfg=cfg, mask_group_size=32,
        process_index=0, process_count=1,
    ))  # fmt: skip
    next(grain)  # warm-up
    n, batches = args.samples, args.pipeline_batches
    times = harness.interleaved({
        # ours: what the Grain transform runs (cv2 decode + `multi_crop`)
        "ours": lambda: [augment.multi_crop(decode_image(png), rng_ours, cfg) for _ in range(n)],
        "pil": lambda: [pil_sample(png, rng_pil, cfg) for _ in range(n)],
        "grain": lambda: [next(grain) for _ in range(batches)],
    }, args.rounds)  # fmt: skip
    ours, pil = ([n / t for t in times[k]] for k in ("ours", "pil"))
    grain_rates = [32 * batches / t for t in times["grain"]]
    return [f"{global_size}/98 x2+8", harness.spread(ours, ".1f"), harness.spread(pil, ".1f"),
            harness.format_paired(ours, pil), harness.spread(grain_rates, ".1f")]  # fmt: skip


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
    rows = [throughput_row(png, global_size, args) for global_size in (224, 518)]
    print()
    header = ["crops", "ours (samples/s/core)", "PIL (samples/s/core)", "ours/PIL per round",
              "grain pipeline, B=32 (samples/s)"]  # fmt: skip
    print(harness.markdown_table(header, rows))
    if args.accuracy:
        resize_accuracy(png)


if __name__ == "__main__":
    main()
