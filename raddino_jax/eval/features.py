"""Frozen features of a prepared dataset for the evaluations (recipe s10: the teacher backbone).

Three steps, each reusable on its own:
1. `load_split` reads one split of a built dataset (`data.records`): the images, resized
   (shorter side) and centre-cropped exactly like the exported preprocessor (`data.preprocess`),
   kept as uint8 [N, S, S] so that caching thousands of them is cheap, plus the non-image
   fields and, when the dataset has masks, the masks under the same geometry.
2. `make_uint8_feature_fn` is the jitted network: uint8 crops -> normalised float input
   (/255, mean, std, grey replicated to 3 channels) -> teacher backbone (`make_feature_fn`,
   also behind the `extract` CLI) -> features.
3. `extract_features` runs it over fixed-size batches (the last one padded, so one compile).

Labels: `encode_labels` turns record values (int, float or bytes) into class indices with -1 for
unknown (negative numbers, NaN and empty strings), so each evaluation can drop unknowns per label.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

from raddino_jax.checkpoint import Preprocessing
from raddino_jax.data.layout import normalise
from raddino_jax.data.preprocess import resize_and_centre_crop
from raddino_jax.models import ModelSpec, bind

SPLIT_ROLES = ("train", "val", "test")


# ------------------------------------------------------------------------------------------
# Images and masks
# ------------------------------------------------------------------------------------------


def to_uint8_image(image: np.ndarray) -> np.ndarray:
    """A stored record image (uint8 or uint16, [H, W] or [H, W, 1]) -> uint8 [H, W]."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., 0]
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        # Same rounding as data.preprocess.to_uint8 on the [0, 1] pixels.
        return np.clip(np.rint(image.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    raise TypeError(f"expected a uint8 or uint16 image, got {image.dtype}")


def crop_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W] -> uint8 [S, S]: the geometric half of the inference preprocessing.

    PIL bicubic resize of the shorter side to S, then centre crop (recipe s8). Normalising the
    result with `network_input` equals `data.preprocess.preprocess_uint8` (tested).
    """
    return resize_and_centre_crop(to_uint8_image(image), size)


def crop_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Lesion mask (0/255, [H, W] or [H, W, 1]) -> bool [S, S] under the image's geometry.

    Nearest-neighbour resize (labels stay binary) to the image's resized size, same centre crop.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    binary = (mask > 0).astype(np.uint8) * 255
    return resize_and_centre_crop(binary, size, Image.Resampling.NEAREST) > 0


def network_input(crops: jax.Array | np.ndarray, pre: Preprocessing) -> jax.Array:
    """uint8 [B, S, S] -> float32 [B, S, S, 3]: `layout.normalise` with the checkpoint's
    statistics, grey replicated to 3 channels."""
    pixels = normalise(jnp.asarray(crops), pre.mean, pre.std)
    return jnp.repeat(pixels[..., None], 3, axis=-1)


# ------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SplitData:
    """One split, preprocessed for an image size.

    Attributes:
      crops: uint8 [N, S, S] resized + centre-cropped images.
      fields: feature name -> numpy array [N] of the record's non-image values (bytes stay
        bytes, numbers numbers).
      masks: bool [N, S, S] lesion masks under the same geometry, or None without masks.
    """

    crops: np.ndarray
    fields: dict[str, np.ndarray]
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.crops)

    def subset(self, index: np.ndarray) -> SplitData:
        """The examples at `index` (an integer or boolean array)."""
        masks = None if self.masks is None else self.masks[index]
        return SplitData(self.crops[index], {k: v[index] for k, v in self.fields.items()}, masks)


def concatenate(parts: Sequence[SplitData]) -> SplitData:
    """Stack splits (same fields) along the example axis."""
    masks = None
    if all(p.masks is not None for p in parts):
        masks = np.concatenate([p.masks for p in parts])
    fields = {k: np.concatenate([p.fields[k] for p in parts]) for k in parts[0].fields}
    return SplitData(np.concatenate([p.crops for p in parts]), fields, masks)


def load_split(
    data_dir: epath.PathLike,
    name: str,
    split: str,
    image_size: int,
    *,
    max_examples: int | None = None,
    with_masks: bool = False,
) -> SplitData:
    """Read `split` of dataset DATA_DIR/NAME into memory (images cropped to `image_size`).

    Args:
      max_examples: keep only the first N records (records are stored in a fixed order).
      with_masks: also decode `mask` (error if the dataset has none).
    """
    from raddino_jax.data.images import decode_png
    from raddino_jax.data.records import open_split

    source = open_split(data_dir, name, split)
    count = len(source) if max_examples is None else min(len(source), max_examples)
    crops, masks, fields = [], [], {}
    for index in range(count):
        record = source[index]
        crops.append(crop_uint8(decode_png(record["image"]), image_size))
        if with_masks:
            if "mask" not in record:
                raise ValueError(f"{name}/{split} has no `mask` feature")
            masks.append(crop_mask(decode_png(record["mask"]), image_size))
        for key, value in record.items():
            if key not in ("image", "mask"):
                fields.setdefault(key, []).append(value)
    shape = (0, image_size, image_size)
    return SplitData(
        crops=np.stack(crops) if crops else np.zeros(shape, np.uint8),
        fields={k: _field_array(v) for k, v in fields.items()},
        masks=(np.stack(masks) if masks else np.zeros(shape, bool)) if with_masks else None,
    )


def _field_array(values: list[Any]) -> np.ndarray:
    """Record values -> a numpy array; bytes become an object array so b'' stays b''."""
    if values and isinstance(values[0], bytes | str):
        return np.asarray(values, dtype=object)
    return np.asarray(values)


def _is_unknown(value: Any) -> bool:
    if isinstance(value, bytes | str):
        return len(value.strip()) == 0
    value = float(value)
    return math.isnan(value) or value < 0


def encode_labels(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Record label values [N] -> (class index [N] int64 with -1 = unknown, class names).

    Unknown: empty text, NaN, or a negative number (data_prep stores -1 for unknown labels).
    Classes are the sorted distinct known values, so the encoding does not depend on order.
    """
    known = [v for v in values if not _is_unknown(v)]
    classes = sorted(set(known), key=lambda v: (str(type(v)), v))
    lookup = {v: i for i, v in enumerate(classes)}
    codes = np.array([-1 if _is_unknown(v) else lookup[v] for v in values], np.int64)
    names = [v.decode() if isinstance(v, bytes) else str(v) for v in classes]
    return codes, names


def group_ids(fields: dict[str, np.ndarray]) -> np.ndarray:
    """Grouping key per example for patient-level splits: patient_id, or the path when empty."""
    n = len(next(iter(fields.values())))
    patients = fields.get("patient_id", np.full(n, b"", dtype=object))
    paths = fields.get("path", np.asarray([str(i).encode() for i in range(n)], dtype=object))
    return np.asarray(
        [("p:" + p.decode()) if p else ("f:" + q.decode()) for p, q in zip(patients, paths)],
        dtype=object,
    )


def _group_count(fraction: float, n_groups: int) -> int:
    """round(fraction * n_groups), at least 1 for a positive fraction when >= 3 groups exist."""
    if fraction <= 0:
        return 0
    count = int(round(fraction * n_groups))
    return max(1, count) if n_groups >= 3 else count


def split_by_patient(
    groups: np.ndarray, fractions: tuple[float, float], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Carve two disjoint groups of patients (e.g. val and test) out of one split.

    Returns boolean masks (first, second) over the examples; every patient lands wholly in one of
    {first, second, rest}, so no patient leaks across them.
    """
    unique = np.asarray(sorted(set(groups)), dtype=object)
    order = unique[np.random.default_rng(seed).permutation(len(unique))]
    n_first, n_second = (_group_count(f, len(order)) for f in fractions)
    first = set(order[:n_first])
    second = set(order[n_first : n_first + n_second])
    return (
        np.asarray([g in first for g in groups]),
        np.asarray([g in second for g in groups]),
    )


# ------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------


def make_feature_fn(spec: ModelSpec, n_layers: int = 0):
    """Jitted (params, images [B, H, W, 3]) -> dict of float32 features of the backbone.

    Keys: `cls` [B, D] and `patch` [B, h, w, D] (normed outputs of the last block); with
    `n_layers` > 0 also `layers_cls` [B, n_layers, D] and `layers_patch` [B, n_layers, h, w, D]
    (normed outputs of the last n_layers blocks, like dinov2's get_intermediate_layers).
    """

    @jax.jit
    def features(params, images):
        backbone = bind(spec, params).backbone
        out = backbone(images, n_last_blocks=n_layers)
        batch, height, width = images.shape[:3]
        h, w = height // spec.backbone.patch_size, width // spec.backbone.patch_size
        result = {
            "cls": out["x_norm_clstoken"],
            "patch": out["x_norm_patchtokens"].reshape(batch, h, w, -1),
        }
        if n_layers:
            r = spec.backbone.num_register_tokens
            normed = [backbone.norm(layer) for layer in out["intermediates"]]
            result["layers_cls"] = jnp.stack([x[:, 0] for x in normed], axis=1)
            result["layers_patch"] = jnp.stack(
                [x[:, 1 + r :].reshape(batch, h, w, -1) for x in normed], axis=1
            )
        return jax.tree.map(lambda x: x.astype(jnp.float32), result)

    return features


def make_uint8_feature_fn(
    spec: ModelSpec, pre: Preprocessing, n_layers: int = 1, keep_patch: bool = False
):
    """Jitted (params, uint8 crops [B, S, S]) -> features (float32).

    Returns a dict with `cls` [B, D] (normed CLS, recipe s10), `patch_mean` [B, D] (mean of the
    last block's normed patch tokens), `layers_cls` [B, n_layers, D] (normed CLS of the last
    n_layers blocks, like get_intermediate_layers) and, with `keep_patch`, `patch` [B, h, w, D].
    """
    network = make_feature_fn(spec, max(1, n_layers))

    @jax.jit
    def features(params, crops):
        out = network(params, network_input(crops, pre))
        result = {
            "cls": out["cls"],
            "patch_mean": out["patch"].mean(axis=(1, 2)),
            "layers_cls": out["layers_cls"],
        }
        if keep_patch:
            result["patch"] = out["patch"]
        return result

    return features


def extract_features(
    feature_fn, params: Any, crops: np.ndarray, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Run `feature_fn` over uint8 `crops` [N, S, S] in batches of a fixed size.

    The last batch is zero-padded to `batch_size` (one compiled shape) and the padding dropped.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(crops), batch_size):
        batch = crops[start : start + batch_size]
        valid = len(batch)
        if valid < batch_size:
            pad = np.zeros((batch_size - valid, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        for key, value in feature_fn(params, batch).items():
            parts.setdefault(key, []).append(np.asarray(value)[:valid])
    return {key: np.concatenate(value) for key, value in parts.items()}


def probe_features(features: dict[str, np.ndarray], n_last_blocks: int, avgpool: bool):
    """Linear-probe input (recipe s10): concat of the last n CLS tokens [+ mean patch token].

    Returns float32 [N, n_last_blocks * D (+ D)].
    """
    layers = features["layers_cls"]
    if n_last_blocks > layers.shape[1]:
        raise ValueError(f"asked for {n_last_blocks} blocks, extracted {layers.shape[1]}")
    parts = [layers[:, -n_last_blocks:].reshape(len(layers), -1)]
    if avgpool:
        parts.append(features["patch_mean"])
    return np.concatenate(parts, axis=1).astype(np.float32)
