"""MIMIC-CXR (DICOM) and MIMIC-CXR-JPG (PhysioNet).

MIMIC-CXR-JPG 2.0.0 / 2.1.0, root = physionet.org/files/mimic-cxr-jpg/<version>:
  mimic-cxr-2.0.0-metadata.csv(.gz): dicom_id,subject_id,study_id,
    PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime,
    ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,
    PatientOrientationCodeSequence_CodeMeaning  (one row per image)
  mimic-cxr-2.0.0-chexpert.csv(.gz), mimic-cxr-2.0.0-negbio.csv(.gz): subject_id,study_id,
    <14 CheXpert observations>  (one row per study; 1.0 / 0.0 / -1.0 / blank)
  mimic-cxr-2.0.0-split.csv(.gz): dicom_id,study_id,subject_id,split  (train/validate/test)
  files/p10/p10000032/s50414267/<dicom_id>.jpg  (p + first two digits of subject_id)
MIMIC-CXR 2.0.0 / 2.1.0 (DICOM), root = physionet.org/files/mimic-cxr/<version>:
  cxr-record-list.csv.gz: subject_id,study_id,dicom_id,path  (path = files/pXX/.../<id>.dcm)
  cxr-study-list.csv.gz: subject_id,study_id,path  (reports; not needed here)
The DICOM release has no labels, views or splits of its own: they are joined from the JPG
release's metadata / chexpert (or negbio) / split files when found in root or --metadata-dir.
Neither release has sex or age (they live in MIMIC-IV); for DICOM inputs data_prep.build reads
them from the DICOM tags. Splits: train -> train, validate -> val, test -> test.
"""

from __future__ import annotations

from collections.abc import Sequence

from etils import epath

from data_prep.adapters import common

PREFIX = "mimic-cxr-2.0.0-"
LABELERS = ("chexpert", "negbio")
SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}


def jpg_location(root: epath.Path, subject_id: str, study_id: str, dicom_id: str) -> str:
    """files/p{first two digits}/p{subject}/s{study}/{dicom}.jpg under root."""
    return common.join(root, f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg")


def _study_labels(
    path: epath.Path | None, policy: common.LabelPolicy, problems: common.Problems
) -> tuple[dict[tuple[str, str], dict[str, str]], list[str]]:
    """(subject_id, study_id) -> labels, and the finding columns in header order."""
    if path is None:
        return {}, []
    header, rows = common.read_csv(path, problems, ("subject_id", "study_id"))
    findings = [c for c in header if c not in ("subject_id", "study_id")]
    labels = {}
    for line, row in rows:
        try:
            values = {f: policy.apply(common.chexpert_value(row[f])) for f in findings}
        except ValueError as error:
            problems.unreadable(path.name, line, str(error))
            continue
        key = (common.integer_text(row["subject_id"]), common.integer_text(row["study_id"]))
        if key in labels:
            problems.duplicates.append(
                {"id": f"s{key[1]}", "file": path.name, "line": line, "first_line": None}
            )
            continue
        labels[key] = values
    return labels, findings


def _splits(path: epath.Path | None, problems: common.Problems) -> dict[str, str]:
    """dicom_id -> train / val / test."""
    if path is None:
        return {}
    _, rows = common.read_csv(path, problems, ("dicom_id", "split"))
    splits = {}
    for line, row in rows:
        split = SPLIT_NAMES.get(row["split"].lower())
        if split is None:
            problems.unreadable(path.name, line, f"unknown split {row['split']!r}")
            continue
        splits[row["dicom_id"]] = split
    return splits


def _views(path: epath.Path | None, problems: common.Problems) -> dict[str, str]:
    """dicom_id -> normalised ViewPosition."""
    if path is None:
        return {}
    _, rows = common.read_csv(path, problems, ("dicom_id", "ViewPosition"))
    return {row["dicom_id"]: common.normalise_view(row["ViewPosition"]) for _, row in rows}


def _side_files(folders: Sequence[epath.Path], labeler: str) -> dict[str, epath.Path | None]:
    if labeler not in LABELERS:
        raise ValueError(f"labeler must be one of {LABELERS}, got {labeler!r}")
    return {
        "labels": common.find_file(folders, [f"{PREFIX}{labeler}.csv"]),
        "split": common.find_file(folders, [f"{PREFIX}split.csv"]),
    }


def _finish(
    records: list[common.ImageRecord],
    labels: dict[tuple[str, str], dict[str, str]],
    findings: list[str],
    problems: common.Problems,
    labels_path: epath.Path | None,
    labeler: str,
) -> None:
    """Attach study labels (blank when the study has no labels row) and note what is absent."""
    blank = dict.fromkeys(findings, common.UNKNOWN)
    unlabelled = 0
    for record in records:
        subject_id, study_id = record.patient_id, record.study_id
        study = labels.get((subject_id, study_id))
        if study is None:
            unlabelled += 1
        record.labels = dict(study if study is not None else blank)
    if labels_path is None:
        problems.notes.append(f"no {PREFIX}{labeler}.csv(.gz) found: no finding columns")
    elif unlabelled:
        problems.notes.append(f"{unlabelled} images whose study has no {labeler} row (blank)")


def load_jpg(
    root: epath.Path,
    policy: common.LabelPolicy,
    labeler: str = "chexpert",
    metadata_dir: epath.Path | None = None,
) -> common.AdapterOutput:
    folders = [root] + ([metadata_dir] if metadata_dir else [])
    problems = common.Problems()
    metadata = common.require_file(folders, [f"{PREFIX}metadata.csv"], "MIMIC-CXR-JPG metadata")
    side = _side_files(folders, labeler)
    labels, findings = _study_labels(side["labels"], policy, problems)
    splits = _splits(side["split"], problems)
    if side["split"] is None:
        problems.notes.append(f"no {PREFIX}split.csv(.gz) found: split left blank")
    _, rows = common.read_csv(
        metadata, problems, ("dicom_id", "subject_id", "study_id", "ViewPosition")
    )
    guard = common.DuplicateGuard(problems, metadata.name)
    records = []
    for line, row in rows:
        dicom_id = row["dicom_id"]
        subject_id = common.integer_text(row["subject_id"])
        study_id = common.integer_text(row["study_id"])
        if not (dicom_id and subject_id and study_id):
            problems.unreadable(metadata.name, line, "empty dicom_id, subject_id or study_id")
            continue
        if guard.seen(dicom_id, line):
            continue
        records.append(
            common.ImageRecord(
                image=jpg_location(root, subject_id, study_id, dicom_id),
                image_id=dicom_id,
                patient_id=subject_id,
                study_id=study_id,
                view=common.normalise_view(row["ViewPosition"]),
                split=splits.get(dicom_id, ""),
            )
        )
    _finish(records, labels, findings, problems, side["labels"], labeler)
    files = [str(p) for p in (metadata, side["labels"], side["split"]) if p is not None]
    return common.AdapterOutput(records, findings, files, rows.count, problems)


def load_dicom(
    root: epath.Path,
    policy: common.LabelPolicy,
    labeler: str = "chexpert",
    metadata_dir: epath.Path | None = None,
) -> common.AdapterOutput:
    folders = [root] + ([metadata_dir] if metadata_dir else [])
    problems = common.Problems()
    record_list = common.require_file(folders, ["cxr-record-list.csv"], "MIMIC-CXR record list")
    side = _side_files(folders, labeler)
    view_file = common.find_file(folders, [f"{PREFIX}metadata.csv"])
    labels, findings = _study_labels(side["labels"], policy, problems)
    splits = _splits(side["split"], problems)
    views = _views(view_file, problems)
    for path, what in ((view_file, "view"), (side["split"], "split")):
        if path is None:
            problems.notes.append(f"no MIMIC-CXR-JPG file for the {what} found: left blank")
    _, rows = common.read_csv(record_list, problems, ("subject_id", "study_id", "dicom_id", "path"))
    guard = common.DuplicateGuard(problems, record_list.name)
    records = []
    for line, row in rows:
        dicom_id, relative = row["dicom_id"], row["path"]
        if not (dicom_id and relative):
            problems.unreadable(record_list.name, line, "empty dicom_id or path")
            continue
        if guard.seen(dicom_id, line):
            continue
        records.append(
            common.ImageRecord(
                image=common.join(root, relative),
                image_id=dicom_id,
                patient_id=common.integer_text(row["subject_id"]),
                study_id=common.integer_text(row["study_id"]),
                view=views.get(dicom_id, ""),
                split=splits.get(dicom_id, ""),
            )
        )
    _finish(records, labels, findings, problems, side["labels"], labeler)
    files = [
        str(p) for p in (record_list, view_file, side["labels"], side["split"]) if p is not None
    ]
    return common.AdapterOutput(records, findings, files, rows.count, problems)
