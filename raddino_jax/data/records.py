"""The record schema of the prepared radiograph datasets, and random access to them.

One place defines the features a record holds (`build_features`) and how a `DecodedImage`'s
metadata becomes feature values (`metadata_to_features`). `open_split` returns a
`tfds.data_source` (ArrayRecord random access, no TensorFlow needed) that the Grain pipeline
can index directly.

Feature values as read back through `open_split` (TensorFlow is not required):
  image, mask: encoded PNG `bytes` by default (tfds.decode.SkipDecoding); decode them with
    `data.images.decode_png` (cv2, keeps uint16). With `decode_images=True` they come back as
    uint8/uint16 numpy arrays [H, W, 1], decoded by tfds with OpenCV.
  Text features: `bytes` (UTF-8). Scalars: Python int / float (the schema's dtypes are in
    `source.dataset_info.features`).
Unknown values: '' for text, -1 for age and pixel spacing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

DATASET_VERSION = "1.0.0"

TEXT_FEATURES = (
    "path",
    "patient_id",
    "sex",
    "view_position",
    "body_part",
    "modality",
    "manufacturer",
    "source",
    "photometric",
    "transfer_syntax",
    "windowing",
)
FLOAT_FEATURES = ("age_years", "pixel_spacing_row_mm", "pixel_spacing_col_mm")
INT_FEATURES = ("orig_height", "orig_width", "bits_stored", "num_frames")
RESERVED_FEATURES = ("image", "mask", *TEXT_FEATURES, *FLOAT_FEATURES, *INT_FEATURES)

# CSV label column type (see builder.inputs.infer_label_type) -> its tfds feature.
_LABEL_FEATURES = {
    "int": lambda: tfds.features.Scalar(dtype=np.int64),
    "float": lambda: tfds.features.Scalar(dtype=np.float32),
    "text": tfds.features.Text,
}
UNKNOWN_NUMBER = -1.0


def image_feature(bits: int) -> tfds.features.Image:
    """A single-channel PNG image feature of uint8 (bits=8) or uint16 (bits=16)."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    dtype = np.uint8 if bits == 8 else np.uint16
    return tfds.features.Image(shape=(None, None, 1), dtype=dtype, encoding_format="png")


def build_features(
    bits: int = 8,
    label_types: Mapping[str, str] | None = None,
    with_mask: bool = False,
) -> tfds.features.FeaturesDict:
    """The FeaturesDict of one dataset.

    Args:
      bits: 8 or 16, the stored image depth.
      label_types: CSV label column -> "int" (int64), "float" (float32) or "text".
      with_mask: add a uint8 `mask` PNG feature of the same size as `image`.
    Returns:
      FeaturesDict with `image` [None, None, 1], `path`, the metadata scalars and the labels.
    """
    features: dict[str, tfds.features.FeatureConnector] = {"image": image_feature(bits)}
    if with_mask:
        features["mask"] = image_feature(8)
    features.update({name: tfds.features.Text() for name in TEXT_FEATURES})
    features.update({name: tfds.features.Scalar(dtype=np.float32) for name in FLOAT_FEATURES})
    features.update({name: tfds.features.Scalar(dtype=np.int32) for name in INT_FEATURES})
    for name, kind in (label_types or {}).items():
        if name in RESERVED_FEATURES:
            raise ValueError(f"label column {name!r} clashes with a built-in feature")
        if kind not in _LABEL_FEATURES:
            raise ValueError(f"label type must be one of {tuple(_LABEL_FEATURES)}, got {kind!r}")
        features[name] = _LABEL_FEATURES[kind]()
    return tfds.features.FeaturesDict(features)


def _number_or_unknown(value: float | None) -> np.float32:
    if value is None or not math.isfinite(float(value)):
        return np.float32(UNKNOWN_NUMBER)
    return np.float32(value)


def metadata_to_features(metadata: Mapping[str, Any], path: str) -> dict[str, Any]:
    """Feature values of the non-image, non-label fields from a DecodedImage.metadata dict.

    NaN/unknown age -> -1; missing/invalid spacing -> (-1, -1); None text -> ''.
    """
    spacing = metadata.get("pixel_spacing_mm") or (None, None)
    values: dict[str, Any] = {name: str(metadata.get(name) or "") for name in TEXT_FEATURES}
    values["path"] = path
    values["age_years"] = _number_or_unknown(metadata.get("age_years"))
    values["pixel_spacing_row_mm"] = _number_or_unknown(spacing[0])
    values["pixel_spacing_col_mm"] = _number_or_unknown(spacing[1])
    for name in INT_FEATURES:
        values[name] = np.int32(metadata.get(name) or 0)
    return values


def split_dataset_path(path: str, what: str = "--data") -> tuple[str, str]:
    """"DATA_DIR/NAME" (as users write a built dataset on command lines and in configs) ->
    (DATA_DIR, NAME); a ValueError naming `what` when either part is missing."""
    data_dir, _, name = path.rstrip("/").rpartition("/")
    if not data_dir or not name:
        raise ValueError(f"{what}: {path!r} is not DATA_DIR/NAME")
    return data_dir, name


def dataset_dir(data_dir: epath.PathLike, name: str) -> epath.Path:
    """DATA_DIR/NAME/VERSION, where tfds writes the ArrayRecord shards and dataset_info.json."""
    return epath.Path(data_dir) / name / DATASET_VERSION


def open_split(data_dir: epath.PathLike, name: str, split: str, decode_images: bool = False) -> Any:
    """Random-access source over one split (len() and integer indexing), no TensorFlow needed.

    Args:
      data_dir: the builder's --output (local path or gs:// URL).
      name: the builder's --name.
      split: e.g. "train".
      decode_images: False (default) keeps `image`/`mask` as PNG bytes for the Grain pipeline
        to decode; True returns numpy arrays [H, W, 1] decoded by tfds (OpenCV).
    Returns:
      tfds ArrayRecord data source; each item is a dict of feature values.
    """
    builder = tfds.builder_from_directory(dataset_dir(data_dir, name))
    decoders = None
    if not decode_images:
        decoders = {
            key: tfds.decode.SkipDecoding()
            for key in ("image", "mask")
            if key in builder.info.features
        }
    return builder.as_data_source(split=split, decoders=decoders)


def dataset_contents(data_dir: epath.PathLike, name: str) -> tuple[set[str], set[str]]:
    """(feature names, split names) of a built dataset, from its dataset_info alone (no record
    is read)."""
    builder = tfds.builder_from_directory(dataset_dir(data_dir, name))
    return set(builder.info.features.keys()), set(builder.info.splits.keys())
