"""Conversion of one input file into a record (runs in the builder's worker processes).

Decode (`data.decode`), resize the shorter side (aspect kept), encode as a 1-channel PNG with
its metadata (schema: `data.records`), attach the mask and the CSV labels. A bad file becomes
a `ConvertResult.failure` with a machine-readable reason, never an exception.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import cv2
import numpy as np
from etils import epath

from raddino_jax.data import records
from raddino_jax.data.builder.inputs import InputItem
from raddino_jax.data.decode import decode_file
from raddino_jax.data.dicom import DecodePolicy
from raddino_jax.data.images import (
    DecodedImage,
    DecodeError,
    encode_png,
    resize_nearest,
    resize_shorter_side,
    to_png_bytes,
)

# Relative aspect-ratio mismatch above which a mask is judged not to belong to its image.
MASK_ASPECT_TOLERANCE = 0.02


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """What a worker needs to turn an InputItem into a record (picklable for spawn)."""

    size: int
    bits: int
    policy: DecodePolicy
    with_mask: bool


@dataclasses.dataclass
class ConvertResult:
    """A worker's answer: either `example` + `pixel_hash`, or `failure` {path, reason, message}."""

    item: InputItem
    example: dict[str, Any] | None = None
    pixel_hash: str = ""
    failure: dict[str, str] | None = None


def pixel_hash(pixels: np.ndarray) -> str:
    """SHA-256 of the decoded full-resolution pixels and their shape (duplicate detection)."""
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
    return digest.hexdigest()


def load_mask(path: str, image_shape: tuple[int, int], out_shape: tuple[int, int]) -> np.ndarray:
    """Read a mask PNG and resize it (nearest) to `out_shape` -> uint8 [H, W, 1].

    uint8 masks keep their values (binary 0/255 or class labels); deeper masks become 0/255.
    Raises DecodeError('mask_error') if unreadable or its aspect differs from the image's.
    """
    try:
        data = epath.Path(path).read_bytes()
    except OSError as error:
        raise DecodeError("mask_error", path, f"cannot read the mask ({error})") from error
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DecodeError("mask_error", path, "the mask is not a decodable image")
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.dtype != np.uint8:
        mask = np.where(mask > 0, 255, 0).astype(np.uint8)
    image_aspect = image_shape[1] / image_shape[0]
    mask_aspect = mask.shape[1] / mask.shape[0]
    if abs(mask_aspect / image_aspect - 1.0) > MASK_ASPECT_TOLERANCE:
        raise DecodeError(
            "mask_error", path, f"mask shape {mask.shape} does not fit image {image_shape}"
        )
    return resize_nearest(mask, *out_shape)[..., None]


def _labelled_example(
    item: InputItem, decoded: DecodedImage, options: ConvertOptions
) -> dict[str, Any]:
    """The feature dict of one converted item (image, mask, metadata, labels)."""
    resized = resize_shorter_side(decoded.pixels, options.size)
    example = records.metadata_to_features(decoded.metadata, item.record_path)
    if item.patient_id:
        example["patient_id"] = item.patient_id
    example["image"] = to_png_bytes(resized, options.bits)
    if options.with_mask:
        if item.mask_path:
            mask = load_mask(item.mask_path, decoded.pixels.shape, resized.shape)
        else:
            mask = np.zeros((*resized.shape, 1), np.uint8)
        example["mask"] = encode_png(mask)
    for column, value in item.labels:
        example[column] = value
    return example


def convert_item(task: tuple[InputItem, ConvertOptions]) -> ConvertResult:
    """Decode, resize and encode one file; never raises for a bad file (pool worker)."""
    item, options = task
    try:
        decoded = decode_file(item.path, options.policy)
        example = _labelled_example(item, decoded, options)
    except Exception as error:  # noqa: BLE001 - one bad file must not stop the build
        if isinstance(error, DecodeError):
            reason, message = error.reason, error.message
        elif isinstance(error, FileNotFoundError):
            reason, message = "decode_error", str(error)
        else:
            reason = "decode_error"
            message = f"{item.path}: decode_error: {type(error).__name__}: {error}"
        failure = {"path": item.record_path, "reason": reason, "message": message}
        return ConvertResult(item=item, failure=failure)
    return ConvertResult(item=item, example=example, pixel_hash=pixel_hash(decoded.pixels))
