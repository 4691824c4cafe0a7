"""Writing the converted records as a tfds ArrayRecord dataset (no TensorFlow needed).

`RadiographBuilder` is a `GeneratorBasedBuilder` whose features and split generators are given
at run time; `BuildState` streams converted results into it in input order (dropping failures
and exact duplicates, counting per split), so the dataset is never held in memory.

Why a builder subclass and not `tfds.dataset_builders.store_as_tfds_dataset` (the adhoc
builder): in tfds 4.9 the adhoc builder imports TensorFlow to test whether each split is a
`tf.data.Dataset`, and it needs the `importlib_resources` backport; neither is installed here.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds
import tqdm

from raddino_jax.data import records
from raddino_jax.data.builder.convert import ConvertOptions, ConvertResult, convert_item
from raddino_jax.data.builder.inputs import InputItem


@dataclasses.dataclass(frozen=True)
class DatasetPlan:
    """The tfds dataset to write: where, its features, and each split's items in build order."""

    name: str
    data_dir: str
    description: str
    features: tfds.features.FeaturesDict
    splits: list[str]
    by_split: Mapping[str, list[InputItem]]


class RadiographBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder whose features and example generators are given at run time.

    It is never registered (the name comes from --name); readers open the written folder
    with tfds.builder_from_directory (records.open_split). Shuffling is disabled so records
    keep the input order; the Grain pipeline shuffles.
    """

    VERSION = tfds.core.Version(records.DATASET_VERSION)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No source file to ship: no checksums/README lookup next to the code.

        tfds 4.9.10 resolves the code path of builders defined inside a package through the
        optional `importlib_resources` backport; returning None (as for a notebook-defined
        builder) skips that without adding a dependency.
        """
        return None

    def __init__(
        self,
        *,
        plan: DatasetPlan,
        split_examples: Mapping[str, Callable[[], Iterator[tuple[int, dict[str, Any]]]]],
    ):
        self.name = plan.name
        self._plan = plan
        self._split_examples = split_examples
        super().__init__(data_dir=os.fspath(plan.data_dir), file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._plan.description,
            features=self._plan.features,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: make() for split, make in self._split_examples.items()}

    def _generate_examples(self):
        raise NotImplementedError("examples come from the split generators given at init")


@dataclasses.dataclass
class BuildOutcome:
    """What report.json needs from a finished build, whichever runner made it.

    Attributes:
      split_counts: records written per split.
      failures: {path, reason, message} per failed file, in build order.
      duplicates: {path, duplicate_of} per later occurrence of the same pixels, in build order.
      dropped: splits left out because no file in them converted.
    """

    split_counts: Mapping[str, int]
    failures: list[dict[str, str]]
    duplicates: list[dict[str, str]]
    dropped: list[str]


class BuildState:
    """Bookkeeping shared by the split generators: dedup table, failures, counts, progress."""

    def __init__(self, results: Callable[[list[InputItem]], Iterable[ConvertResult]], total: int):
        self._results = results
        self.first_by_hash: dict[str, str] = {}
        self.failures: list[dict[str, str]] = []
        self.duplicates: list[dict[str, str]] = []
        self.split_counts: collections.Counter[str] = collections.Counter()
        self.empty_split: str | None = None
        self.progress = tqdm.tqdm(total=total, desc="converting", unit="file")
        self._next_key = 0

    def _accepted(self, results: Iterable[ConvertResult]) -> Iterator[ConvertResult]:
        """Record failures and duplicates; pass on the first occurrence of good images."""
        for result in results:
            self.progress.update(1)
            if result.failure is not None:
                self.failures.append(result.failure)
                continue
            path = result.item.record_path
            first = self.first_by_hash.get(result.pixel_hash)
            if first is not None:
                self.duplicates.append({"path": path, "duplicate_of": first})
                continue
            self.first_by_hash[result.pixel_hash] = path
            yield result

    def outcome(self, dropped: list[str]) -> BuildOutcome:
        return BuildOutcome(dict(self.split_counts), self.failures, self.duplicates, dropped)

    def drain(self, items: list[InputItem]) -> None:
        """Process items of a split known to have no good image (failures/duplicates only)."""
        for result in self._accepted(self._results(items)):
            raise RuntimeError(f"{result.item.record_path} converted on a re-run but not before")

    def examples(
        self, split: str, items: list[InputItem], drain_first: list[InputItem]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield (key, example) for one split's items, after draining `drain_first`."""
        self.drain(drain_first)
        for result in self._accepted(self._results(items)):
            self.split_counts[split] += 1
            key, self._next_key = self._next_key, self._next_key + 1
            yield key, result.example
        if self.split_counts[split] == 0:
            self.empty_split = split  # tfds will refuse to finalise it


def result_stream(
    pool: Any, options: ConvertOptions
) -> Callable[[list[InputItem]], Iterable[ConvertResult]]:
    """Map convert_item over items, in order: on the pool if given, else in this process."""

    def results(items: list[InputItem]) -> Iterable[ConvertResult]:
        tasks = ((item, options) for item in items)
        if pool is None:
            return map(convert_item, tasks)
        return pool.imap(convert_item, tasks, chunksize=2)

    return results


def write_splits(plan: DatasetPlan, dropped: list[str], state: BuildState) -> None:
    """Run the tfds builder over the kept splits, in input order.

    Items of `dropped` splits are drained (failures/duplicates recorded) at their place in the
    order, so duplicate detection sees files in the same order as without dropping.
    """
    pending: list[InputItem] = []
    kept: dict[str, tuple[list[InputItem], list[InputItem]]] = {}
    for split in plan.splits:
        if split in dropped:
            pending.extend(plan.by_split[split])
        else:
            kept[split], pending = (plan.by_split[split], pending), []
    if kept:
        builder = RadiographBuilder(
            plan=plan,
            split_examples={
                split: functools.partial(state.examples, split, own, drain)
                for split, (own, drain) in kept.items()
            },
        )
        with tempfile.TemporaryDirectory() as download_dir:
            builder.download_and_prepare(download_dir=download_dir)
    state.drain(pending)
