"""Grain input pipeline: records -> multi-crop host batches with iBOT masks -> global jax.Arrays.

The pipeline (recipe s5, s7), built on ``grain.MapDataset`` so that every element is a pure
function of (seed, position) and the iterator state is a single index:

1. The record stream (``data/mixture.py``): one source shuffled and repeated forever, or a
   ``Mixture`` of several, each record tagged with its source's index.
2. Decode (``DecodedStream``): a record whose image does not decode to a [H, W(, 1)] uint8 /
   uint16 array is skipped: its position takes the next record that decodes, and the batch
   counts it (``records_skipped``). A pure function of the position, so the skip is the same
   on every run, resume and process count.
   Then ``random_map`` multi-crop. Its rng is keyed
   by the *global* position in the shuffled stream, so an image's crops do not depend on how
   many processes share the work (Grain's maps are lazy: only this process's positions are
   ever computed).
3. Per-process shard ``[process_index::process_count]``: disjoint, and within an epoch whose
   length is a multiple of ``process_count`` together covering the source.
4. ``batch(per_process_batch, drop_remainder=True)`` into crop-major arrays (recipe s7): each
   crop's last integer table writes it straight into the batch arrays, in the transfer dtype
   (``config.data.transfer_dtype``).
5. Batch-level ``random_map`` adding iBOT masks, drawn per group of ``mask_group_size``
   consecutive images (the reference draws per device batch).
6. ``to_iter_dataset`` and, optionally, ``mp_prefetch`` worker processes, which exit when the
   process that started them dies (``exit_with_parent``).

The host batches become global ``jax.Array``s in ``data/prefetch.py`` (``to_global_batch``, and
``DevicePrefetcher``, which keeps the next ones on the devices while a step runs). A host batch
of ``Bp`` = per_process_batch images has the layout of ``data/layout.py`` (``batch_spec``), and
with ``make_dataset(host_counts=True)`` (the loop) its host-side counts: ``records_skipped``
and ``source_ids``.

Record metadata other than ``image`` (and a mixture's source id) is dropped. Keep this module
importable without side effects: Grain worker processes re-import it and unpickle the
transforms below.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import grain
import jax
import numpy as np

from raddino_jax.data import augment
from raddino_jax.data.layout import RECORDS_SKIPPED, SOURCE_IDS, MaskSpec
from raddino_jax.data.mixture import (
    SOURCE_FIELD,
    Mixture,
    RandomAccessSource,
    derive_seed,
    record_stream,
)
from raddino_jax.data.png import decode_image
from raddino_jax.ssl import masking

# Stream identifiers mixed into the user seed so the pipeline's random ops are independent (the
# record stream's are in data/mixture.py).
_CROP_STREAM = 1
_MASK_STREAM = 2


# Consecutive undecodable records one position may pass over before the stream is declared
# broken: past that the data, not a record, is at fault.
MAX_CONSECUTIVE_BAD = 64


class BadDataError(ValueError):
    """Too many records of the training stream do not decode (``config.data.max_bad_fraction``)."""


def checked_image(record: Mapping[str, Any]) -> np.ndarray | None:
    """The record's image as [H, W] uint8/uint16, or None when it does not decode to one."""
    try:
        image = decode_image(record["image"])
    except (ValueError, TypeError, KeyError, cv2.error):
        return None
    return image if image.size else None


class DecodedStream(grain.MapDataset):
    """Position k of a record stream -> {"image": [H, W] array, "records_skipped": 0 or 1,
    "source_id": the image's mixture source (0 for a single source)}.

    The record at k decoded (``checked_image``); when it does not decode, or decodes to another
    shape than [H, W(, 1)], it is skipped: position k takes the next record that decodes and
    counts 1 in ``records_skipped``, so the sum over positions is the number of bad records the
    stream passed. A pure function of k: the same skip on every run, resume and process count,
    and the positions (and so the images per step) stay those of the undamaged stream.
    """

    def __init__(self, parent: grain.MapDataset):
        super().__init__(parent)

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return "DecodedStream"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        for offset in range(MAX_CONSECUTIVE_BAD + 1):
            record = self._parent[index + offset]
            image = checked_image(record)
            if image is not None:
                return {
                    "image": image,
                    RECORDS_SKIPPED: int(offset > 0),
                    SOURCE_FIELD: record.get(SOURCE_FIELD, 0),
                }
        raise BadDataError(
            f"stream positions {index}..{index + MAX_CONSECUTIVE_BAD}: no record decodes to a "
            "[H, W] uint8/uint16 image; the dataset is damaged or not a raddino_jax build "
            "(rebuild it with `python -m data_prep.build`)"
        )


class MultiCrop(grain.transforms.RandomMap):
    """``DecodedStream`` element -> (``augment.MultiCropLevels``, records_skipped, source_id):
    integer crops + their last integer tables, and the element's host-side counts.

    The tables are left to the batch function (:func:`batch_crop_levels`), which writes every
    crop through its table straight into the crop-major batch arrays: the per-image finished
    crops are never materialised and there is no stacking copy.
    """

    def __init__(self, crop_cfg: augment.MultiCropConfig):
        self.crop_cfg = crop_cfg

    def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> tuple:
        levels = augment.multi_crop_levels(element["image"], rng, self.crop_cfg)
        return levels, element[RECORDS_SKIPPED], element[SOURCE_FIELD]


def batch_counted_crops(
    samples: Sequence[tuple], cfg: augment.MultiCropConfig, host_counts: bool
) -> dict[str, np.ndarray]:
    """``batch_crop_levels`` of ``MultiCrop`` outputs, plus (``host_counts``) the
    batch's ``records_skipped`` (int64 scalar) and ``source_ids`` (int32 [Bp])."""
    batch = batch_crop_levels([levels for levels, _, _ in samples], cfg)
    if host_counts:
        batch[RECORDS_SKIPPED] = np.int64(sum(skipped for _, skipped, _ in samples))
        batch[SOURCE_IDS] = np.array([source for _, _, source in samples], np.int32)
    return batch


def exit_with_parent(parent_pid: int, worker_index: int = 0, worker_count: int = 0) -> None:
    """Grain ``worker_init_fn``: the worker exits once ``parent_pid`` (the trainer) is gone.

    A trainer killed by SIGKILL (a timeout, the OOM killer) runs no clean-up, and Grain's
    workers would stay alive, holding CPU and their shared-memory batches in /dev/shm. A daemon
    thread checks every 0.2 s whether the worker was re-parented (the trainer died) and then
    ends the process at once; its shared memory is unlinked by the multiprocessing resource
    tracker when the last worker is gone. (A thread rather than ``PR_SET_PDEATHSIG``: that
    signal fires when the *thread* that started the worker ends, and Grain may start workers
    from the device-prefetch thread.)
    """
    del worker_index, worker_count

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def batch_crop_levels(
    samples: Sequence[augment.MultiCropLevels], cfg: augment.MultiCropConfig
) -> dict[str, np.ndarray]:
    """Batches per-image integer crops into crop-major arrays of ``cfg.transfer_dtype``.

    ``global_crops`` [2, B, G, G, 1] and ``local_crops`` [n_local, B, L, L, 1] (recipe s7):
    uint8 / uint16 pixel levels for the train step to normalise (uint8 images as uint16 are
    257 x their levels, the same normalised values), or for "float32" the normalised crops,
    the samples' ``multi_crop`` outputs stacked on axis 1. Each crop's
    table writes it straight into its slot of the preallocated batch. uint16 images with
    "uint8" raise ValueError: quantising them would silently drop levels.
    """
    transfer = np.dtype(cfg.transfer_dtype)
    if transfer == np.uint8 and any(s.global_levels.dtype == np.uint16 for s in samples):
        raise ValueError(
            'config.data.transfer_dtype: the records hold uint16 images, which "uint8" crops '
            'cannot carry without losing levels; set config.data.transfer_dtype="uint16" (or '
            '"float32")'
        )
    first = samples[0]
    batch = len(samples)
    global_crops = np.empty(
        (len(first.global_tables), batch, *first.global_levels.shape[1:], 1), transfer
    )
    local_crops = np.empty(
        (len(first.local_tables), batch, *first.local_levels.shape[1:], 1), transfer
    )
    finish = functools.partial(augment.apply_tables, mean=cfg.mean, std=cfg.std)
    for i, sample in enumerate(samples):
        finish(sample.global_levels, sample.global_tables, global_crops[:, i, ..., 0])
        finish(sample.local_levels, sample.local_tables, local_crops[:, i, ..., 0])
    return {"global_crops": global_crops, "local_crops": local_crops}


class AddIbotMasks(grain.transforms.RandomMap):
    """Adds masks / mask_indices / mask_weights / mask_valid to a crop-major host batch."""

    def __init__(self, spec: MaskSpec):
        self.spec = spec

    def random_map(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
        spec = self.spec
        b, upper = spec.mask_group_size, spec.upper_bound
        masks = np.zeros((2, spec.batch_size, spec.n_tokens), dtype=bool)
        indices = np.zeros((spec.n_groups, upper), dtype=np.int32)
        weights = np.zeros((spec.n_groups, upper), dtype=np.float32)
        valid = np.zeros((spec.n_groups, upper), dtype=bool)
        for g in range(spec.n_groups):
            group = masking.sample_ibot_masks(
                rng,
                2 * b,
                spec.grid_hw,
                spec.mask_ratio_min_max,
                spec.mask_sample_probability,
                upper_bound=upper,
            )
            # Group rows are crop-major [crop 1 of the b images; crop 2 of the b images].
            masks[:, g * b : (g + 1) * b] = group.masks.reshape(2, b, spec.n_tokens)
            indices[g], weights[g], valid[g] = group.indices, group.weights, group.valid
        return {
            **batch,
            "masks": masks,
            "mask_indices": indices,
            "mask_weights": weights,
            "mask_valid": valid,
        }


def shard(dataset: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
    """This process's disjoint share: positions process_index, +process_count, ..."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} for process_count={process_count}")
    return dataset[process_index::process_count]


def make_dataset(
    source: RandomAccessSource | Mixture,
    *,
    seed: int,
    per_process_batch: int,
    crop_cfg: augment.MultiCropConfig,
    mask_group_size: int,
    patch_size: int = 14,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 0,
    read_threads: int = 0,
    prefetch_buffer: int = 2,
    start_position: int = 0,
    host_counts: bool = False,
) -> grain.IterDataset:
    """The training input pipeline: an infinite, deterministic, resumable stream of host batches.

    Args:
      source: random-access records with an ``image`` (PNG bytes or [H, W(, 1)] uint8/uint16),
        or a ``Mixture`` of such sources.
      seed: pipeline seed in [0, 2**32); shuffle, crops and masks derive from it.
      per_process_batch: images per host batch, Bp.
      crop_cfg: multi-crop recipe; ``global_size`` must be a multiple of ``patch_size``; its
        ``transfer_dtype`` is the crop arrays' dtype.
      mask_group_size: images per mask draw (the per-device batch); must divide Bp.
      patch_size: ViT patch size; the mask grid is global_size // patch_size.
      mask_ratio_min_max, mask_sample_probability: iBOT masking (recipe s7).
      process_index, process_count: data-parallel layout; default jax.process_index()/count().
      num_workers: Grain worker processes (0: compute in this process).
      read_threads: threads per process computing batches (0: on demand in ``next``).
      prefetch_buffer: batches buffered per worker (and per process when read_threads > 0).
      start_position: global stream position of this dataset's first image: a resolution
        stage after the first continues the stream where the previous stage stopped
        (``train/stages.py``), its crops keyed by the same global positions.
      host_counts: add each batch's ``records_skipped`` (undecodable records passed over,
        ``DecodedStream``) and ``source_ids`` (each image's mixture source) to the host batch;
        the loop counts them (``train.metrics.StepLog``) and the prefetcher keeps them on the
        host.

    Returns:
      A ``grain.IterDataset`` of host batches (layout in the module docstring). Iterators
      support ``get_state`` / ``set_state`` and Orbax via ``grain.checkpoint.CheckpointSave``.
    """
    if per_process_batch <= 0 or mask_group_size <= 0 or per_process_batch % mask_group_size:
        raise ValueError(
            f"mask_group_size={mask_group_size} must divide per_process_batch={per_process_batch}"
        )
    if crop_cfg.global_size % patch_size:
        raise ValueError(f"global_size={crop_cfg.global_size} is not a multiple of {patch_size}")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    grid = crop_cfg.global_size // patch_size
    spec = MaskSpec(
        batch_size=per_process_batch,
        mask_group_size=mask_group_size,
        grid_hw=(grid, grid),
        mask_ratio_min_max=tuple(mask_ratio_min_max),
        mask_sample_probability=mask_sample_probability,
    )
    if start_position < 0:
        raise ValueError(f"start_position must be >= 0, got {start_position}")
    crops = DecodedStream(record_stream(source, seed)).random_map(
        MultiCrop(crop_cfg), seed=derive_seed(seed, _CROP_STREAM)
    )
    # A later stage's masks are drawn from their own stream (its batches count from 0 again).
    mask_words = (process_index, process_count) + ((start_position,) if start_position else ())
    batches = (
        shard(crops[start_position:], process_index, process_count)
        .batch(
            per_process_batch,
            drop_remainder=True,
            batch_fn=functools.partial(batch_counted_crops, cfg=crop_cfg, host_counts=host_counts),
        )
        .random_map(AddIbotMasks(spec), seed=derive_seed(seed, _MASK_STREAM, *mask_words))
    )
    read_options = grain.ReadOptions(
        num_threads=read_threads,
        prefetch_buffer_size=max(prefetch_buffer, read_threads) if read_threads else 0,
    )
    dataset = batches.to_iter_dataset(read_options)
    if num_workers > 0:
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=prefetch_buffer
            ),
            worker_init_fn=functools.partial(exit_with_parent, os.getpid()),
        )
    return dataset
