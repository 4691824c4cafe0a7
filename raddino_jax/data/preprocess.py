"""Inference preprocessing, identical to the exported `preprocessor_config.json` (recipe s8).

transformers' BitImageProcessor: resize the shorter side to S (PIL bicubic on 8-bit pixels, the
longer side truncated: int(S * long / short)), centre crop S x S, rescale 1/255, normalise with
the radiograph mean/std on every channel. Grayscale is replicated to 3 channels (NHWC).
"""

from __future__ import annotations

import numpy as np
from etils import epath
from PIL import Image

from raddino_jax.checkpoint import Preprocessing
from raddino_jax.data.layout import normalise


def to_uint8(pixels01: np.ndarray) -> np.ndarray:
    """[0, 1] float image -> uint8 (round half to even, like PIL's conversion of 255 * x)."""
    return np.clip(np.rint(np.asarray(pixels01, np.float64) * 255.0), 0, 255).astype(np.uint8)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_width, new_height) with the shorter side `size`, the longer truncated like
    transformers' BitImageProcessor (int(size * long / short))."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_and_centre_crop(
    image: np.ndarray, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> np.ndarray:
    """uint8 [H, W] -> [S, S]: PIL resize of the shorter side to S, then the centre S x S (the
    geometric half of the preprocessing; masks pass NEAREST to stay binary)."""
    pil = Image.fromarray(image)
    array = np.asarray(pil.resize(resized_size(*pil.size, size), resample=resample))
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def preprocess_uint8(image: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 [H, W] (or [H, W, 1|3]) -> float32 [S, S, 3] normalised network input."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., 0] if image.shape[-1] == 1 else image
    if image.dtype != np.uint8:
        raise TypeError(f"preprocess_uint8 expects uint8 pixels, got {image.dtype}")
    out = normalise(resize_and_centre_crop(image, pre.image_size), pre.mean, pre.std, np.float64)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    return out.astype(np.float32)


def load_image_uint8(path: str | epath.Path) -> np.ndarray:
    """A DICOM / PNG / JPEG file -> uint8 [H, W] with high = dense (default DecodePolicy)."""
    from raddino_jax.data.decode import classify_file, decode_file

    path = epath.Path(path)
    if classify_file(path) is None:
        raise ValueError(f"{path}: not an image this project reads (DICOM, PNG or JPEG)")
    return to_uint8(decode_file(path).pixels)
