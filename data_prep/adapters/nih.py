"""NIH ChestX-ray14 (NIH Clinical Center; also mirrored on Kaggle as nih-chest-xrays/data).

Layout as distributed (root = the download folder):
  Data_Entry_2017_v2020.csv (current) or Data_Entry_2017.csv (original; the v2020 file wins)
    Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,
    View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]
    e.g. 00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143
    The 2017 file pads ids and ages ('00000001', '058Y') and ends its header with a comma.
  train_val_list.txt, test_list.txt: one Image Index per line (the official patient-wise
    split; there is no official validation split, so train_val -> 'train').
  Images: images/<Image Index> (Box: images_001.tar.gz ... each unpacks to images/) or
    images_001/images/<Image Index> ... images_012/images/ (Kaggle).
Findings: 'Finding Labels' is '|'-separated; one 0/1 column per finding, the 14 published
ones plus 'No Finding' (any other name found gets its own column and a note).
"""

from __future__ import annotations

from etils import epath

from data_prep.adapters import common

ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
SPLIT_FILES = (("train_val_list.txt", "train"), ("test_list.txt", "test"))
REQUIRED = (
    "Image Index",
    "Finding Labels",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
)
FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
    "No Finding",
)


def image_index(root: epath.Path) -> dict[str, str]:
    """Image file name -> location, from images/ and images_*/images/ (or images_*/)."""
    folders = []
    if (root / "images").is_dir():
        folders.append(root / "images")
    for child in sorted(root.iterdir()):
        if child.name.startswith("images_") and child.is_dir():
            nested = child / "images"
            folders.append(nested if nested.is_dir() else child)
    found: dict[str, str] = {}
    for folder in folders:
        for path in folder.iterdir():
            found.setdefault(path.name, str(path))
    return found


def official_splits(root: epath.Path, problems: common.Problems) -> dict[str, str]:
    splits: dict[str, str] = {}
    for name, split in SPLIT_FILES:
        path = root / name
        if not path.exists():
            problems.notes.append(f"{name} not found: its images get a blank split")
            continue
        for line in common.read_text(path).splitlines():
            if line.strip():
                splits[line.strip()] = split
    return splits


def load(root: epath.Path, policy: common.LabelPolicy) -> common.AdapterOutput:
    del policy  # NIH labels are 0/1 only
    problems = common.Problems()
    entries = common.require_file([root], ENTRY_FILES, "NIH ChestX-ray14 Data_Entry")
    splits = official_splits(root, problems)
    on_disk = image_index(root)
    if not on_disk:
        problems.notes.append(f"no images found under {root}/images or {root}/images_*/")
    _, rows = common.read_csv(entries, problems, REQUIRED)
    guard = common.DuplicateGuard(problems, entries.name)
    findings = list(FINDINGS)
    records = []
    for line, row in rows:
        name = row["Image Index"]
        if not name:
            problems.unreadable(entries.name, line, "empty Image Index")
            continue
        if guard.seen(name, line):
            continue
        present = {f.strip() for f in row["Finding Labels"].split("|") if f.strip()}
        if not present:
            problems.unreadable(entries.name, line, "empty Finding Labels")
            continue
        for finding in sorted(present - set(findings)):
            findings.append(finding)
            problems.notes.append(f"finding {finding!r} is not one of the published 15")
        patient = common.integer_text(row["Patient ID"])
        records.append(
            common.ImageRecord(
                image=on_disk.get(name, common.join(root, f"images/{name}")),
                image_id=name,
                patient_id=patient,
                study_id=name.rsplit(".", 1)[0],  # <patient>_<follow-up>: one image per visit
                view=common.normalise_view(row["View Position"]),
                sex=common.normalise_sex(row["Patient Gender"]),
                age=common.parse_age(row["Patient Age"]),
                split=splits.get(name, ""),
                labels={f: common.POSITIVE for f in present},
                on_disk=name in on_disk,
            )
        )
    for record in records:
        record.labels = {f: record.labels.get(f, common.NEGATIVE) for f in findings}
    return common.AdapterOutput(records, findings, [str(entries)], rows.count, problems)
