"""Grain input pipeline: records -> multi-crop host batches with iBOT masks -> global jax.Arrays.

The pipeline (recipe s5, s7), built on ``grain.MapDataset`` so that every element is a pure
function of (seed, position) and the iterator state is a single index:

1. ``shuffle(seed)`` over the whole source, ``repeat()`` forever. Grain folds the epoch into
   the shuffle seed, so every epoch is a different, deterministic permutation. A ``Mixture``
   of several sources (``config.data.sources``) shuffles and repeats each source with its own
   sub-seed, interleaves them with ``grain.MapDataset.mix`` in proportion to the weights, and
   window-shuffles the result (``MIX_WINDOW`` positions) so that Grain's periodic interleaving
   pattern does not line up with the per-process stride of step 3.
2. ``random_map`` decode (PNG bytes or an already decoded array) + multi-crop. Its rng is keyed
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
6. ``to_iter_dataset`` and, optionally, ``mp_prefetch`` worker processes.

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

Record metadata other than ``image`` is dropped. Keep this module importable without side
effects: Grain worker processes re-import it and unpickle the transforms below.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np

from raddino_jax.data import augment
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
    crops = record_stream(source, seed).random_map(
        DecodeAndMultiCrop(crop_cfg), seed=derive_seed(seed, _CROP_STREAM)
    )
    # A later stage's masks are drawn from their own stream (its batches count from 0 again).
    mask_words = (process_index, process_count) + ((start_position,) if start_position else ())
    batches = (
        shard(crops[start_position:], process_index, process_count)
        .batch(
            per_process_batch,
            drop_remainder=True,
            batch_fn=functools.partial(batch_crop_levels, cfg=crop_cfg),
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
            )
        )
    return dataset
