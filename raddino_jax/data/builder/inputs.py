"""Input discovery for the dataset builder: a folder scan or a CSV list -> `InputItem`s.

A folder is scanned recursively for DICOM / PNG / JPEG files (`data.decode.classify_file`);
everything lands in split "train". A CSV has a `path` column (relative to the CSV's folder, or
absolute), optional `split` (default "train"), `patient_id` (overrides the DICOM tag when
non-empty), `mask_path`, and any other column as a label feature (int64 if every value is an
integer, float32 if numeric with blanks as NaN, else text); a label column named like a
built-in feature (e.g. `sex`) is stored as `label_<column>`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from etils import epath

from raddino_jax.data import records
from raddino_jax.data.decode import classify_file

CSV_SPECIAL_COLUMNS = ("path", "split", "patient_id", "mask_path")
DEFAULT_SPLIT = "train"


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


def _relative_to(path: epath.Path, root: epath.Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


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
    if "://" in path or os.path.isabs(path):
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


def split_order(items: Iterable[InputItem]) -> list[str]:
    """Split names in order of first appearance."""
    return list(dict.fromkeys(item.split for item in items))
