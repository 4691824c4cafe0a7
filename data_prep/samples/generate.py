"""The built-in sample data: real radiographs from `pydicom-data` plus synthetic chest phantoms.

`generate_samples(output, n_phantoms, size, seed)` writes, with no network access and
byte-identical for a given seed (command line: `python -m data_prep.samples`):
    DIR/real/*.dcm                 real CR radiographs shipped by pydicom-data (MIT)
    DIR/LICENSE-pydicom-data.txt   where those came from, and their licence
    DIR/phantoms/*.dcm             synthetic chest radiographs (see `phantoms`, `phantom_dicom`)
    DIR/phantoms/masks/*.png       lesion masks, 0/255 uint8, same grid as the DICOM pixels
    DIR/labels.csv                 path, split, patient_id, mask_path, nodule, effusion,
                                   effusion_present, sex, age, kind; paths relative to DIR
    DIR/samples.json               counts, seed, transfer syntaxes used and skipped

labels.csv is the input contract of the dataset builder (`raddino_jax.data.builder`): every
column besides path, split, patient_id and mask_path is a label. Unknown labels of real images
are -1 (ints) or ''. Training uses these samples when config.data.dir is empty
(`data.sources.builtin_dataset`).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import importlib.resources
import io
import json
from collections.abc import Sequence

import numpy as np
import pydicom
from etils import epath
from PIL import Image

from data_prep.samples import phantom_dicom, phantoms

CSV_COLUMNS = (
    "path",
    "split",
    "patient_id",
    "mask_path",
    "nodule",
    "effusion",
    "effusion_present",
    "sex",
    "age",
    "kind",
)
# Real radiographs in pydicom-data: RG1 is an adult PA chest CR (MONOCHROME1), uncompressed
# and as lossless / lossy JPEG 2000 twins; RG3 is a CR of the same kind of files but its
# BodyPartExamined is EXTREMITY.
REAL_FILES = (
    "RG1_UNCR.dcm",
    "RG1_J2KR.dcm",
    "RG1_J2KI.dcm",
    "RG3_UNCR.dcm",
    "RG3_J2KR.dcm",
    "RG3_J2KI.dcm",
)
REQUIRED_REAL_FILES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
MANUFACTURERS = ("Acme Radiology", "Northwind Medical", "Contoso Imaging", "Phantom Works")
REPEAT_PATIENT_FRACTION = 0.10  # share of images that are a patient's second study
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}  # default; see split_patients
UID_NAMESPACE = "raddino_jax.data_prep.samples"


@dataclasses.dataclass(frozen=True)
class PhantomPlan:
    """One phantom image to make: which patient, which of their studies, which labels."""

    index: int
    patient_index: int
    study_index: int  # 0 first study, 1 follow-up
    sex: str
    nodule: int
    effusion: int


def _balanced(rng: np.random.Generator, values: Sequence, count: int) -> list:
    """`count` draws with each value equally often (up to rounding), in random order."""
    repeated = [values[i % len(values)] for i in range(count)]
    return [repeated[i] for i in rng.permutation(count)]


def plan_phantoms(rng: np.random.Generator, n_phantoms: int) -> list[PhantomPlan]:
    """Assign images to patients (~10% of images are a second study of a patient) with
    labels balanced over patients: sex 1:1, nodule 1:1, effusion none/left/right 2:1:1."""
    n_repeats = int(round(n_phantoms * REPEAT_PATIENT_FRACTION)) if n_phantoms >= 4 else 0
    n_patients = n_phantoms - n_repeats
    repeated = set(rng.choice(n_patients, size=n_repeats, replace=False).tolist())
    sexes = _balanced(rng, ["M", "F"], n_patients)
    nodules = _balanced(rng, [0, 1], n_patients)
    effusions = _balanced(rng, [0, 1, 0, 2], n_patients)
    plans: list[PhantomPlan] = []
    for patient in range(n_patients):
        for study in range(2 if patient in repeated else 1):
            plans.append(
                PhantomPlan(
                    index=len(plans),
                    patient_index=patient,
                    study_index=study,
                    sex=sexes[patient],
                    nodule=nodules[patient],
                    effusion=effusions[patient],
                )
            )
    return plans


def check_split_fractions(split_fractions: dict[str, float]) -> None:
    """Raise ValueError unless `split_fractions` maps train, val, test to fractions summing to 1."""
    if set(split_fractions) != {"train", "val", "test"}:
        raise ValueError(f"split_fractions needs train, val, test; got {sorted(split_fractions)}")
    if min(split_fractions.values()) < 0 or abs(sum(split_fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must be >= 0 and sum to 1, got {split_fractions}")


def split_patients(
    rng: np.random.Generator,
    patient_ids: Sequence[str],
    split_fractions: dict[str, float] | None = None,
) -> dict[str, str]:
    """Random train/val/test split by patient, by default ~70/15/15 (`SPLIT_FRACTIONS`; every
    split non-empty from 3 patients on), so that no patient appears in two splits."""
    fractions = SPLIT_FRACTIONS if split_fractions is None else split_fractions
    check_split_fractions(fractions)
    unique = sorted(set(patient_ids))
    order = [unique[i] for i in rng.permutation(len(unique))]
    n_val = int(round(fractions["val"] * len(order)))
    n_test = int(round(fractions["test"] * len(order)))
    if len(order) >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    n_train = len(order) - n_val - n_test
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return dict(zip(order, splits, strict=True))


def _pydicom_data_folder():
    """The installed pydicom-data files (package `data_store`), found without any download."""
    return importlib.resources.files("data_store") / "data"


def copy_real_radiographs(output: epath.Path) -> list[dict]:
    """Copy pydicom-data's real radiographs to output/real/ and write the licence note.

    Returns their labels.csv rows. Raises FileNotFoundError if pydicom-data lacks RG1.
    """
    source = _pydicom_data_folder()
    (output / "real").mkdir(parents=True, exist_ok=True)
    rows = []
    for name in REAL_FILES:
        file = source / name
        if not file.is_file():
            if name in REQUIRED_REAL_FILES:
                raise FileNotFoundError(f"pydicom-data is missing {name}; reinstall it")
            continue
        data = file.read_bytes()
        (output / "real" / name).write_bytes(data)
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        patient_id = str(header.get("PatientID", "") or "").strip() or name.rsplit(".", 1)[0]
        sex = str(header.get("PatientSex", "") or "").strip()
        rows.append(
            dict(
                path=f"real/{name}",
                split="train",
                patient_id=patient_id,
                mask_path="",
                nodule=-1,
                effusion=-1,
                effusion_present=-1,
                sex=sex if sex in ("M", "F") else "",
                age=_age_years(str(header.get("PatientAge", "") or "")),
                kind="real",
            )
        )
    (output / "LICENSE-pydicom-data.txt").write_text(_licence_note())
    return rows


def _age_years(age_string: str) -> int:
    """DICOM AS ('045Y', '006M', ...) to whole years; -1 when absent or unparsable."""
    age_string = age_string.strip().upper()
    if len(age_string) != 4 or not age_string[:3].isdigit():
        return -1
    per_year = {"Y": 1, "M": 12, "W": 52, "D": 365}.get(age_string[3])
    return int(age_string[:3]) // per_year if per_year else -1


def _licence_note() -> str:
    """Provenance + the MIT licence text of pydicom-data (from its dist-info if present)."""
    from importlib import metadata

    try:
        distribution = metadata.distribution("pydicom-data")
        version = distribution.version
        licence = next(
            (f.read_text() for f in distribution.files or () if f.name.upper() == "LICENSE"),
            None,
        )
    except metadata.PackageNotFoundError:
        version, licence = "unknown", None
    header = (
        f"The files in real/ are copied unchanged from the Python package pydicom-data "
        f"{version} (https://github.com/pydicom/pydicom-data, Python package `data_store`, "
        f"folder data/).\nThey are distributed under the MIT licence:\n\n"
    )
    return header + (licence or "MIT License, Copyright (c) 2020 Dicom in Python\n")


def _phantom_meta(
    rng: np.random.Generator, seed: int, plan: PhantomPlan, patient_id: str, study_date: str
) -> phantom_dicom.DicomMeta:
    """Study metadata for one phantom; a few pixel spacings are deliberately bogus (0 or
    missing) so a decoder's fallback is exercised."""
    spacing_value = round(float(rng.uniform(0.14, 0.20)), 3)
    spacing: tuple[float, float] | None = (spacing_value, spacing_value)
    if plan.index % 16 == 7:
        spacing = (0.0, 0.0)
    elif plan.index % 16 == 13:
        spacing = None
    uid = phantom_dicom.deterministic_uid
    return phantom_dicom.DicomMeta(
        patient_id=patient_id,
        study_uid=uid(UID_NAMESPACE, seed, patient_id, plan.study_index),
        series_uid=uid(UID_NAMESPACE, seed, plan.index, "series"),
        instance_uid=uid(UID_NAMESPACE, seed, plan.index, "instance"),
        study_date=study_date,
        study_time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
        manufacturer=MANUFACTURERS[int(rng.integers(len(MANUFACTURERS)))],
        view_position="AP" if rng.uniform() < 0.25 else "PA",
        pixel_spacing=spacing,
        instance_number=plan.study_index + 1,
    )


def _study_date(rng: np.random.Generator, study_index: int, first: np.datetime64) -> str:
    """YYYYMMDD: the first study in 2012-2023, a follow-up 30-400 days later."""
    date = first + np.timedelta64(int(rng.integers(30, 400)) * study_index, "D")
    return str(date).replace("-", "")


def _variant_for(index: int, available: dict[str, bool]) -> phantom_dicom.DicomVariant:
    """Cycle through `phantom_dicom.VARIANTS`; a syntax with no encoder falls back to Explicit VR
    Little Endian, leaving every other image unchanged."""
    variant = phantom_dicom.VARIANTS[index % len(phantom_dicom.VARIANTS)]
    if not available[variant.transfer_syntax]:
        variant = dataclasses.replace(variant, transfer_syntax=pydicom.uid.ExplicitVRLittleEndian)
    return variant


def _png_bytes(mask: np.ndarray) -> bytes:
    """Encode a uint8 [H, W] mask as a grayscale PNG."""
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def make_phantoms(
    output: epath.Path,
    n_phantoms: int,
    size: int,
    seed: int,
    split_fractions: dict[str, float] | None = None,
    acquisition: str = "standard",
) -> tuple[list[dict], dict]:
    """Render, encode and write `n_phantoms` phantoms (DICOM + mask PNG) under output/phantoms.

    `acquisition` names the `phantoms.ACQUISITION_PROFILES` entry the images are taken with.
    Returns (labels.csv rows, summary of how they were stored).
    """
    (output / "phantoms" / "masks").mkdir(parents=True, exist_ok=True)
    plans = plan_phantoms(np.random.default_rng([seed, 0]), n_phantoms)
    patient_ids = [f"PH{seed % 10000:04d}-{plan.patient_index:04d}" for plan in plans]
    splits = split_patients(np.random.default_rng([seed, 1]), patient_ids, split_fractions)
    available = {
        v.transfer_syntax: phantom_dicom.syntax_available(v.transfer_syntax)
        for v in phantom_dicom.VARIANTS
    }
    # Another acquisition profile with the same seed draws the same patients: its files get
    # their own UIDs (the standard profile's stay as they were).
    uid_seed = seed if acquisition == "standard" else f"{seed}-{acquisition}"
    rows, patients, first_dates = [], {}, {}
    syntax_counts: collections.Counter = collections.Counter()
    photometric_counts: collections.Counter = collections.Counter()
    for plan, patient_id in zip(plans, patient_ids, strict=True):
        patient_rng = np.random.default_rng([seed, 2, plan.patient_index])
        if plan.study_index == 0:
            params = phantoms.sample_patient(
                patient_rng,
                size,
                sex=plan.sex,
                nodule=plan.nodule,
                effusion=plan.effusion,
                acquisition=acquisition,
            )
            patients[plan.patient_index] = params
            first_dates[plan.patient_index] = np.datetime64("2012-01-01") + np.timedelta64(
                int(patient_rng.integers(0, 4380)), "D"
            )
        else:
            image_rng = np.random.default_rng([seed, 3, plan.index])
            params = phantoms.sample_followup(
                image_rng, patients[plan.patient_index], size, acquisition
            )
        render_rng = np.random.default_rng([seed, 4, plan.index])
        image, mask = phantoms.render_phantom(render_rng, params)
        variant = _variant_for(plan.index, available)
        meta_rng = np.random.default_rng([seed, 5, plan.index])
        date = _study_date(meta_rng, plan.study_index, first_dates[plan.patient_index])
        meta = _phantom_meta(meta_rng, uid_seed, plan, patient_id, date)
        stem = f"phantom_{plan.index:04d}"
        (output / "phantoms" / f"{stem}.dcm").write_bytes(
            phantom_dicom.encode_dicom(image, params, variant, meta)
        )
        (output / "phantoms" / "masks" / f"{stem}.png").write_bytes(_png_bytes(mask))
        syntax_counts[variant.transfer_syntax.name] += 1
        photometric_counts[variant.photometric] += 1
        rows.append(
            dict(
                path=f"phantoms/{stem}.dcm",
                split=splits[patient_id],
                patient_id=patient_id,
                mask_path=f"phantoms/masks/{stem}.png",
                nodule=params.nodule,
                effusion=params.effusion,
                effusion_present=int(params.effusion != phantoms.EFFUSION_NONE),
                sex=params.sex,
                age=params.age,
                kind="phantom",
            )
        )
    skipped = sorted(uid.name for uid, ok in available.items() if not ok)
    storage = {
        "transfer_syntaxes": dict(sorted(syntax_counts.items())),
        "transfer_syntaxes_skipped": {
            name: "no encoder installed; written as Explicit VR Little Endian" for name in skipped
        },
        "photometric": dict(sorted(photometric_counts.items())),
        "n_patients": len(set(patient_ids)),
        "n_patients_with_two_studies": sum(plan.study_index == 1 for plan in plans),
    }
    return rows, storage


def _csv_text(rows: Sequence[dict]) -> str:
    """labels.csv content with a fixed column order and Unix line endings."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _count(rows: Sequence[dict], column: str) -> dict[str, int]:
    """How many rows have each value of `column` (keys as strings, sorted)."""
    counts = collections.Counter(str(row[column]) for row in rows)
    return dict(sorted(counts.items()))


def generate_samples(
    output: epath.PathLike,
    n_phantoms: int = 96,
    size: int = 256,
    seed: int = 0,
    split_fractions: dict[str, float] | None = None,
    acquisition: str = "standard",
) -> dict:
    """Write the whole sample data set to `output` (local folder or gs:// URL).

    `split_fractions` ({train, val, test} -> fraction of patients; default `SPLIT_FRACTIONS`)
    sets the phantoms' patient split; real radiographs are always in train. `acquisition`
    ("standard" or "portable", `phantoms.ACQUISITION_PROFILES`) sets how the phantoms are
    exposed and positioned.
    Returns the summary also written to output/samples.json.
    """
    if n_phantoms < 0:
        raise ValueError(f"n_phantoms must be >= 0, got {n_phantoms}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if size < 64:
        raise ValueError(f"size must be >= 64 pixels, got {size}")
    if split_fractions is not None:
        check_split_fractions(split_fractions)
    if acquisition not in phantoms.ACQUISITION_PROFILES:
        raise ValueError(
            f"acquisition must be one of {sorted(phantoms.ACQUISITION_PROFILES)}, "
            f"got {acquisition!r}"
        )
    output = epath.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    real_rows = copy_real_radiographs(output)
    phantom_rows, storage = make_phantoms(
        output, n_phantoms, size, seed, split_fractions, acquisition
    )
    (output / "labels.csv").write_text(_csv_text(real_rows + phantom_rows))
    summary = {
        "seed": seed,
        "size": size,
        "acquisition": acquisition,
        "n_real": len(real_rows),
        "n_phantoms": len(phantom_rows),
        "real_files": [row["path"] for row in real_rows],
        "phantom_splits": _count(phantom_rows, "split"),
        "phantom_nodule": _count(phantom_rows, "nodule"),
        "phantom_effusion": _count(phantom_rows, "effusion"),
        "phantom_sex": _count(phantom_rows, "sex"),
        "effusion_codes": {"0": "none", "1": "left (image right)", "2": "right (image left)"},
        "effusion_present": "1 if effusion is 1 or 2 (side-free, so unchanged by a flip)",
        **storage,
    }
    (output / "samples.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
