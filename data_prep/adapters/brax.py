"""BRAX, Brazilian labeled chest x-ray dataset (PhysioNet, v1.1.0).

Layout (root = physionet.org/files/brax/1.1.0):
  master_spreadsheet_update.csv (v1.0.0: master_spreadsheet.csv): one row per image; columns
    used: PngPath (relative to root; --brax-images DicomPath, a name not verified, reads the
    DICOM copies instead), PatientID, PatientSex (M/F/O), PatientAge (5-year groups, e.g.
    '85 or more'), AccessionNumber (the study), ViewPosition (PA, AP, L, RL, ...; blank for
    some), and the 14 CheXpert-style observations (1 / 0 / -1 / blank). Public loaders index
    8 columns before the labels, so a leading unnamed index column is likely; it is not read.
Age is the first number of the group ('85 or more' -> 85). No official split.
"""

from __future__ import annotations

from etils import epath

from data_prep.adapters import common

CSV_NAMES = ("master_spreadsheet_update.csv", "master_spreadsheet.csv")
REQUIRED = ("PatientID", "AccessionNumber", "ViewPosition")
IMAGE_COLUMNS = ("PngPath", "DicomPath")


def load(
    root: epath.Path, policy: common.LabelPolicy, image_column: str = "PngPath"
) -> common.AdapterOutput:
    if image_column not in IMAGE_COLUMNS:
        raise ValueError(f"image column must be one of {IMAGE_COLUMNS}, got {image_column!r}")
    problems = common.Problems()
    path = common.require_file([root], CSV_NAMES, "BRAX spreadsheet")
    header, rows = common.read_csv(path, problems, (*REQUIRED, image_column))
    findings = [f for f in common.CHEXPERT_FINDINGS if f in header]
    absent = [f for f in common.CHEXPERT_FINDINGS if f not in header]
    if absent:
        problems.notes.append(f"observations absent from the header: {absent}")
    guard = common.DuplicateGuard(problems, path.name)
    records = []
    for line, row in rows:
        relative = row[image_column]
        if not relative:
            problems.unreadable(path.name, line, f"empty {image_column}")
            continue
        try:
            labels = {f: policy.apply(common.chexpert_value(row[f])) for f in findings}
        except ValueError as error:
            problems.unreadable(path.name, line, str(error))
            continue
        if guard.seen(relative, line):
            continue
        records.append(
            common.ImageRecord(
                image=common.join(root, relative),
                image_id=relative,
                patient_id=row["PatientID"],
                study_id=row["AccessionNumber"],
                view=common.normalise_view(row["ViewPosition"]),
                sex=common.normalise_sex(row.get("PatientSex", "")),
                age=common.parse_age(row.get("PatientAge", "")),
                labels=labels,
            )
        )
    return common.AdapterOutput(records, findings, [str(path)], rows.count, problems)
