"""CheXpert v1.0 and CheXpert-v1.0-small (Stanford ML Group).

Layout as distributed (root = the unzipped CheXpert-v1.0 or CheXpert-v1.0-small folder):
  train.csv, valid.csv
  train/patient00001/study1/view1_frontal.jpg, valid/patient64541/study1/view1_frontal.jpg
Header: Path,Sex,Age,Frontal/Lateral,AP/PA,<14 observations>, e.g.
  CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,...
`Path` starts with the dataset folder's own name, so it is resolved from its train/valid
component on, relative to root (the folder may have been renamed). Observations are 1.0
positive, 0.0 negative, -1.0 uncertain, blank not mentioned. Splits: train.csv -> train,
valid.csv -> val (the test set was released separately and is not read here).
"""

from __future__ import annotations

import re

from etils import epath

from data_prep.adapters import common

METADATA_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
SPLIT_FILES = (("train.csv", "train"), ("valid.csv", "val"))
SPLIT_FOLDERS = ("train", "valid", "test")


def image_location(root: epath.Path, csv_path: str) -> str:
    """Where `Path` points, relative to root from its train/valid/test component on."""
    parts = [part for part in csv_path.replace("\\", "/").split("/") if part]
    for index, part in enumerate(parts):
        if part in SPLIT_FOLDERS:
            return common.join(root, "/".join(parts[index:]))
    return common.join(root, "/".join(parts))


def view_of(frontal_lateral: str, ap_pa: str) -> str:
    """'Lateral' -> 'lateral'; 'Frontal' -> the AP/PA column, normalised."""
    if frontal_lateral.strip().lower() == "lateral":
        return "lateral"
    if frontal_lateral.strip().lower() == "frontal":
        return common.normalise_view(ap_pa) or "other"
    return common.normalise_view(ap_pa)


def load(root: epath.Path, policy: common.LabelPolicy) -> common.AdapterOutput:
    problems = common.Problems()
    records: list[common.ImageRecord] = []
    findings: list[str] = []
    files, rows_read = [], 0
    for name, split in SPLIT_FILES:
        path = root / name
        if not path.exists():
            problems.notes.append(f"{name} not found in {root}: no '{split}' split")
            continue
        files.append(str(path))
        header, rows = common.read_csv(path, problems, METADATA_COLUMNS)
        file_findings = [column for column in header if column not in METADATA_COLUMNS]
        findings.extend(f for f in file_findings if f not in findings)
        guard = common.DuplicateGuard(problems, name)
        for line, row in rows:
            record = _record(root, row, split, file_findings, policy, problems, name, line)
            if record is not None and not guard.seen(record.image_id, line):
                records.append(record)
        rows_read += rows.count
    if not files:
        raise FileNotFoundError(f"neither train.csv nor valid.csv in {root}")
    absent = [f for f in common.CHEXPERT_FINDINGS if f not in findings]
    if absent:
        problems.notes.append(f"CheXpert observations absent from the header: {absent}")
    return common.AdapterOutput(records, findings, files, rows_read, problems)


def _record(root, row, split, findings, policy, problems, name, line):
    path = row["Path"]
    if not path:
        problems.unreadable(name, line, "empty Path")
        return None
    try:
        labels = {f: policy.apply(common.chexpert_value(row[f])) for f in findings}
    except ValueError as error:
        problems.unreadable(name, line, str(error))
        return None
    patient = re.search(r"(patient\d+)", path)
    study = re.search(r"(patient\d+)/(study\d+)", path)
    return common.ImageRecord(
        image=image_location(root, path),
        image_id=path,
        patient_id=patient.group(1) if patient else "",
        study_id=f"{study.group(1)}/{study.group(2)}" if study else "",
        view=view_of(row["Frontal/Lateral"], row["AP/PA"]),
        sex=common.normalise_sex(row["Sex"]),
        age=common.parse_age(row["Age"]),
        split=split,
        labels=labels,
    )
