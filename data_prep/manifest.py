"""Make a manifest CSV for `data_prep.build` from a public chest-radiograph dataset (issue 13).

    python -m data_prep.manifest --dataset NAME --root DIR --out manifest.csv \
        [--frontal-only | --views PA,AP,lateral,other] [--uncertain keep|positive|negative|blank]
        [--unmentioned blank|negative] [--labeler chexpert|negbio] [--metadata-dir DIR]
        [--brax-images PngPath|DicomPath] [--no-check-files] [--workers 16]
    python -m data_prep.build --input manifest.csv --output DATA_DIR --name NAME

NAME is one of mimic-cxr (DICOM), mimic-cxr-jpg, chexpert, chexpert-small, nih-cxr14, padchest,
brax; DIR is the dataset folder as downloaded (local or gs://). Each adapter reads the dataset's
own metadata files in their published layout; data_prep/adapters/<family>.py documents it.

Manifest: one row per image, columns
  path        image location, relative to the manifest's folder when it lies below it, else
              absolute (or the gs:// URL); build resolves relative paths against that folder.
  source      the dataset name.
  split       train / val / test from the official split (MIMIC: validate -> val; CheXpert:
              valid.csv -> val; NIH: train_val_list -> train), blank where the dataset has none
              (build then puts the image in 'train'; evaluate carves val/test by patient).
  patient_id  (build uses it as the record's patient id), study_id, image_id (the dataset's
              id of the image), view (PA / AP / lateral / other / blank), sex (M / F / O /
              blank), age (years, blank if unknown).
  <findings>  one column per finding, named as the dataset spells it ('Pleural Effusion',
              'Pleural_Thickening', PadChest's lower-case terms).
Finding values: 1 positive, 0 negative, -1 uncertain, blank not mentioned / unknown.
data_prep.build types a column int64 when every value is an integer and float32 when some are
blank (blank -> NaN), so -1 (uncertain) and blank (NaN) stay distinct in the records;
raddino_jax.evaluate treats both as unknown and drops them per label. --uncertain and
--unmentioned rewrite them instead (e.g. the U-Ones policy: --uncertain positive).
Build stores label columns under their own names ('Pleural Effusion' included, so
`evaluate --label "Pleural Effusion"` finds it), except columns named like a built-in feature:
`sex` -> `label_sex` and `source` -> `label_source` (the builder's `label_feature_name`).

Filters: --frontal-only keeps PA and AP; --views keeps the listed views ('' = unknown view).
Images not found on disk (each path checked, --workers threads; --no-check-files skips it),
metadata rows that cannot be parsed and repeated image ids are left out and listed in
OUT.report.json (see `make_report`); one summary line is printed.

Layouts and column names were checked against stored copies of public material (search
corpora of this project, 2026); each adapter module repeats what it relies on:
  CheXpert(-small): the real train.csv header and rows shipped by mlmed/torchxrayvision
    (torchxrayvision/data/chexpert_train.csv.gz: Path,Sex,Age,Frontal/Lateral,AP/PA, 14
    observations, 1.0/0.0/-1.0/blank, Path prefixed 'CheXpert-v1.0-small/'); valid.csv and the
    valid/ folder from its CheX_Dataset loader.
  NIH ChestX-ray14: the real Data_Entry_2017_v2020.csv.gz and Data_Entry_2017.csv.gz shipped by
    torchxrayvision (headers, '|' labels, padded ids and '058Y' ages in 2017, trailing header
    comma, CRLF); images_001..012 archives (NIH/Kaggle dataset page); train_val_list.txt and
    test_list.txt (public loaders). Not seen in a source: the one-name-per-line format of the
    lists and the images_XXX/images/ nesting (nested and flat images_XXX/ both accepted).
  MIMIC-CXR-JPG: PhysioNet project pages (2.0.0, 2.1.0; abstracts only); the -split, -metadata
    and -chexpert .csv.gz names in public download instructions; the metadata header in a
    public generator of mimic-cxr-2.0.0-metadata.csv; the -chexpert header and the split values
    train/validate/test in public loaders; files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg in
    torchxrayvision's MIMIC_Dataset.
  MIMIC-CXR (DICOM): cxr-record-list (subject_id,study_id,dicom_id,path with files/.../*.dcm)
    and cxr-study-list (subject_id,study_id,path) in a public SQL schema and loaders.
  PadChest: the BIMCV README (field list, Labels as a Python list literal); the CSV name,
    Projection 'AP_horizontal' and ImageDir/ImageID paths in torchxrayvision and other public
    loaders. Not seen in a source: Projection 'L' for laterals (from memory of the data).
  BRAX: a description paraphrasing the PhysioNet page (openmedlab Awesome-Medical-Dataset:
    field meanings, 5-year age groups with '85 or more', sex M/F/O, label codes);
    master_spreadsheet_update.csv, PngPath relative to the dataset folder,
    ViewPosition values (PA, AP, 'AP LLD', L, RL, LT-DECUB, RLO, blank) and the column order
    (8 columns, the 14 labels, 4 more) in public loaders. Not seen: the DICOM path column's
    name (assumed DicomPath; the default --brax-images PngPath is verified).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import io
import json
import os
from collections.abc import Sequence
from typing import Any

from etils import epath

from data_prep import adapters
from data_prep.adapters import common

FIXED_COLUMNS = (
    "path",
    "source",
    "split",
    "patient_id",
    "study_id",
    "image_id",
    "view",
    "sex",
    "age",
)
UNCERTAIN_CHOICES = {"keep": None, "positive": "1", "negative": "0", "blank": ""}
UNMENTIONED_CHOICES = {"blank": None, "negative": "0"}
REPORT_SUFFIX = ".report.json"


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def finding_columns(findings: Sequence[str]) -> dict[str, str]:
    """Finding -> manifest column; 'finding_<name>' where a name equals a fixed column."""
    return {f: f"finding_{f}" if f in FIXED_COLUMNS else f for f in findings}


def manifest_path(image: str, manifest_dir: str) -> str:
    """`image` relative to the manifest's folder when below it, else as given."""
    prefix = manifest_dir.rstrip("/") + "/"
    return image[len(prefix) :] if image.startswith(prefix) else image


def keep_view(view: str, views: set[str] | None) -> bool:
    return views is None or view in views


def parse_views(text: str) -> set[str]:
    """'PA,AP' -> {'PA', 'AP'}; names are matched case-insensitively, 'unknown' = ''."""
    spelled = {v.lower(): v for v in common.VIEWS if v} | {"unknown": "", "": ""}
    views = set()
    for name in text.split(","):
        key = name.strip().lower()
        if key not in spelled:
            raise ValueError(f"--views: {name!r} is not one of PA, AP, lateral, other, unknown")
        views.add(spelled[key])
    return views


def locate(record: common.ImageRecord) -> str | None:
    """The first existing of record.image and its alternatives (None if none exists)."""
    if record.on_disk is not None:
        return record.image if record.on_disk else None
    for candidate in (record.image, *record.alternatives):
        if epath.Path(candidate).exists():
            return candidate
    return None


def locate_all(records: Sequence[common.ImageRecord], workers: int) -> list[str | None]:
    """`locate` for every record, on a thread pool (existence checks are I/O bound)."""
    if workers <= 1:
        return [locate(r) for r in records]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(locate, records))


def manifest_rows(
    output: common.AdapterOutput,
    source: str,
    columns: dict[str, str],
    images: Sequence[str],
    records: Sequence[common.ImageRecord],
    manifest_dir: str,
) -> list[dict[str, str]]:
    rows = []
    for record, image in zip(records, images):
        row = {
            "path": manifest_path(image, manifest_dir),
            "source": source,
            "split": record.split,
            "patient_id": record.patient_id,
            "study_id": record.study_id,
            "image_id": record.image_id,
            "view": record.view,
            "sex": record.sex,
            "age": record.age,
        }
        for finding in output.findings:
            row[columns[finding]] = record.labels.get(finding, common.UNKNOWN)
        rows.append(row)
    return rows


def csv_text(rows: Sequence[dict[str, str]], header: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(header), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def make_report(
    args: argparse.Namespace,
    output: common.AdapterOutput,
    rows: Sequence[dict[str, str]],
    columns: dict[str, str],
    missing: Sequence[str],
    excluded_by_view: int,
) -> dict[str, Any]:
    """The report: counts, per-split / per-view / per-finding value counts, problem lists.

    counts.records (images the metadata names, after unreadable rows and duplicates) ==
    written + missing_images + excluded_by_view.
    """
    value_counts = {
        columns[f]: dict(sorted(collections.Counter(row[columns[f]] for row in rows).items()))
        for f in output.findings
    }
    counts = {
        "metadata_rows": output.metadata_rows,
        "unreadable_rows": len(output.problems.unreadable_rows),
        "duplicates": len(output.problems.duplicates),
        "records": len(output.records),
        "excluded_by_view": excluded_by_view,
        "missing_images": len(missing),
        "written": len(rows),
    }
    assert counts["records"] == counts["written"] + len(missing) + excluded_by_view, counts
    return {
        "dataset": args.dataset,
        "root": args.root,
        "manifest": args.out,
        "options": {
            "views": args.views,
            "frontal_only": args.frontal_only,
            "uncertain": args.uncertain,
            "unmentioned": args.unmentioned,
            "labeler": args.labeler,
            "metadata_dir": args.metadata_dir,
            "brax_images": args.brax_images,
            "check_files": not args.no_check_files,
        },
        "metadata_files": output.metadata_files,
        "counts": counts,
        "splits": dict(sorted(collections.Counter(r["split"] for r in rows).items())),
        "views": dict(sorted(collections.Counter(r["view"] for r in rows).items())),
        "finding_columns": [columns[f] for f in output.findings],
        "finding_values": value_counts,
        "build_feature_names": {"sex": "label_sex", "source": "label_source"},
        "notes": output.problems.notes,
        "missing_images": list(missing),
        "unreadable_rows": output.problems.unreadable_rows,
        "duplicates": output.problems.duplicates,
    }


def summary_line(report: dict[str, Any]) -> str:
    counts = report["counts"]
    splits = ", ".join(f"{k or '(none)'} {v}" for k, v in report["splits"].items())
    return (
        f"{report['dataset']}: {counts['metadata_rows']} metadata rows -> {counts['written']} "
        f"images in {report['manifest']} ({splits}); {counts['missing_images']} missing, "
        f"{counts['unreadable_rows']} unreadable rows, {counts['duplicates']} duplicates, "
        f"{counts['excluded_by_view']} excluded by view; report "
        f"{report['manifest']}{REPORT_SUFFIX}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.manifest", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dataset", required=True, choices=sorted(adapters.DATASETS))
    parser.add_argument("--root", required=True, help="dataset folder as downloaded (or gs://)")
    parser.add_argument("--out", required=True, help="manifest CSV to write (local or gs://)")
    views = parser.add_mutually_exclusive_group()
    views.add_argument("--frontal-only", action="store_true", help="keep PA and AP views")
    views.add_argument("--views", default="", help="comma-separated: PA,AP,lateral,other,unknown")
    parser.add_argument(
        "--uncertain",
        default="keep",
        choices=sorted(UNCERTAIN_CHOICES),
        help="write -1 (uncertain) as is, or as 1 / 0 / blank",
    )
    parser.add_argument(
        "--unmentioned",
        default="blank",
        choices=sorted(UNMENTIONED_CHOICES),
        help="write unmentioned findings blank, or as 0",
    )
    parser.add_argument(
        "--labeler",
        default="chexpert",
        choices=("chexpert", "negbio"),
        help="MIMIC: which mimic-cxr-2.0.0-<labeler>.csv to read",
    )
    parser.add_argument(
        "--metadata-dir", default="", help="MIMIC: another folder with the MIMIC-CXR-JPG csv files"
    )
    parser.add_argument("--brax-images", default="PngPath", choices=("PngPath", "DicomPath"))
    parser.add_argument(
        "--no-check-files", action="store_true", help="do not check that images exist"
    )
    parser.add_argument("--workers", type=int, default=16, help="threads checking files")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point: write the manifest and its report, print the summary, return the report."""
    args = parse_args(argv)
    args.root, args.out = _absolute(args.root), _absolute(args.out)
    policy = common.LabelPolicy(
        uncertain=UNCERTAIN_CHOICES[args.uncertain],
        unmentioned=UNMENTIONED_CHOICES[args.unmentioned],
    )
    output = adapters.load(
        args.dataset,
        args.root,
        policy,
        labeler=args.labeler,
        metadata_dir=_absolute(args.metadata_dir) if args.metadata_dir else None,
        brax_images=args.brax_images,
    )
    views = (
        set(common.FRONTAL_VIEWS)
        if args.frontal_only
        else (parse_views(args.views) if args.views else None)
    )
    kept = [r for r in output.records if keep_view(r.view, views)]
    if args.no_check_files:
        located = [r.image for r in kept]
    else:
        located = locate_all(kept, args.workers)
    missing = [r.image for r, image in zip(kept, located) if image is None]
    present = [(r, image) for r, image in zip(kept, located) if image is not None]

    columns = finding_columns(output.findings)
    out = epath.Path(args.out)
    rows = manifest_rows(
        output,
        args.dataset,
        columns,
        [image for _, image in present],
        [record for record, _ in present],
        str(out.parent),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(csv_text(rows, [*FIXED_COLUMNS, *columns.values()]))
    report = make_report(args, output, rows, columns, missing, len(output.records) - len(kept))
    epath.Path(args.out + REPORT_SUFFIX).write_text(json.dumps(report, indent=2))
    print(summary_line(report))
    return report


if __name__ == "__main__":
    main()
