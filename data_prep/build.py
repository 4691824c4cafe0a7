"""Build a tfds ArrayRecord dataset of radiographs from a folder or a CSV (recipe s8).

    python -m data_prep.build --input DIR_OR_CSV --output DATA_DIR --name NAME \
        [--size 518] [--bits 8] [--workers N] [--policy minmax] [--overwrite]

Every DICOM / PNG / JPEG is decoded (data_prep.dicom, data_prep.images) on a spawn-safe
process pool, resized so its shorter side is --size (aspect kept), and stored as a 1-channel
PNG with its metadata (schema: data_prep.records). TensorFlow is not needed: tfds receives the
PNG bytes as they are. Results stream from the pool into the tfds writer in input order, so the
dataset is never held in memory.

Inputs:
  DIR: recursive scan for .dcm/.dicom, extensionless files with the 'DICM' marker, and
    .png/.jpg/.jpeg; everything lands in split "train".
  CSV: a `path` column (relative to the CSV's folder, or absolute), optional `split`
    (default "train"), `patient_id` (overrides the DICOM tag when non-empty), `mask_path`
    (a lesion-mask PNG stored as `mask`, nearest-neighbour resized to the image; rows without
    one get an all-zero mask), and any other column as a label feature (int64 if every value
    is an integer, float32 if numeric with blanks as NaN, else text); a label column named like
    a built-in feature (e.g. `sex`) is stored as `label_<column>`.

Bad files never stop the build: each one is listed in DATA_DIR/NAME/report.json with a
machine-readable reason. Exact duplicates (same decoded pixels) keep the first occurrence in
input order; the others are listed with the file they duplicate.

A split in which no file converts is left out of the tfds dataset (tfds cannot store an empty
split; the conversion runs once more without it) and listed in `dropped_empty_splits`.

Re-running: if DATA_DIR/NAME already holds a finished build (dataset_info.json and report.json)
made with the same options, the build is skipped and the stored report returned; with different
options it stops with an error. --overwrite deletes DATA_DIR/NAME and rebuilds.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath

from data_prep import records
from data_prep.dicom import (
    COLOUR_POLICIES,
    MULTIFRAME_POLICIES,
    WINDOWING_POLICIES,
    DecodePolicy,
    decode_dicom,
    looks_like_dicom,
)
from data_prep.images import (
    JPEG_SUFFIXES,
    PNG_SUFFIXES,
    DecodedImage,
    DecodeError,
    decode_raster,
    resize_nearest,
    resize_shorter_side,
    to_png_bytes,
)

DICOM_SUFFIXES = (".dcm", ".dicom")
RASTER_SUFFIXES = PNG_SUFFIXES + JPEG_SUFFIXES
CSV_SPECIAL_COLUMNS = ("path", "split", "patient_id", "mask_path")
DEFAULT_SPLIT = "train"
REPORT_NAME = "report.json"
# Relative aspect-ratio mismatch above which a mask is judged not to belong to its image.
MASK_ASPECT_TOLERANCE = 0.02
# Options that change the produced records; a re-run compares these (not --workers).
RESULT_OPTIONS = (
    "input", "name", "size", "bits", "policy", "percentiles", "multiframe", "colour", "source",
)


@dataclasses.dataclass(frozen=True)
class InputItem:
    """One file to convert.

    Attributes:
      path: where to read it (absolute local path or URL).
      record_path: the `path` feature: relative to the input folder / CSV folder when possible.
      split: tfds split name.
      patient_id: CSV override of the DICOM PatientID ('' = keep the tag).
      mask_path: where to read its mask ('' = none).
      labels: (column, typed value) pairs from the CSV.
    """

    path: str
    record_path: str
    split: str = DEFAULT_SPLIT
    patient_id: str = ""
    mask_path: str = ""
    labels: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """What a worker needs to turn an InputItem into a record (picklable for spawn)."""

    size: int
    bits: int
    policy: DecodePolicy
    with_mask: bool


@dataclasses.dataclass
class ConvertResult:
    """A worker's answer: either `example` + `pixel_hash`, or `failure` {path, reason, message}."""

    item: InputItem
    example: dict[str, Any] | None = None
    pixel_hash: str = ""
    failure: dict[str, str] | None = None


# ------------------------------------------------------------------------------------------
# Input discovery
# ------------------------------------------------------------------------------------------


def _is_remote(path: str) -> bool:
    return "://" in path


def _relative_to(path: epath.Path, root: epath.Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def classify_file(path: epath.Path) -> str | None:
    """'dicom', 'raster' or None (not an input) from the suffix, sniffing extensionless files."""
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in RASTER_SUFFIXES:
        return "raster"
    if suffix == "":
        try:
            return "dicom" if looks_like_dicom(path) else None
        except OSError:
            return None
    return None


def _walk_files(folder: epath.Path) -> Iterator[epath.Path]:
    """All files below `folder`, by explicit recursion (epath's rglob refuses `**` on GCS)."""
    for child in folder.iterdir():
        if child.is_dir():
            yield from _walk_files(child)
        else:
            yield child


def scan_directory(root: epath.PathLike) -> tuple[list[InputItem], list[str]]:
    """Recursively list convertible files under `root`, sorted by relative path.

    Returns:
      (items, ignored): InputItems in split "train", and relative paths of other files.
    """
    root = epath.Path(root)
    items, ignored = [], []
    for path in sorted(_walk_files(root)):
        relative = _relative_to(path, root)
        if classify_file(path) is None:
            ignored.append(relative)
        else:
            items.append(InputItem(path=os.fspath(path), record_path=relative))
    return items, ignored


def _parses(value: str, kind: type) -> bool:
    try:
        kind(value)
    except ValueError:
        return False
    return True


def infer_label_type(values: Sequence[str]) -> str:
    """'int' if every value is an integer, 'float' if every non-blank one is a number, else 'text'.

    Blanks force 'float' (stored as NaN) for numeric columns, since int64 has no missing value.
    """
    present = [v.strip() for v in values if v.strip()]
    if not present:
        return "text"
    if len(present) == len(values) and all(_parses(v, int) for v in present):
        return "int"
    if all(_parses(v, float) for v in present):
        return "float"
    return "text"


def _typed_label(value: str, kind: str) -> Any:
    value = value.strip()
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value) if value else math.nan
    return value


def _resolve(path: str, base: epath.Path) -> str:
    if _is_remote(path) or os.path.isabs(path):
        return path
    return os.fspath(base / path)


def label_feature_name(column: str) -> str:
    """Feature name of a CSV label column: the column itself, or `label_<column>` when it
    would clash with a built-in feature (e.g. a `sex` label next to the DICOM `sex` tag)."""
    return f"label_{column}" if column in records.RESERVED_FEATURES else column


def read_csv_inputs(csv_path: epath.PathLike) -> tuple[list[InputItem], dict[str, str], bool]:
    """Read a CSV input list.

    Returns:
      (items in file order, label feature name -> type ('int'/'float'/'text'), has mask_path
      column). See `label_feature_name` for columns named like a built-in feature.
    Raises:
      ValueError: no `path` column, or an empty `path` value.
    """
    csv_path = epath.Path(csv_path)
    base = csv_path.parent
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    columns = list(rows[0].keys()) if rows else []
    if "path" not in columns:
        raise ValueError(f"{csv_path}: the CSV needs a 'path' column, found {columns}")
    label_columns = [c for c in columns if c not in CSV_SPECIAL_COLUMNS]
    feature_names = {c: label_feature_name(c) for c in label_columns}
    if len(set(feature_names.values())) != len(feature_names):
        raise ValueError(f"{csv_path}: label columns {label_columns} collide after renaming")
    column_types = {c: infer_label_type([row[c] or "" for row in rows]) for c in label_columns}
    label_types = {feature_names[c]: column_types[c] for c in label_columns}
    items = []
    for line, row in enumerate(rows, start=2):
        path = (row["path"] or "").strip()
        if not path:
            raise ValueError(f"{csv_path}:{line}: empty path")
        mask = (row.get("mask_path") or "").strip()
        labels = tuple(
            (feature_names[c], _typed_label(row[c] or "", column_types[c])) for c in label_columns
        )
        items.append(
            InputItem(
                path=_resolve(path, base),
                record_path=path,
                split=(row.get("split") or "").strip() or DEFAULT_SPLIT,
                patient_id=(row.get("patient_id") or "").strip(),
                mask_path=_resolve(mask, base) if mask else "",
                labels=labels,
            )
        )
    return items, label_types, "mask_path" in columns


# ------------------------------------------------------------------------------------------
# Conversion of one file (runs in the worker processes)
# ------------------------------------------------------------------------------------------


def decode_any(path: str, policy: DecodePolicy) -> DecodedImage:
    """Decode a PNG/JPEG by suffix, anything else as DICOM."""
    if epath.Path(path).suffix.lower() in RASTER_SUFFIXES:
        return decode_raster(path, source=policy.source, colour=policy.colour)
    return decode_dicom(path, policy)


def pixel_hash(pixels: np.ndarray) -> str:
    """SHA-256 of the decoded full-resolution pixels and their shape (duplicate detection)."""
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
    return digest.hexdigest()


def load_mask(path: str, image_shape: tuple[int, int], out_shape: tuple[int, int]) -> np.ndarray:
    """Read a mask PNG and resize it (nearest) to `out_shape` -> uint8 [H, W, 1].

    uint8 masks keep their values (binary 0/255 or class labels); deeper masks become 0/255.
    Raises DecodeError('mask_error') if unreadable or its aspect differs from the image's.
    """
    try:
        data = epath.Path(path).read_bytes()
    except OSError as error:
        raise DecodeError("mask_error", path, f"cannot read the mask ({error})") from error
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DecodeError("mask_error", path, "the mask is not a decodable image")
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.dtype != np.uint8:
        mask = np.where(mask > 0, 255, 0).astype(np.uint8)
    image_aspect = image_shape[1] / image_shape[0]
    mask_aspect = mask.shape[1] / mask.shape[0]
    if abs(mask_aspect / image_aspect - 1.0) > MASK_ASPECT_TOLERANCE:
        raise DecodeError(
            "mask_error", path, f"mask shape {mask.shape} does not fit image {image_shape}"
        )
    return resize_nearest(mask, *out_shape)[..., None]


def _labelled_example(
    item: InputItem, decoded: DecodedImage, options: ConvertOptions
) -> dict[str, Any]:
    """The feature dict of one converted item (image, mask, metadata, labels)."""
    resized = resize_shorter_side(decoded.pixels, options.size)
    example = records.metadata_to_features(decoded.metadata, item.record_path)
    if item.patient_id:
        example["patient_id"] = item.patient_id
    example["image"] = to_png_bytes(resized, options.bits)
    if options.with_mask:
        if item.mask_path:
            mask = load_mask(item.mask_path, decoded.pixels.shape, resized.shape)
        else:
            mask = np.zeros((*resized.shape, 1), np.uint8)
        ok, buffer = cv2.imencode(".png", mask[..., 0])
        if not ok:
            raise DecodeError("mask_error", item.mask_path, "PNG encoding failed")
        example["mask"] = buffer.tobytes()
    for column, value in item.labels:
        example[column] = value
    return example


def convert_item(task: tuple[InputItem, ConvertOptions]) -> ConvertResult:
    """Decode, resize and encode one file; never raises for a bad file (pool worker)."""
    item, options = task
    try:
        decoded = decode_any(item.path, options.policy)
        example = _labelled_example(item, decoded, options)
    except DecodeError as error:
        failure = {"path": item.record_path, "reason": error.reason, "message": error.message}
        return ConvertResult(item=item, failure=failure)
    except FileNotFoundError as error:
        failure = {"path": item.record_path, "reason": "decode_error", "message": str(error)}
        return ConvertResult(item=item, failure=failure)
    except Exception as error:  # noqa: BLE001 - one bad file must not stop the build
        message = f"{item.path}: decode_error: {type(error).__name__}: {error}"
        failure = {"path": item.record_path, "reason": "decode_error", "message": message}
        return ConvertResult(item=item, failure=failure)
    return ConvertResult(item=item, example=example, pixel_hash=pixel_hash(decoded.pixels))


# ------------------------------------------------------------------------------------------
# tfds builder
# ------------------------------------------------------------------------------------------


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
        name: str,
        features: tfds.features.FeaturesDict,
        split_examples: Mapping[str, Callable[[], Iterator[tuple[int, dict[str, Any]]]]],
        data_dir: epath.PathLike,
        description: str = "",
    ):
        self.name = name
        self._features = features
        self._split_examples = split_examples
        self._description = description
        super().__init__(data_dir=os.fspath(data_dir), file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._description,
            features=self._features,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: make() for split, make in self._split_examples.items()}

    def _generate_examples(self):
        raise NotImplementedError("examples come from the split generators given at init")


class _BuildState:
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


# ------------------------------------------------------------------------------------------
# Build driver
# ------------------------------------------------------------------------------------------


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


def discover_inputs(
    input_path: str,
) -> tuple[list[InputItem], dict[str, str], bool, list[str]]:
    """(items, label types, with_mask, ignored files) for a folder or a .csv file."""
    path = epath.Path(input_path)
    if path.is_file() and path.suffix.lower() == ".csv":
        items, label_types, with_mask = read_csv_inputs(path)
        return items, label_types, with_mask, []
    if not path.is_dir():
        raise FileNotFoundError(f"--input {input_path} is neither a folder nor a .csv file")
    items, ignored = scan_directory(path)
    return items, {}, False, ignored


def _split_order(items: Iterable[InputItem]) -> list[str]:
    """Split names in order of first appearance."""
    return list(dict.fromkeys(item.split for item in items))


def _result_stream(
    pool: Any, options: ConvertOptions
) -> Callable[[list[InputItem]], Iterable[ConvertResult]]:
    """Map convert_item over items, in order: on the pool if given, else in this process."""

    def results(items: list[InputItem]) -> Iterable[ConvertResult]:
        tasks = ((item, options) for item in items)
        if pool is None:
            return map(convert_item, tasks)
        return pool.imap(convert_item, tasks, chunksize=2)

    return results


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
    splits = _split_order(items) or [DEFAULT_SPLIT]
    by_split = {split: [item for item in items if item.split == split] for split in splits}

    pool = None
    if options.workers > 1 and len(items) > 1:
        pool = multiprocessing.get_context("spawn").Pool(options.workers)
    dropped: list[str] = []
    try:
        while True:
            state = _BuildState(_result_stream(pool, convert_options), total=len(items))
            try:
                _write_splits(options, features, splits, by_split, dropped, state)
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


def _write_splits(
    options: BuildOptions,
    features: tfds.features.FeaturesDict,
    splits: list[str],
    by_split: Mapping[str, list[InputItem]],
    dropped: list[str],
    state: _BuildState,
) -> None:
    """Run the tfds builder over the kept splits, in input order.

    Items of `dropped` splits are drained (failures/duplicates recorded) at their place in the
    order, so duplicate detection sees files in the same order as without dropping.
    """
    pending: list[InputItem] = []
    plan: dict[str, tuple[list[InputItem], list[InputItem]]] = {}
    for split in splits:
        if split in dropped:
            pending.extend(by_split[split])
        else:
            plan[split], pending = (by_split[split], pending), []
    if plan:
        builder = RadiographBuilder(
            name=options.name,
            features=features,
            split_examples={
                split: functools.partial(state.examples, split, own, drain)
                for split, (own, drain) in plan.items()
            },
            data_dir=options.output,
            description=f"Radiographs converted from {options.input} by data_prep.build.",
        )
        with tempfile.TemporaryDirectory() as download_dir:
            builder.download_and_prepare(download_dir=download_dir)
    state.drain(pending)


def make_report(
    options: BuildOptions,
    items: Sequence[InputItem],
    ignored: Sequence[str],
    state: _BuildState,
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
        "splits": {split: state.split_counts.get(split, 0) for split in _split_order(items)},
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


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> BuildOptions:
    """Parse the command line into BuildOptions."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.build", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--input", required=True, help="folder to scan, or a .csv file list")
    parser.add_argument("--output", required=True, help="tfds data_dir (local or gs://)")
    parser.add_argument("--name", required=True, help="dataset name (folder under --output)")
    parser.add_argument("--size", type=int, default=518, help="shorter side in px; 0 = keep")
    parser.add_argument("--bits", type=int, default=8, choices=(8, 16), help="PNG bit depth")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--policy", default="minmax", choices=WINDOWING_POLICIES)
    parser.add_argument(
        "--percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOW", "HIGH")
    )
    parser.add_argument("--multiframe", default="first", choices=MULTIFRAME_POLICIES)
    parser.add_argument("--colour", default="convert", choices=COLOUR_POLICIES)
    parser.add_argument("--source", default="", help="metadata source name (default: --name)")
    parser.add_argument("--overwrite", action="store_true", help="delete and rebuild")
    args = parser.parse_args(argv)
    return BuildOptions(
        input=args.input,
        output=args.output,
        name=args.name,
        size=args.size,
        bits=args.bits,
        workers=max(1, args.workers),
        policy=args.policy,
        percentiles=tuple(args.percentiles),
        multiframe=args.multiframe,
        colour=args.colour,
        source=args.source,
        overwrite=args.overwrite,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point: build, print the counts, return the report."""
    logging.basicConfig(level=logging.INFO)
    report = build_dataset(parse_args(argv))
    print(json.dumps({"counts": report["counts"], "splits": report["splits"]}))
    return report


if __name__ == "__main__":
    main()
