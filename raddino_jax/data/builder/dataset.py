"""The dataset build: options, the driver `build_dataset`, and report.json.

See the package docstring (`raddino_jax.data.builder`) for what a build does; the command line
is `python -m data_prep.build`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import multiprocessing
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from raddino_jax.data import records
from raddino_jax.data.builder.convert import ConvertOptions
from raddino_jax.data.builder.inputs import (
    DEFAULT_SPLIT,
    InputItem,
    discover_inputs,
    split_order,
)
from raddino_jax.data.builder.writer import BuildState, result_stream, write_splits
from raddino_jax.data.dicom import DecodePolicy

REPORT_NAME = "report.json"
# Options that change the produced records; a re-run compares these (not --workers).
RESULT_OPTIONS = (
    "input", "name", "size", "bits", "policy", "percentiles", "multiframe", "colour", "source",
)


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Options of one build; `RESULT_OPTIONS` of them must match for a re-run to be skipped."""

    input: str
    output: str
    name: str
    size: int = 518
    bits: int = 8
    workers: int = 1
    policy: str = "minmax"
    percentiles: tuple[float, float] = (0.5, 99.5)
    multiframe: str = "first"
    colour: str = "convert"
    source: str = ""
    overwrite: bool = False

    def decode_policy(self) -> DecodePolicy:
        return DecodePolicy(
            windowing=self.policy,
            percentiles=tuple(self.percentiles),
            multiframe=self.multiframe,
            colour=self.colour,
            source=self.source or self.name,
        )

    def result_options(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["percentiles"] = list(self.percentiles)
        return {key: values[key] for key in RESULT_OPTIONS}


def _existing_report(options: BuildOptions) -> dict[str, Any] | None:
    """The stored report if DATA_DIR/NAME holds a finished build, else None."""
    report_path = epath.Path(options.output) / options.name / REPORT_NAME
    info_path = records.dataset_dir(options.output, options.name) / "dataset_info.json"
    if not report_path.exists():
        return None
    report = json.loads(report_path.read_text())
    if report.get("dataset_written", True) and not info_path.exists():
        return None
    return report


def build_dataset(options: BuildOptions) -> dict[str, Any]:
    """Convert every input file and write the tfds dataset plus report.json.

    Returns:
      The report dict (also written to DATA_DIR/NAME/report.json).
    Raises:
      FileExistsError: a finished build with different options exists and overwrite is False.
    """
    dataset_root = epath.Path(options.output) / options.name
    existing = None if options.overwrite else _existing_report(options)
    if existing is not None:
        if existing.get("options", {}).get("result") == options.result_options():
            logging.info("%s is already built with these options; skipping", dataset_root)
            return existing
        raise FileExistsError(
            f"{dataset_root} was built with other options {existing.get('options')}; "
            "pass --overwrite to rebuild"
        )
    if dataset_root.exists():
        # --overwrite, or an unfinished build: start from a clean folder.
        dataset_root.rmtree()

    items, label_types, with_mask, ignored = discover_inputs(options.input)
    convert_options = ConvertOptions(
        size=options.size, bits=options.bits, policy=options.decode_policy(), with_mask=with_mask
    )
    features = records.build_features(options.bits, label_types, with_mask)
    splits = split_order(items) or [DEFAULT_SPLIT]
    by_split = {split: [item for item in items if item.split == split] for split in splits}

    description = f"Radiographs converted from {options.input} by data_prep.build."
    pool = None
    if options.workers > 1 and len(items) > 1:
        pool = multiprocessing.get_context("spawn").Pool(options.workers)
    dropped: list[str] = []
    try:
        while True:
            state = BuildState(result_stream(pool, convert_options), total=len(items))
            try:
                write_splits(
                    name=options.name,
                    data_dir=options.output,
                    description=description,
                    features=features,
                    splits=splits,
                    by_split=by_split,
                    dropped=dropped,
                    state=state,
                )
                break
            except AssertionError:
                # tfds cannot store a split with no example: drop it and convert again
                # (deterministic, so only that split changes); its failures stay reported.
                if state.empty_split is None or state.empty_split in dropped:
                    raise
                logging.warning("split %r has no valid image; dropping it", state.empty_split)
                dropped.append(state.empty_split)
                if dataset_root.exists():
                    dataset_root.rmtree()
            finally:
                state.progress.close()
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    report = make_report(options, items, ignored, state, label_types, with_mask)
    report["dropped_empty_splits"] = dropped
    report["dataset_written"] = len(dropped) < len(splits)
    dataset_root.mkdir(parents=True, exist_ok=True)
    (dataset_root / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True))
    return report


def make_report(
    options: BuildOptions,
    items: Sequence[InputItem],
    ignored: Sequence[str],
    state: BuildState,
    label_types: Mapping[str, str],
    with_mask: bool,
) -> dict[str, Any]:
    """The report dict; asserts found == converted + failed + duplicates."""
    converted = sum(state.split_counts.values())
    counts = {
        "found": len(items),
        "converted": converted,
        "failed": len(state.failures),
        "duplicates": len(state.duplicates),
    }
    assert counts["found"] == converted + counts["failed"] + counts["duplicates"], counts
    reasons = collections.Counter(failure["reason"] for failure in state.failures)
    return {
        "name": options.name,
        "counts": counts,
        "splits": {split: state.split_counts.get(split, 0) for split in split_order(items)},
        "failure_reasons": dict(sorted(reasons.items())),
        "failures": state.failures,
        "duplicates": state.duplicates,
        "ignored_files": list(ignored),
        "labels": dict(label_types),
        "with_mask": with_mask,
        "options": {
            "result": options.result_options(),
            "workers": options.workers,
            "output": options.output,
        },
    }
