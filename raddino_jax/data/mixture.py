"""The record stream: one source, or several mixed in proportion to their weights.

Position k of the stream is a pure function of (seed, k), so a stream can be resumed, sharded
over processes or continued at a later stage from any position. One source is shuffled and
repeated forever (Grain folds the epoch into the shuffle seed: every epoch is a new
permutation); a ``Mixture`` (``config.data.sources``) does that per source, tags each record
with its source's index (``SOURCE_FIELD``), interleaves the sources by their weights and
window-shuffles the result (``mixed_stream``). Nothing here decodes, crops or masks:
``data/sources.py`` builds mixtures with this module alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np

# Stream identifiers mixed into the user seed so the random ops are independent (the crop and
# mask streams of data/pipeline.py are 1 and 2).
SOURCE_SHUFFLE_STREAM = 3  # one shuffle per mixture source
MIX_STREAM = 4  # the window shuffle of the mixed stream

# Positions of the mixed stream permuted together. Every window holds the sources in the
# mixture's exact proportions (up to rounding); a window much larger than the interleaving
# period spreads each source evenly over processes and devices.
MIX_WINDOW = 1024

# The record field a mixture adds: the index of the source the record came from (a record of a
# single source has none and counts as source 0).
SOURCE_FIELD = "source_id"


class RandomAccessSource(Protocol):
    """What the pipeline reads: ``len(source)`` and ``source[i] -> {"image": ..., ...}``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


def derive_seed(*words: int) -> int:
    """A 32-bit seed (Grain's range) derived from a tuple of non-negative ints."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint32)[0])


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
        exactly keeps Grain's rescaling the identity)."""
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


class TagSource(grain.transforms.Map):
    """Record -> the record with ``SOURCE_FIELD``: the index of its mixture source.

    A module-level class (not a lambda) so Grain's worker processes can unpickle it."""

    def __init__(self, index: int):
        self.index = index

    def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return {**record, SOURCE_FIELD: self.index}


def shuffled_stream(source: RandomAccessSource, seed: int) -> grain.MapDataset:
    """Infinite stream of records, a fresh seeded permutation of the source every epoch."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return grain.MapDataset.source(source).shuffle(seed=seed).repeat()


def mixed_stream(mixture: Mixture, seed: int) -> grain.MapDataset:
    """Infinite stream of records from every source of the mixture in its proportions, each
    tagged with its source's index (``SOURCE_FIELD``).

    Each source is a ``shuffled_stream`` with its own sub-seed; ``grain.MapDataset.mix``
    interleaves them deterministically, and a window shuffle removes the interleaving's period.
    Grain seeds window w with seed + w (32-bit): keeping the base below 2**31 leaves room for
    2**31 windows (2e12 positions).
    """
    streams = [
        shuffled_stream(source, derive_seed(seed, SOURCE_SHUFFLE_STREAM, i)).map(TagSource(i))
        for i, source in enumerate(mixture.sources)
    ]
    return grain.experimental.WindowShuffleMapDataset(
        grain.MapDataset.mix(streams, weights=mixture.proportions),
        window_size=MIX_WINDOW,
        seed=derive_seed(seed, MIX_STREAM) % 2**31,
    )


def record_stream(source: RandomAccessSource | Mixture, seed: int) -> grain.MapDataset:
    """The infinite record stream of one source or of a mixture."""
    if isinstance(source, Mixture):
        return mixed_stream(source, seed)
    return shuffled_stream(source, seed)
