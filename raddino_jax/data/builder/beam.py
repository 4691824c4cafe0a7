"""The dataset build as an Apache Beam pipeline (`python -m data_prep.build --runner=beam`).

Same conversion (`convert.convert_item`), same records, same report.json as the multiprocess
build; only where the work runs changes. Needs the optional `beam` extra
(`pip install -r requirements-beam.txt`); nothing else in the library imports Apache Beam.

The pipeline, inside tfds's own Beam support (`RadiographBuilder` hands tfds one PCollection of
(key, example) per split, and tfds's `BeamWriter` shards, orders and writes the ArrayRecord
files, then finalises dataset_info.json as in a local build):

  inputs.jsonl (written by the launcher: one line per file, with its position `order`)
    -> ReadFromText -> Reshuffle (spread the files over the workers)
    -> ConvertFn: decode + resize + PNG on the workers; failures to a tagged output
    -> (pixel hash, (order, path)) -> GroupByKey -> every occurrence after the first in input
       order is a duplicate (duplicates are found across workers, not per bundle)
    -> the duplicates' orders as a side input -> drop them -> one PCollection per split, keyed by
       `order`: tfds writes with shuffling disabled, so records keep the input order.
  failures, duplicates and per-split counts -> small JSON files next to the dataset, which the
  launcher reads into report.json once the pipeline has finished.

TensorFlow is not needed here either: tfds 4.9's Beam path writes ArrayRecord without it (tested
with tensorflow absent). gs:// works where the workers can reach it (without TensorFlow it needs
gcsfs); on a remote runner (Dataflow, Flink, Spark) --output must be a URL the workers share.
An empty split fails tfds's BeamWriter; it is then dropped and the pipeline rerun, as in the
multiprocess build.

Runners tested here: the FnApiRunner (what DirectRunner runs locally) in multi_processing mode
with 2 SDK worker processes, which is the default when --beam-options names no runner
(`pipeline_options`, --workers processes); and `--runner=DirectRunner`, which first tries to
download the Prism runner (offline: fails, falls back to an in-process FnApiRunner).
DataflowRunner is untested here (no network): give the workers this package, e.g. build a wheel
(`pip wheel --no-deps -w dist .`) and pass `--extra_packages=dist/raddino_jax-*.whl`, or a custom
container with `--sdk_container_image`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shlex
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import tensorflow_datasets as tfds
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from etils import epath

from raddino_jax.data.builder.convert import ConvertOptions, convert_item
from raddino_jax.data.builder.inputs import InputItem
from raddino_jax.data.builder.writer import BuildOutcome, DatasetPlan, RadiographBuilder

WORK_DIR = "_beam"  # under DATA_DIR/NAME while the pipeline runs; removed afterwards
# tfds's BeamWriter._check_num_examples message for a split without examples.
_EMPTY_SPLIT = re.compile(r"generated examples is 0 for split (\S+?)\. ")


class Converted(NamedTuple):
    """One accepted conversion on its way through the pipeline."""

    order: int  # position in the build order (splits in order, files in input order)
    split: str
    pixel_hash: str
    path: str  # the record's `path` feature
    example: dict[str, Any]


def pipeline_options(beam_options: str, workers: int) -> PipelineOptions:
    """Parse --beam-options (one shell-quoted string); without --runner, run locally on Beam's
    FnApiRunner with `workers` SDK worker processes (named explicitly because the DirectRunner
    first tries the Prism runner, a Go binary it downloads at run time)."""
    flags = shlex.split(beam_options)
    if PipelineOptions(flags).view_as(StandardOptions).runner is None:
        flags = [
            "--runner=FnApiRunner",
            "--direct_running_mode=multi_processing",
            f"--direct_num_workers={max(1, workers)}",
            *flags,
        ]
    return PipelineOptions(flags)


def _is_local(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    if not isinstance(runner, str):
        runner = type(runner).__name__
    return runner in StandardOptions.LOCAL_RUNNERS or runner.endswith("DirectRunner")


def _item_to_json(order: int, item: InputItem) -> str:
    # allow_nan: float labels keep NaN for blanks (Python's json reads it back).
    return json.dumps({"order": order, "item": dataclasses.asdict(item)})


def _item_from_json(line: str) -> tuple[int, InputItem]:
    record = json.loads(line)
    fields = record["item"]
    fields["labels"] = tuple((column, value) for column, value in fields["labels"])
    return record["order"], InputItem(**fields)


class ConvertFn(beam.DoFn):
    """convert_item on a worker: Converted on the main output, failures tagged 'failed'."""

    def __init__(self, options: ConvertOptions):
        self._options = options

    def process(self, order_item: tuple[int, InputItem]) -> Iterator[Any]:
        order, item = order_item
        result = convert_item((item, self._options))
        if result.failure is not None:
            beam.metrics.Metrics.counter("build", "failed").inc()
            yield beam.pvalue.TaggedOutput("failed", (order, result.failure))
            return
        beam.metrics.Metrics.counter("build", "converted").inc()
        yield Converted(order, item.split, result.pixel_hash, item.record_path, result.example)


def _later_occurrences(
    hash_group: tuple[str, Iterable[tuple[int, str]]],
) -> Iterator[tuple[int, dict[str, str]]]:
    """All but the first occurrence (in build order) of one pixel hash, as report entries."""
    _, occurrences = hash_group
    (_, first), *later = sorted(occurrences)
    for order, path in later:
        yield order, {"path": path, "duplicate_of": first}


def _write_sorted_json(entries: list[tuple[Any, Any]], path: str) -> None:
    """Write the values sorted by their key (build order) as a JSON list."""
    values = [value for _, value in sorted(entries, key=lambda entry: entry[0])]
    epath.Path(path).write_text(json.dumps(values))


def _write_counts(entries: list[tuple[str, int]], path: str) -> None:
    epath.Path(path).write_text(json.dumps(dict(entries)))


def conversion_graph(
    pipeline: beam.Pipeline,
    inputs_path: str,
    options: ConvertOptions,
    work_dir: str,
    kept_splits: Sequence[str],
) -> dict[str, beam.PCollection]:
    """Add the conversion to `pipeline`; -> {split: PCollection of (order, example)}.

    Side effect when the pipeline runs: failures.json, duplicates.json and split_counts.json in
    `work_dir`, each in build order.
    """
    results = (
        pipeline
        | "ReadInputs" >> beam.io.ReadFromText(inputs_path)
        | "ParseInputs" >> beam.Map(_item_from_json)
        | "SpreadOverWorkers" >> beam.Reshuffle()
        | "Convert" >> beam.ParDo(ConvertFn(options)).with_outputs("failed", main="converted")
    )
    converted, failed = results.converted, results.failed
    duplicates = (
        converted
        | "ByPixelHash" >> beam.Map(lambda c: (c.pixel_hash, (c.order, c.path)))
        | "GroupByPixelHash" >> beam.GroupByKey()
        | "LaterOccurrences" >> beam.FlatMap(_later_occurrences)
    )
    firsts = converted | "DropDuplicates" >> beam.Filter(
        lambda c, duplicate_orders: c.order not in duplicate_orders,
        duplicate_orders=beam.pvalue.AsDict(duplicates),
    )
    work = epath.Path(work_dir)
    for label, collection, name in (
        ("Failures", failed, "failures.json"),
        ("Duplicates", duplicates, "duplicates.json"),
    ):
        _ = (
            collection
            | f"Collect{label}" >> beam.combiners.ToList()
            | f"Write{label}" >> beam.Map(_write_sorted_json, path=str(work / name))
        )
    _ = (
        firsts
        | "SplitOf" >> beam.Map(lambda c: c.split)
        | "CountPerSplit" >> beam.combiners.Count.PerElement()
        | "CollectCounts" >> beam.combiners.ToList()
        | "WriteCounts" >> beam.Map(_write_counts, path=str(work / "split_counts.json"))
    )
    return {
        split: (
            firsts
            | f"Select_{split}" >> beam.Filter(lambda c, split: c.split == split, split=split)
            | f"Key_{split}" >> beam.Map(lambda c: (c.order, c.example))
        )
        for split in kept_splits
    }


class BeamRadiographBuilder(RadiographBuilder, skip_registration=True):
    """RadiographBuilder whose splits are PCollections of one shared Beam pipeline.

    tfds passes the pipeline to `_split_generators` when the method takes a `pipeline`
    argument; the conversion is built once there and every split selects its records from it
    (duplicates are found across splits, as in the multiprocess build).
    """

    def __init__(self, *, make_splits, **kwargs):
        self._make_splits = make_splits
        super().__init__(split_examples={}, **kwargs)

    def _split_generators(self, dl_manager, pipeline):
        del dl_manager
        return self._make_splits(pipeline)


def _read_outcome(work: epath.Path, dropped: list[str]) -> BuildOutcome:
    def read(name: str) -> Any:
        return json.loads((work / name).read_text())

    return BuildOutcome(
        split_counts=read("split_counts.json"),
        failures=read("failures.json"),
        duplicates=read("duplicates.json"),
        dropped=dropped,
    )


def write_with_beam(
    plan: DatasetPlan, convert_options: ConvertOptions, beam_options: str, workers: int
) -> BuildOutcome:
    """Run the conversion pipeline (through tfds) until no kept split is empty.

    Returns the outcome for report.json; the dataset is written under DATA_DIR/NAME.
    Raises:
      ValueError: a remote runner with a local --output (the workers could not write it).
    """
    options = pipeline_options(beam_options, workers)
    if not _is_local(options) and "://" not in plan.data_dir:
        raise ValueError(
            f"--output {plan.data_dir} is local but --beam-options runs on "
            f"{options.view_as(StandardOptions).runner}: give a location the workers can "
            "write, e.g. gs://BUCKET/tfds"
        )
    dataset_root = epath.Path(plan.data_dir) / plan.name
    work = dataset_root / WORK_DIR
    ordered = [item for split in plan.splits for item in plan.by_split[split]]
    dropped: list[str] = []
    while True:
        if dataset_root.exists():
            dataset_root.rmtree()
        work.mkdir(parents=True)
        (work / "inputs.jsonl").write_text(
            "".join(_item_to_json(order, item) + "\n" for order, item in enumerate(ordered))
        )
        kept = [split for split in plan.splits if split not in dropped]
        try:
            _run_once(plan, work, convert_options, kept, options)
            break
        except Exception as error:  # the runner wraps the worker's error in its own type
            empty = _EMPTY_SPLIT.search(str(error))
            if empty is None or empty.group(1) in dropped or empty.group(1) not in kept:
                raise
            logging.warning("split %r has no valid image; dropping it", empty.group(1))
            dropped.append(empty.group(1))
    outcome = _read_outcome(work, dropped)
    work.rmtree()
    return outcome


def _run_once(
    plan: DatasetPlan,
    work: epath.Path,
    convert_options: ConvertOptions,
    kept: list[str],
    options: PipelineOptions,
) -> None:
    """One pipeline run that writes the `kept` splits through tfds."""

    def make_splits(pipeline: beam.Pipeline) -> dict[str, beam.PCollection]:
        return conversion_graph(
            pipeline, str(work / "inputs.jsonl"), convert_options, str(work), kept
        )

    if not kept:
        # Nothing for tfds to write: run the conversion alone for the report.
        with beam.Pipeline(options=options) as pipeline:
            make_splits(pipeline)
        return
    builder = BeamRadiographBuilder(plan=plan, make_splits=make_splits)
    with tempfile.TemporaryDirectory() as download_dir:
        builder.download_and_prepare(
            download_dir=download_dir,
            download_config=tfds.download.DownloadConfig(beam_options=options),
        )
