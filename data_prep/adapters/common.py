"""What every dataset adapter shares: the record it yields, CSV reading, value normalisation.

An adapter turns a dataset folder (as distributed) into an `AdapterOutput`: one `ImageRecord`
per metadata row that names an image, the ordered finding columns, and the problems found on
the way (unreadable rows, duplicate image ids, notes). Checking files on disk, view filters and
writing the manifest happen once, in `data_prep.manifest`.

Label values are kept as the strings the manifest writes (see `chexpert_value`):
"1" positive, "0" negative, "-1" uncertain, "" not mentioned / unknown.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import re
import sys
from collections.abc import Iterator, Sequence

from etils import epath

POSITIVE, NEGATIVE, UNCERTAIN, UNKNOWN = "1", "0", "-1", ""
FRONTAL_VIEWS = ("PA", "AP")
VIEWS = ("PA", "AP", "lateral", "other", "")

# The 14 CheXpert observations, as spelled in CheXpert's train.csv, MIMIC-CXR-JPG's
# -chexpert/-negbio files and BRAX's spreadsheet (header order differs between them).
CHEXPERT_FINDINGS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# Some fields (PadChest's Report) are long; the csv default limit is 128 KiB.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclasses.dataclass
class ImageRecord:
    """One image named by the dataset's metadata.

    Attributes:
      image: where the image should be (absolute local path or URL).
      image_id: the dataset's own id of the image (duplicates are detected on it).
      patient_id, study_id: as in the metadata ('' when the dataset has none).
      view: 'PA', 'AP', 'lateral', 'other' or '' (unknown); see `normalise_view`.
      sex: 'M', 'F', 'O' or ''.
      age: years as a decimal string, or ''.
      split: 'train', 'val', 'test' or '' (no official split).
      labels: finding column -> '1' / '0' / '-1' / ''.
      alternatives: other places the image may be (first existing one wins).
      on_disk: True/False when the adapter already knows (e.g. from a folder listing),
        None to let the manifest check.
    """

    image: str
    image_id: str
    patient_id: str = ""
    study_id: str = ""
    view: str = ""
    sex: str = ""
    age: str = ""
    split: str = ""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    alternatives: tuple[str, ...] = ()
    on_disk: bool | None = None


@dataclasses.dataclass
class Problems:
    """Rows an adapter could not use, and free-text notes for the report."""

    unreadable_rows: list[dict[str, object]] = dataclasses.field(default_factory=list)
    duplicates: list[dict[str, object]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def unreadable(self, file: str, line: int, reason: str) -> None:
        self.unreadable_rows.append({"file": file, "line": line, "reason": reason})


@dataclasses.dataclass
class AdapterOutput:
    """records in metadata order, finding columns in manifest order, files read, problems."""

    records: list[ImageRecord]
    findings: list[str]
    metadata_files: list[str]
    metadata_rows: int
    problems: Problems


@dataclasses.dataclass(frozen=True)
class LabelPolicy:
    """How CheXpert-style values are written: `uncertain` replaces -1 (None = keep -1),
    `unmentioned` replaces blanks (None = keep blank)."""

    uncertain: str | None = None
    unmentioned: str | None = None

    def apply(self, value: str) -> str:
        if value == UNCERTAIN and self.uncertain is not None:
            return self.uncertain
        if value == UNKNOWN and self.unmentioned is not None:
            return self.unmentioned
        return value


class DuplicateGuard:
    """Remembers image ids; `seen` records a duplicate in `problems` and says so."""

    def __init__(self, problems: Problems, file: str):
        self._first_line: dict[str, int] = {}
        self._problems = problems
        self._file = file

    def seen(self, image_id: str, line: int) -> bool:
        first = self._first_line.get(image_id)
        if first is None:
            self._first_line[image_id] = line
            return False
        self._problems.duplicates.append(
            {"id": image_id, "file": self._file, "line": line, "first_line": first}
        )
        return True


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------


def find_file(folders: Sequence[epath.Path], names: Sequence[str]) -> epath.Path | None:
    """The first of `names` (each also tried with .gz) that exists in one of `folders`."""
    for folder in folders:
        for name in names:
            for candidate in (name, f"{name}.gz"):
                path = folder / candidate
                if path.exists():
                    return path
    return None


def require_file(folders: Sequence[epath.Path], names: Sequence[str], what: str) -> epath.Path:
    path = find_file(folders, names)
    if path is None:
        looked = ", ".join(str(f) for f in folders)
        raise FileNotFoundError(f"{what}: none of {list(names)} (or .gz) in {looked}")
    return path


def read_text(path: epath.Path) -> str:
    """A metadata file's text: gunzipped if .gz, UTF-8 (BOM dropped), else Latin-1."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


class CsvRows:
    """(line number, row) pairs of a CSV body; `count` = data rows seen so far, malformed ones
    included (blank lines are not rows)."""

    def __init__(self, reader, header: list[str], name: str, problems: Problems):
        self._reader, self._header, self._name, self._problems = reader, header, name, problems
        self.count = 0

    def __iter__(self) -> Iterator[tuple[int, dict[str, str]]]:
        header = self._header
        for line, cells in enumerate(self._reader, start=2):
            if not cells or not any(cell.strip() for cell in cells):
                continue
            self.count += 1
            while len(cells) > len(header) and not cells[-1].strip():
                cells = cells[:-1]
            if len(cells) != len(header):
                self._problems.unreadable(
                    self._name, line, f"{len(cells)} fields, the header has {len(header)}"
                )
                continue
            yield line, dict(zip(header, (cell.strip() for cell in cells)))


def read_csv(
    path: epath.Path, problems: Problems, required: Sequence[str]
) -> tuple[list[str], CsvRows]:
    """Header and (line number, row) pairs of a CSV; malformed rows go to `problems`.

    Trailing empty header cells (NIH's Data_Entry_2017.csv ends its header with a comma) and
    trailing empty cells of a row are ignored; any other field-count mismatch makes the row
    unreadable. Line numbers count the header as line 1 (a quoted newline inside a field is not
    counted: it is the record number + 1).
    Raises:
      ValueError: a `required` column is missing (the file is not the expected one).
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = next(reader, [])
    while header and not header[-1].strip():
        header.pop()
    header = [name.strip() for name in header]
    missing = [name for name in required if name not in header]
    if missing:
        raise ValueError(f"{path}: expected columns {missing} not in header {header}")
    return header, CsvRows(reader, header, path.name, problems)


# ------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------


def chexpert_value(raw: str) -> str:
    """A CheXpert-style cell ('1.0', '0', '-1.0', '') -> '1' / '0' / '-1' / ''.

    Raises:
      ValueError: any other value.
    """
    raw = raw.strip()
    if not raw or raw.lower() == "nan":
        return UNKNOWN
    number = float(raw)
    if number not in (1.0, 0.0, -1.0):
        raise ValueError(f"label value {raw!r} is not 1, 0, -1 or blank")
    return str(int(number))


_LATERAL = {"L", "LL", "RL", "LAT", "LATERAL", "XTABLE LATERAL", "LEFT LATERAL", "RIGHT LATERAL"}
_PA = {"PA", "POSTEROANTERIOR", "POSTERO-ANTERIOR"}
_AP = {"AP", "ANTEROPOSTERIOR", "ANTERO-POSTERIOR", "AP_HORIZONTAL", "AP SUPINE"}


def normalise_view(raw: str) -> str:
    """A view/projection string -> 'PA', 'AP', 'lateral', 'other' or '' (unknown).

    AP_horizontal (PadChest's supine AP) counts as AP; decubitus, oblique, axial and other
    special views are 'other'.
    """
    value = " ".join(raw.strip().upper().split())
    if not value or value in ("NAN", "UNK", "UNKNOWN"):
        return ""
    if value in _PA:
        return "PA"
    if value in _AP:
        return "AP"
    if value in _LATERAL:
        return "lateral"
    return "other"


def normalise_sex(raw: str) -> str:
    """'M'/'Male' -> 'M', 'F'/'Female' -> 'F', 'O'/'Other' -> 'O', anything else -> ''."""
    value = raw.strip().upper()
    if value in ("M", "MALE"):
        return "M"
    if value in ("F", "FEMALE"):
        return "F"
    if value in ("O", "OTHER"):
        return "O"
    return ""


_AGE_UNITS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}


def parse_age(raw: str) -> str:
    """An age cell -> years as a string, '' if unknown.

    Accepts plain numbers ('57', '57.0'), DICOM age strings ('058Y', '006M') and BRAX's
    5-year groups, taken at their first number ('85 or more' -> '85').
    """
    value = raw.strip().upper()
    if not value or value == "NAN":
        return ""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([YMWD])?", value)
    if match is None:
        match = re.match(r"(\d+(?:\.\d+)?)", value)
        if match is None:
            return ""
        return _number_text(float(match.group(1)))
    years = float(match.group(1)) * _AGE_UNITS[match.group(2) or "Y"]
    return _number_text(years)


def _number_text(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.3f}".rstrip("0")


def integer_text(raw: str) -> str:
    """'00000001' / '1.0' -> '1' (ids that differ only in zero padding between versions)."""
    value = raw.strip()
    try:
        return str(int(float(value)))
    except ValueError:
        return value


def join(root: epath.Path, relative: str) -> str:
    """root / relative as a string (relative uses '/' separators)."""
    return str(root.joinpath(*[part for part in relative.replace("\\", "/").split("/") if part]))
