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
from raddino_jax.data.builder.inputs import DEFAULT_SPLIT, InputItem, discover_inputs, split_order
from raddino_jax.data.builder.writer import (
    BuildOutcome,
    BuildState,
    DatasetPlan,
    result_stream,
    write_splits,
)
from raddino_jax.data.dicom import DecodePolicy

REPORT_NAME = "report.json"
RUNNERS = ("multiprocess", "beam")
# Options that change the produced records; a re-run compares these (not --workers).
RESULT_OPTIONS = (
    "input", "name", "size", "bits", "policy", "percentiles", "multiframe", "colour", "source"
)  # fmt: skip


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
    # "multiprocess" (a local process pool) or "beam" (an Apache Beam pipeline: needs the `beam`
    # extra; `beam_options` is its pipeline options as one shell-quoted string, e.g.
    # "--runner=DataflowRunner --project=P --region=R"). Same records and report either way.
    runner: str = "multiprocess"
    beam_options: str = ""

    def __post_init__(self):
        if self.runner not in RUNNERS:
            raise ValueError(f"BuildOptions.runner: {self.runner!r} is not one of {RUNNERS}")
        if self.beam_options and self.runner != "beam":
            raise ValueError("BuildOptions.beam_options is set but runner is not 'beam'")

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
    splits = split_order(items) or [DEFAULT_SPLIT]
    plan = DatasetPlan(
        name=options.name,
        data_dir=options.output,
        description=f"Radiographs converted from {options.input} by data_prep.build.",
        features=records.build_features(options.bits, label_types, with_mask),
        splits=splits,
        by_split={split: [item for item in items if item.split == split] for split in splits},
    )
    if options.runner == "beam":
        # Optional extra: only a Beam build imports Apache Beam.
        from raddino_jax.data.builder.beam import write_with_beam

        outcome = write_with_beam(plan, convert_options, options.beam_options, options.workers)
    else:
        outcome = _write_with_pool(options, plan, convert_options, len(items))

    report = make_report(options, items, ignored, outcome, label_types, with_mask)
    dataset_root.mkdir(parents=True, exist_ok=True)
    (dataset_root / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True))
    return report


def _write_with_pool(
    options: BuildOptions, plan: DatasetPlan, convert_options: ConvertOptions, total: int
) -> BuildOutcome:
    """The multiprocess build: convert on a spawn pool, stream in input order into tfds."""
    dataset_root = epath.Path(options.output) / options.name
    pool = None
    if options.workers > 1 and total > 1:
        pool = multiprocessing.get_context("spawn").Pool(options.workers)
    dropped: list[str] = []
    try:
        while True:
            state = BuildState(result_stream(pool, convert_options), total=total)
            try:
                write_splits(plan, dropped, state)
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
    return state.outcome(dropped)


def make_report(
    options: BuildOptions,
    items: Sequence[InputItem],
    ignored: Sequence[str],
    outcome: BuildOutcome,
    label_types: Mapping[str, str],
    with_mask: bool,
) -> dict[str, Any]:
    """The report dict; asserts found == converted + failed + duplicates."""
    converted = sum(outcome.split_counts.values())
    counts = {
        "found": len(items),
        "converted": converted,
        "failed": len(outcome.failures),
        "duplicates": len(outcome.duplicates),
    }
    assert counts["found"] == converted + counts["failed"] + counts["duplicates"], counts
    reasons = collections.Counter(failure["reason"] for failure in outcome.failures)
    splits = split_order(items) or [DEFAULT_SPLIT]
    return {
        "name": options.name,
        "counts": counts,
        "splits": {split: outcome.split_counts.get(split, 0) for split in split_order(items)},
        "failure_reasons": dict(sorted(reasons.items())),
        "failures": outcome.failures,
        "duplicates": outcome.duplicates,
        "ignored_files": list(ignored),
        "labels": dict(label_types),
        "with_mask": with_mask,
        "dropped_empty_splits": outcome.dropped,
        "dataset_written": len(outcome.dropped) < len(splits),
        "options": {
            "result": options.result_options(),
            "runner": options.runner,
            "workers": options.workers,
            "output": options.output,
        },
    }
