"""Grain input pipeline: records -> multi-crop host batches with iBOT masks -> global jax.Arrays.

The pipeline (recipe s5, s7), built on ``grain.MapDataset`` so that every element is a pure
function of (seed, position) and the iterator state is a single index:

1. ``shuffle(seed)`` over the whole source, ``repeat()`` forever. Grain folds the epoch into
   the shuffle seed, so every epoch is a different, deterministic permutation. A ``Mixture``
   of several sources (``config.data.sources``) shuffles and repeats each source with its own
   sub-seed, interleaves them with ``grain.MapDataset.mix`` in proportion to the weights, and
   window-shuffles the result (``MIX_WINDOW`` positions) so that Grain's periodic interleaving
   pattern does not line up with the per-process stride of step 3.
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
``DevicePrefetcher``, which keeps the next ones on the devices while a step runs).

Host batch layout (``Bp`` = per_process_batch, ``n_groups = Bp / mask_group_size``, ``b`` =
mask_group_size, ``N = (G // patch)**2``, ``U = mask_upper_bound(2b, N)``):

- ``global_crops`` [2, Bp, G, G, 1]; ``local_crops`` [n_local, Bp, L, L, 1], in the transfer
  dtype: uint8 (default) or uint16 pixel levels, normalised on the device at the start of the
  jitted step (``train.step.normalise_crops``: ``(x / 255 or 65535 - mean) / std``), or float32
  already normalised on the host
- ``masks`` bool [2, Bp, N]
- ``mask_indices`` int32 [n_groups, U]: flat ``crop * N + patch`` into the group's
  [2, b, N] tokens (crop = k * b + i for global crop k of the group's image i)
- ``mask_weights`` float32 [n_groups, U]; ``mask_valid`` bool [n_groups, U]
- ``records_skipped`` int64 scalar, only with ``make_dataset(count_skipped=True)`` (the
  loop): records of this batch's positions that did not decode; host-side only
  (``prefetch.DevicePrefetcher`` takes it out and counts it)

Record metadata other than ``image`` is dropped. Keep this module importable without side
effects: Grain worker processes re-import it and unpickle the transforms below.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import cv2
import grain
import jax
import numpy as np

from raddino_jax.data import augment
from raddino_jax.data.layout import RECORDS_SKIPPED
from raddino_jax.data.png import decode_image
from raddino_jax.ssl import masking

# Stream identifiers mixed into the user seed so the pipeline's random ops are independent.
_CROP_STREAM = 1
_MASK_STREAM = 2
_SOURCE_SHUFFLE_STREAM = 3  # one shuffle per mixture source
_MIX_STREAM = 4  # the window shuffle of the mixed stream

# Positions of the mixed stream permuted together. Every window holds the sources in the
# mixture's exact proportions (up to rounding); a window much larger than the interleaving
# period spreads each source evenly over processes and devices.
MIX_WINDOW = 1024


class RandomAccessSource(Protocol):
    """What the pipeline reads: ``len(source)`` and ``source[i] -> {"image": ..., ...}``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


def derive_seed(*words: int) -> int:
    """A 32-bit seed (Grain's range) derived from a tuple of non-negative ints."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint32)[0])


class DecodeAndMultiCrop(grain.transforms.RandomMap):
    """Record -> ``augment.MultiCropLevels``: integer crops + their last integer tables.

    The tables are left to the batch function (:func:`batch_crop_levels`), which writes every
    crop through its table straight into the crop-major batch arrays: the per-image finished
    crops are never materialised and there is no stacking copy.
    """

    def __init__(self, crop_cfg: augment.MultiCropConfig):
        self.crop_cfg = crop_cfg

    def random_map(
        self, element: Mapping[str, Any], rng: np.random.Generator
    ) -> augment.MultiCropLevels:
        image = decode_image(element["image"])
        return augment.multi_crop_levels(image, rng, self.crop_cfg)


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
    """Position k of a record stream -> {"image": [H, W] array, "records_skipped": 0 or 1}.

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
            image = checked_image(self._parent[index + offset])
            if image is not None:
                return {"image": image, "records_skipped": int(offset > 0)}
        raise BadDataError(
            f"stream positions {index}..{index + MAX_CONSECUTIVE_BAD}: no record decodes to a "
            "[H, W] uint8/uint16 image; the dataset is damaged or not a raddino_jax build "
            "(rebuild it with `python -m data_prep.build`)"
        )


class CountedMultiCrop(grain.transforms.RandomMap):
    """``DecodeAndMultiCrop`` of a ``DecodedStream`` element, with its skip count:
    (``augment.MultiCropLevels``, records_skipped). The same draws from ``rng`` as
    ``DecodeAndMultiCrop``, so an image's crops do not depend on the count."""

    def __init__(self, crop_cfg: augment.MultiCropConfig):
        self.crop = DecodeAndMultiCrop(crop_cfg)

    def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> tuple:
        return self.crop.random_map(element, rng), element["records_skipped"]


def batch_counted_crops(
    samples: Sequence[tuple], cfg: augment.MultiCropConfig, count: bool
) -> dict[str, np.ndarray]:
    """``batch_crop_levels`` of ``CountedMultiCrop`` outputs, plus (``count``) the batch's
    ``records_skipped``."""
    batch = batch_crop_levels([levels for levels, _ in samples], cfg)
    if count:
        batch[RECORDS_SKIPPED] = np.int64(sum(skipped for _, skipped in samples))
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


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static shapes of the iBOT masks of one host batch."""

    per_process_batch: int
    mask_group_size: int
    grid_hw: tuple[int, int]
    mask_ratio_min_max: tuple[float, float]
    mask_sample_probability: float

    @property
    def n_groups(self) -> int:
        return self.per_process_batch // self.mask_group_size

    @property
    def n_tokens(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def upper_bound(self) -> int:
        """U, the static masked-token buffer per group (recipe s7)."""
        return masking.mask_upper_bound(
            2 * self.mask_group_size,
            self.n_tokens,
            self.mask_ratio_min_max,
            self.mask_sample_probability,
        )


class AddIbotMasks(grain.transforms.RandomMap):
    """Adds masks / mask_indices / mask_weights / mask_valid to a crop-major host batch."""

    def __init__(self, spec: MaskSpec):
        self.spec = spec

    def random_map(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
        spec = self.spec
        b, upper = spec.mask_group_size, spec.upper_bound
        masks = np.zeros((2, spec.per_process_batch, spec.n_tokens), dtype=bool)
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


def shuffled_stream(source: RandomAccessSource, seed: int) -> grain.MapDataset:
    """Infinite stream of records, a fresh seeded permutation of the source every epoch."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return grain.MapDataset.source(source).shuffle(seed=seed).repeat()


@dataclasses.dataclass(frozen=True, eq=False)
class Mixture:
    """Several record sources streamed as one weighted mixture (``config.data.sources``).

    ``weights`` are positive numbers (any scale); ``mixture_weights`` turns "proportional"
    into the sources' sizes. Grain mixes integer proportions: the weights are rounded to
    integers whose smallest is 100 (``proportions``), so the realised shares are exact to
    about 1% of the smallest weight.
    """

    sources: tuple[RandomAccessSource, ...]
    weights: tuple[float, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        if not self.sources or len(self.sources) != len(self.weights):
            raise ValueError(
                f"a mixture needs one weight per source, got {len(self.sources)} sources and "
                f"{len(self.weights)} weights"
            )
        if len(self.names) != len(self.sources):
            raise ValueError(f"a mixture needs one name per source, got {self.names}")
        if not all(float(w) > 0 for w in self.weights):
            raise ValueError(f"mixture weights must be > 0, got {self.weights}")
        for name, source in zip(self.names, self.sources, strict=True):
            if len(source) == 0:
                raise ValueError(f"mixture source {name!r} has no records")

    @property
    def proportions(self) -> tuple[int, ...]:
        """Integer weights with the smallest exactly 100 (Grain rescales to that; passing it
        exactly keeps Grain's rescaling the identity, so ``source_counts`` is exact)."""
        smallest = min(float(w) for w in self.weights)
        return tuple(max(100, round(100 * float(w) / smallest)) for w in self.weights)

    @property
    def shares(self) -> np.ndarray:
        """The fraction of the stream each source supplies, float64 [n_sources]."""
        proportions = np.asarray(self.proportions, np.float64)
        return proportions / proportions.sum()


def mixture_weights(sizes: Sequence[int], weights: Sequence[float | str]) -> tuple[float, ...]:
    """Explicit weights as given, or every weight "proportional": the sources' sizes."""
    if all(w == "proportional" for w in weights):
        return tuple(float(n) for n in sizes)
    if any(isinstance(w, str) for w in weights):
        raise ValueError(
            f"weights must all be numbers or all be 'proportional', got {tuple(weights)}"
        )
    return tuple(float(w) for w in weights)


def _window_shuffled(mixed: grain.MapDataset, seed: int) -> grain.MapDataset:
    # Grain seeds window w with seed + w (32-bit): keeping the base below 2**31 leaves room for
    # 2**31 windows (2e12 positions).
    return grain.experimental.WindowShuffleMapDataset(
        mixed, window_size=MIX_WINDOW, seed=derive_seed(seed, _MIX_STREAM) % 2**31
    )


def mixed_stream(mixture: Mixture, seed: int) -> grain.MapDataset:
    """Infinite stream of records from every source of the mixture in its proportions.

    Each source is a ``shuffled_stream`` with its own sub-seed; ``grain.MapDataset.mix``
    interleaves them deterministically, and a window shuffle removes the interleaving's period.
    Position k is a pure function of (seed, k), like the single-source stream.
    """
    streams = [
        shuffled_stream(source, derive_seed(seed, _SOURCE_SHUFFLE_STREAM, i))
        for i, source in enumerate(mixture.sources)
    ]
    return _window_shuffled(grain.MapDataset.mix(streams, weights=mixture.proportions), seed)


def record_stream(source: RandomAccessSource | Mixture, seed: int) -> grain.MapDataset:
    """The infinite record stream of one source or of a mixture."""
    if isinstance(source, Mixture):
        return mixed_stream(source, seed)
    return shuffled_stream(source, seed)


def _interleaved_counts(n_positions: int, proportions: Sequence[int]) -> list[int]:
    """Elements of each source among the first ``n_positions`` of ``MapDataset.mix``.

    Grain's interleaving is hierarchical: source 0 takes the positions where
    ``floor(k * (R - p0) / R)`` does not advance, the rest go to sources 1.. in the same way
    with ``R - p0``. ``tests/test_pipeline.py`` checks this against the mixed stream itself.
    """
    counts, remaining, total = [], int(n_positions), sum(proportions)
    for p in proportions:
        rest = remaining * (total - p) // total
        counts.append(remaining - rest)
        remaining, total = rest, total - p
    return counts


def source_counts(mixture: Mixture, seed: int, n_positions: int) -> np.ndarray:
    """Images each source supplied to the first ``n_positions`` positions of ``mixed_stream``,
    int64 [n_sources]: what the loop logs as ``images_seen/<name>``.

    Whole windows hold exactly the interleaving's counts (the window shuffle only permutes
    them); the last, partial window is read from a stream of source ids built like
    ``mixed_stream``, so no record is read.
    """
    proportions = mixture.proportions
    full = n_positions // MIX_WINDOW * MIX_WINDOW
    counts = np.asarray(_interleaved_counts(full, proportions), np.int64)
    if full < n_positions:
        ids = grain.MapDataset.mix(
            [grain.MapDataset.source([i]).repeat() for i in range(len(proportions))],
            weights=proportions,
        )
        ids = _window_shuffled(ids, seed)
        for position in range(full, n_positions):
            counts[ids[position]] += 1
    return counts


def shard(dataset: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
    """This process's disjoint share: positions process_index, +process_count, ..."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} for process_count={process_count}")
    return dataset[process_index::process_count]


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Defaults to this JAX process's (index, count)."""
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    return process_index, process_count


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
    count_skipped: bool = False,
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
      count_skipped: add each batch's ``records_skipped`` (undecodable records passed over,
        ``DecodedStream``) to the host batch; the loop counts them.

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
    process_index, process_count = _process_layout(process_index, process_count)
    grid = crop_cfg.global_size // patch_size
    spec = MaskSpec(
        per_process_batch=per_process_batch,
        mask_group_size=mask_group_size,
        grid_hw=(grid, grid),
        mask_ratio_min_max=tuple(mask_ratio_min_max),
        mask_sample_probability=mask_sample_probability,
    )
    if start_position < 0:
        raise ValueError(f"start_position must be >= 0, got {start_position}")
    crops = DecodedStream(record_stream(source, seed)).random_map(
        CountedMultiCrop(crop_cfg), seed=derive_seed(seed, _CROP_STREAM)
    )
    # A later stage's masks are drawn from their own stream (its batches count from 0 again).
    mask_words = (process_index, process_count) + ((start_position,) if start_position else ())
    batches = (
        shard(crops[start_position:], process_index, process_count)
        .batch(
            per_process_batch,
            drop_remainder=True,
            batch_fn=functools.partial(batch_counted_crops, cfg=crop_cfg, count=count_skipped),
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
