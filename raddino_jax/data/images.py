"""Image containers, PNG/JPEG decoding, resizing and PNG encoding of radiographs.

Every decoder (here and in `dicom`) returns a `DecodedImage`: a float32 2-D array already
windowed to [0, 1] with high = bright = dense (bone white, air black), plus a flat metadata
dict whose keys are `METADATA_KEYS`. Failures raise `DecodeError` with a short
machine-readable reason, so the dataset builder can report them instead of crashing
(recipe s8: offline preprocessing to PNG).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import cv2
import numpy as np
from etils import epath

# Machine-readable reasons a file can be rejected; the builder's report uses these verbatim.
REJECTION_REASONS = (
    "multiframe",
    "colour",
    "no_pixel_data",
    "no_decoder",
    "not_dicom",
    "not_image",
    "empty_file",
    "truncated",
    "decode_error",
    "mask_error",
)

# `DecodedImage.metadata` with every value unknown ('' text, NaN age, None spacing); its keys,
# in the order the record schema lists them, are `METADATA_KEYS`.
_UNKNOWN_METADATA = {
    "patient_id": "",
    "sex": "",
    "age_years": math.nan,
    "view_position": "",
    "body_part": "",
    "modality": "",
    "manufacturer": "",
    "source": "",
    "orig_height": 0,
    "orig_width": 0,
    "pixel_spacing_mm": None,
    "photometric": "",
    "bits_stored": 0,
    "transfer_syntax": "",
    "windowing": "",
    "num_frames": 1,
}
METADATA_KEYS = tuple(_UNKNOWN_METADATA)

# ITU-R BT.601 luma weights, the usual RGB -> grey conversion (same as cv2 / PIL "L").
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class DecodeError(Exception):
    """A file that cannot become a training image.

    Attributes:
      reason: one of `REJECTION_REASONS` (machine-readable, used in report.json).
      path: the file's name or path ("<bytes>" for in-memory input).
      message: a human sentence naming the file and the cause.
    """

    def __init__(self, reason: str, path: str, detail: str):
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        self.reason = reason
        self.path = path
        self.message = f"{path}: {reason}: {detail}"
        super().__init__(self.message)


@dataclasses.dataclass
class DecodedImage:
    """A decoded radiograph.

    Attributes:
      pixels: float32 [height, width] in [0, 1]; high = bright/dense (MONOCHROME1 inverted).
      metadata: dict with every key of `METADATA_KEYS` (see `empty_metadata` for defaults).
    """

    pixels: np.ndarray
    metadata: dict[str, Any]


def empty_metadata(source: str, height: int, width: int) -> dict[str, Any]:
    """Metadata with every key present and 'unknown' values: '' for text, NaN age, None spacing."""
    return {**_UNKNOWN_METADATA, "source": source, "orig_height": height, "orig_width": width}


def read_input(path_or_bytes: str | epath.PathLike | bytes) -> tuple[str, bytes]:
    """(printable name, raw bytes) of a path (local or gs://) or of in-memory bytes."""
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        return "<bytes>", bytes(path_or_bytes)
    return str(path_or_bytes), epath.Path(path_or_bytes).read_bytes()


def rgb_to_luminance(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB image. [H, W, 3] (any numeric dtype) -> float32 [H, W]."""
    return rgb[..., :3].astype(np.float32) @ _LUMA_WEIGHTS


def decode_raster(
    path_or_bytes: str | epath.PathLike | bytes,
    source: str = "",
    colour: str = "convert",
) -> DecodedImage:
    """Decode an 8- or 16-bit PNG/JPEG into a `DecodedImage`.

    The file is taken as already windowed for display (e.g. CheXpert JPEGs, NIH PNGs), so the
    intensities are only scaled by the dtype's maximum (255 or 65535), never re-stretched.
    Colour images are converted to BT.601 luminance (`colour="convert"`) or rejected
    (`colour="reject"`); an alpha channel is dropped.

    `path_or_bytes` is a path (local or gs://) or the encoded bytes; `source` the dataset name
    stored in the metadata.

    Raises:
      DecodeError: reason empty_file, not_image, colour or decode_error.
    """
    name, data = read_input(path_or_bytes)
    if not data:
        raise DecodeError("empty_file", name, "the file has zero bytes")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DecodeError("not_image", name, "OpenCV could not decode it as PNG/JPEG")
    if image.dtype not in (np.uint8, np.uint16):
        raise DecodeError("decode_error", name, f"unsupported sample type {image.dtype}")
    scale = float(np.iinfo(image.dtype).max)
    photometric = "MONOCHROME2"
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 3:
        if colour == "reject":
            raise DecodeError("colour", name, f"{image.shape[2]}-channel image (policy reject)")
        if colour != "convert":
            raise ValueError(f"colour policy must be 'convert' or 'reject', got {colour!r}")
        # OpenCV returns BGR(A); reorder to RGB before the luma weights.
        image = rgb_to_luminance(image[..., 2::-1])
        photometric = "RGB"
    pixels = np.clip(image.astype(np.float32) / scale, 0.0, 1.0)
    metadata = empty_metadata(source, pixels.shape[0], pixels.shape[1])
    metadata["photometric"] = photometric
    metadata["bits_stored"] = 16 if scale > 255 else 8
    metadata["windowing"] = "as_stored"
    return DecodedImage(pixels=pixels, metadata=metadata)


def resize_shorter_side(pixels: np.ndarray, size: int = 518) -> np.ndarray:
    """Resize a [H, W] image so its shorter side is `size`, keeping the aspect ratio.

    Downscaling uses cv2.INTER_AREA (box averaging over the source footprint, i.e. an
    antialiasing filter, so fine rib/line-pair texture does not alias). Upscaling uses
    cv2.INTER_CUBIC, clipped back into the input range because cubic overshoots at edges.
    RAD-DINO used SimpleITK B-spline resampling (recipe s8); both are smooth, antialiased
    resamplers and agree to well under one 8-bit grey level on radiographs.
    `size <= 0` returns the input unchanged.
    """
    if size <= 0:
        return pixels
    height, width = pixels.shape
    if min(height, width) == size:
        return pixels
    scale = size / min(height, width)
    if height <= width:
        new_height, new_width = size, max(1, round(width * scale))
    else:
        new_height, new_width = max(1, round(height * scale)), size
    source = np.ascontiguousarray(pixels, dtype=np.float32)
    if new_height * new_width < height * width:
        return cv2.resize(source, (new_width, new_height), interpolation=cv2.INTER_AREA)
    out = cv2.resize(source, (new_width, new_height), interpolation=cv2.INTER_CUBIC)
    return np.clip(out, float(source.min()), float(source.max()))


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label mask [h, w] -> [height, width] (labels preserved)."""
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def quantize(pixels01: np.ndarray, bits: int = 8) -> np.ndarray:
    """[0, 1] float -> uint8 (bits=8) or uint16 (bits=16), rounding to nearest."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    dtype = np.uint8 if bits == 8 else np.uint16
    max_value = float(np.iinfo(dtype).max)
    return np.rint(np.clip(pixels01, 0.0, 1.0) * max_value).astype(dtype)


def encode_png(image: np.ndarray) -> bytes:
    """Encode a uint8/uint16 [H, W] or [H, W, 1] array as a single-channel PNG."""
    if image.ndim == 3:
        image = image[..., 0]
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("cv2.imencode failed to write a PNG")
    return buffer.tobytes()


def to_png_bytes(pixels01: np.ndarray, bits: int = 8) -> bytes:
    """Quantise a [0, 1] float image [H, W] to `bits` and encode it as a 1-channel PNG."""
    return encode_png(quantize(pixels01, bits))


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes as stored in the records -> uint8/uint16 [H, W, 1] (dtype kept)."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError("not a decodable PNG")
    if image.ndim == 2:
        image = image[..., None]
    return image
