"""PadChest (BIMCV, Hospital San Juan, Alicante).

Layout as distributed (root = the download folder):
  PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz): one row per image; columns used:
    ImageID, ImageDir, StudyDate_DICOM, StudyID, PatientID, PatientBirth, PatientSex_DICOM,
    ViewPosition_DICOM, Projection, Labels (others: Report, MethodLabel, Localizations, ...).
    Labels is a Python list literal, e.g. "['pleural effusion', 'cardiomegaly']" (blank for a
    few images).
  <ImageDir>/<ImageID>: ImageDir is the number of the zip (0..54) the image came in; a flat
    folder (root/<ImageID>, as in the resized releases) is also accepted.
Views from Projection (PA, AP, AP_horizontal -> AP, L -> lateral, COSTAL/EXCLUDE/UNK -> other
or unknown), falling back to ViewPosition_DICOM. Age = study year - PatientBirth. No official
split. Findings: one 0/1 column per distinct label (sorted); rows with blank Labels get blank
(unknown) findings.
"""

from __future__ import annotations

import ast

from etils import epath

from data_prep.adapters import common

CSV_NAMES = ("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",)
REQUIRED = (
    "ImageID",
    "ImageDir",
    "StudyID",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "Projection",
    "Labels",
)


def find_csv(root: epath.Path) -> epath.Path:
    path = common.find_file([root], CSV_NAMES)
    if path is not None:
        return path
    others = sorted(
        p
        for p in root.iterdir()
        if p.name.upper().startswith("PADCHEST_") and p.name.lower().endswith((".csv", ".csv.gz"))
    )
    if not others:
        raise FileNotFoundError(f"PadChest labels CSV {CSV_NAMES[0]}(.gz) not in {root}")
    return others[0]


def parse_labels(raw: str) -> list[str] | None:
    """ "['a', ' b']" -> ['a', 'b']; blank -> None (unknown).

    Raises:
      ValueError: not a list of strings.
    """
    if not raw.strip() or raw.strip().lower() == "nan":
        return None
    try:
        value = ast.literal_eval(raw)
    except (SyntaxError, ValueError) as error:
        raise ValueError(f"Labels {raw[:60]!r} is not a Python list") from error
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"Labels {raw[:60]!r} is not a list of strings")
    # A comma would split the name in `evaluate --label a,b`.
    return [v.strip().replace(",", ";") for v in value if v.strip()]


def age_at_study(birth: str, study_date: str) -> str:
    try:
        return common.parse_age(str(int(study_date.strip()[:4]) - int(float(birth))))
    except ValueError:
        return ""


def load(root: epath.Path, policy: common.LabelPolicy) -> common.AdapterOutput:
    del policy  # PadChest labels are present/absent only
    problems = common.Problems()
    path = find_csv(root)
    _, rows = common.read_csv(path, problems, REQUIRED)
    guard = common.DuplicateGuard(problems, path.name)
    records, found_labels, unlabelled = [], [], 0
    for line, row in rows:
        image_id = row["ImageID"]
        if not image_id:
            problems.unreadable(path.name, line, "empty ImageID")
            continue
        try:
            labels = parse_labels(row["Labels"])
        except ValueError as error:
            problems.unreadable(path.name, line, str(error))
            continue
        if guard.seen(image_id, line):
            continue
        unlabelled += labels is None
        folder = common.integer_text(row["ImageDir"])
        view = common.normalise_view(row["Projection"])
        if not view:
            view = common.normalise_view(row.get("ViewPosition_DICOM", ""))
        records.append(
            common.ImageRecord(
                image=common.join(root, f"{folder}/{image_id}")
                if folder
                else common.join(root, image_id),
                image_id=image_id,
                patient_id=row["PatientID"],
                study_id=row["StudyID"],
                view=view,
                sex=common.normalise_sex(row["PatientSex_DICOM"]),
                age=age_at_study(row["PatientBirth"], row.get("StudyDate_DICOM", "")),
                alternatives=(common.join(root, image_id),) if folder else (),
            )
        )
        found_labels.append(labels)
    findings = sorted({label for labels in found_labels if labels for label in labels})
    for record, labels in zip(records, found_labels):
        if labels is None:
            record.labels = dict.fromkeys(findings, common.UNKNOWN)
        else:
            present = set(labels)
            record.labels = {
                f: common.POSITIVE if f in present else common.NEGATIVE for f in findings
            }
    if unlabelled:
        problems.notes.append(f"{unlabelled} images with blank Labels: findings left blank")
    return common.AdapterOutput(records, findings, [str(path)], rows.count, problems)
