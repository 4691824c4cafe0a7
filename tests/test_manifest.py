"""Manifest adapters against miniature replicas of each dataset's published layout.

Each replica writes the dataset's real header row (column names as distributed), a few rows per
case (uncertain and blank labels, a missing image, a duplicate id, a lateral view, a malformed
row) and tiny images generated here. The last test feeds a manifest to data_prep.build.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import zlib

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from data_prep import manifest
from data_prep.adapters import common

CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
    "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
    "Pleural Effusion,Pleural Other,Fracture,Support Devices"
)
MIMIC_LABEL_HEADER = (
    "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,"
    "Enlarged Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,"
    "Pleural Other,Pneumonia,Pneumothorax,Support Devices"
)
MIMIC_METADATA_HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
    "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning"
)
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
PADCHEST_COLUMNS = (
    "ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,"
    "ViewPosition_DICOM,Projection,MethodProjection,Pediatric,Modality_DICOM,Manufacturer_DICOM,"
    "PhotometricInterpretation_DICOM,PixelRepresentation_DICOM,PixelAspectRatio_DICOM,"
    "SpatialResolution_DICOM,BitsStored_DICOM,WindowCenter_DICOM,WindowWidth_DICOM,Rows_DICOM,"
    "Columns_DICOM,XRayTubeCurrent_DICOM,Exposure_DICOM,ExposureInuAs_DICOM,ExposureTime,"
    "RelativeXRayExposure_DICOM,ReportID,Report,MethodLabel,Labels,Localizations,"
    "LabelsLocalizationsBySentence,labelCUIS,LocalizationsCUIS"
).split(",")
BRAX_LABELS = (
    "No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Lesion,Lung Opacity,Edema,"
    "Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,"
    "Support Devices"
)
BRAX_HEADER = (
    f",DicomPath,PngPath,PatientID,PatientSex,PatientAge,AccessionNumber,StudyDate,"
    f"{BRAX_LABELS},ViewPosition,Rows,Columns,Manufacturer"
)


# ------------------------------------------------------------------------------------------
# Replica helpers
# ------------------------------------------------------------------------------------------


def _pixels(path) -> np.ndarray:
    """Tiny distinct pixels per file (data_prep.build drops exact pixel duplicates)."""
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    return rng.integers(0, 256, size=(24, 20), dtype=np.uint8)


def write_image(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix, _pixels(path))
    assert ok
    path.write_bytes(data.tobytes())


def write_dicom(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.ViewPosition = "CR", "10000032", "PA"
    pixels = _pixels(path).astype(np.uint16) * 16
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_text(path, lines, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


def run(tmp_path, dataset, root, *extra, out=None):
    """Run the CLI; return (manifest rows + 'resolved' image location, header, report)."""
    out = out or tmp_path / f"{dataset}.csv"
    report = manifest.main(
        ["--dataset", dataset, "--root", str(root), "--out", str(out), "--workers", "2", *extra]
    )
    with open(out, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    for row in rows:  # as data_prep.build resolves it
        row["resolved"] = str(out.parent / row["path"])
    assert json.loads(out.with_name(f"{out.name}.report.json").read_text()) == report
    return rows, reader.fieldnames, report


def by(rows, column):
    return {row[column]: row for row in rows}


# ------------------------------------------------------------------------------------------
# CheXpert
# ------------------------------------------------------------------------------------------


def chexpert_replica(tmp_path, folder: str):
    root = tmp_path / folder
    p1 = f"{folder}/train/patient00001/study1/view1_frontal.jpg"
    p2 = f"{folder}/train/patient00002/study2/view1_frontal.jpg"
    p2l = f"{folder}/train/patient00002/study2/view2_lateral.jpg"
    p3 = f"{folder}/train/patient00003/study1/view1_frontal.jpg"  # never written: missing
    pv = f"{folder}/valid/patient64541/study1/view1_frontal.jpg"
    write_text(
        root / "train.csv",
        [
            CHEXPERT_HEADER,
            f"{p1},Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
            f"{p2},Female,87,Frontal,PA,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,",
            f"{p2l},Female,87,Lateral,,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,",
            f"{p3},Male,45,Frontal,AP,,,,,,,,,,,1.0,,,",
            f"{p1},Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",  # duplicate Path
            f"{folder}/train/patient00004/study1/view1_frontal.jpg,Male,50,Frontal",  # too short
        ],
    )
    write_text(
        root / "valid.csv",
        [
            CHEXPERT_HEADER,
            f"{pv},Male,73,Frontal,AP,0.0,1.0,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0,0.0,0.0",
        ],
    )
    for relative in (p1, p2, p2l, pv):
        write_image(root / relative.split("/", 1)[1])
    return root


@pytest.mark.parametrize(
    "dataset,folder",
    [
        ("chexpert-small", "CheXpert-v1.0-small"),
        ("chexpert", "CheXpert-v1.0"),
    ],
)
def test_chexpert(tmp_path, dataset, folder):
    root = chexpert_replica(tmp_path, folder)
    rows, header, report = run(tmp_path, dataset, root, out=root / "manifest.csv")
    assert header[:9] == list(manifest.FIXED_COLUMNS)
    assert header[9:] == CHEXPERT_HEADER.split(",")[5:]
    rows = by(rows, "image_id")
    assert len(rows) == 4
    first = rows[f"{folder}/train/patient00001/study1/view1_frontal.jpg"]
    # Manifest next to the images: paths relative to its folder, as build resolves them.
    assert first["path"] == "train/patient00001/study1/view1_frontal.jpg"
    assert first["patient_id"] == "patient00001" and first["study_id"] == "patient00001/study1"
    assert (first["sex"], first["age"], first["view"], first["split"]) == ("F", "68", "AP", "train")
    assert (first["No Finding"], first["Pneumothorax"], first["Pleural Effusion"]) == ("1", "0", "")
    second = rows[f"{folder}/train/patient00002/study2/view1_frontal.jpg"]
    assert second["view"] == "PA"
    assert (second["Cardiomegaly"], second["Lung Opacity"], second["Pleural Effusion"]) == (
        "-1",
        "1",
        "-1",
    )
    assert rows[f"{folder}/train/patient00002/study2/view2_lateral.jpg"]["view"] == "lateral"
    valid = rows[f"{folder}/valid/patient64541/study1/view1_frontal.jpg"]
    assert valid["split"] == "val" and valid["Pleural Effusion"] == "1" and valid["sex"] == "M"

    assert report["counts"] == {
        "metadata_rows": 7,
        "unreadable_rows": 1,
        "duplicates": 1,
        "records": 5,
        "excluded_by_view": 0,
        "missing_images": 1,
        "written": 4,
    }
    assert report["missing_images"] == [str(root / "train/patient00003/study1/view1_frontal.jpg")]
    assert report["duplicates"][0]["line"] == 6 and report["duplicates"][0]["first_line"] == 2
    assert report["unreadable_rows"] == [
        {"file": "train.csv", "line": 7, "reason": "4 fields, the header has 19"}
    ]
    assert report["splits"] == {"train": 3, "val": 1}
    assert report["finding_values"]["Pleural Effusion"] == {"": 1, "-1": 2, "1": 1}


def test_chexpert_filters_and_label_policy(tmp_path):
    root = chexpert_replica(tmp_path, "CheXpert-v1.0-small")
    rows, _, report = run(
        tmp_path,
        "chexpert-small",
        root,
        "--frontal-only",
        "--uncertain",
        "positive",
        "--unmentioned",
        "negative",
        out=tmp_path / "manifests/frontal.csv",
    )
    assert {row["view"] for row in rows} == {"AP", "PA"}
    assert report["counts"]["excluded_by_view"] == 1 and report["counts"]["written"] == 3
    assert report["finding_values"]["Pleural Effusion"] == {"0": 1, "1": 2}
    # Outside the manifest's folder: absolute paths.
    assert all(row["path"].startswith(str(root)) for row in rows)

    rows, _, report = run(tmp_path, "chexpert-small", root, "--views", "lateral")
    assert [row["view"] for row in rows] == ["lateral"]
    assert report["options"]["views"] == "lateral"


# ------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG and MIMIC-CXR (DICOM)
# ------------------------------------------------------------------------------------------

D1 = "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"
D2 = "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962"
D3 = "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab"
D4 = "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714"


def mimic_tables(folder, gz: bool) -> None:
    """metadata / chexpert / split files of MIMIC-CXR-JPG 2.0.0 (4 images, 3 studies)."""
    suffix = ".csv.gz" if gz else ".csv"
    write_text(
        folder / f"mimic-cxr-2.0.0-metadata{suffix}",
        [
            MIMIC_METADATA_HEADER,
            f"{D1},10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,"
            "CHEST (PA AND LAT),postero-anterior,Erect",
            f"{D2},10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544,21800506,213014.531,"
            "CHEST (PA AND LAT),lateral,Erect",
            f"{D3},11000011,51000011,CHEST (PORTABLE AP),AP,2544,3056,21830606,100000,"
            "CHEST (PORTABLE AP),antero-posterior,",
            f"{D4},11000011,52000022,CHEST (PORTABLE AP),AP,2544,3056,21830707,100000,"
            "CHEST (PORTABLE AP),antero-posterior,",
            f"{D1},10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,"
            "CHEST (PA AND LAT),postero-anterior,Erect",  # duplicate dicom_id
        ],
        gz=gz,
    )
    write_text(
        folder / f"mimic-cxr-2.0.0-chexpert{suffix}",
        [
            MIMIC_LABEL_HEADER,
            "10000032,50414267,,,,,,,,,1.0,,,,,",
            "11000011,51000011,-1.0,1.0,,0.0,,,,1.0,,-1.0,,,0.0,1.0",
            # study 52000022 has no labels row
        ],
        gz=gz,
    )
    write_text(
        folder / f"mimic-cxr-2.0.0-split{suffix}",
        [
            "dicom_id,study_id,subject_id,split",
            f"{D1},50414267,10000032,train",
            f"{D2},50414267,10000032,train",
            f"{D3},51000011,11000011,validate",
            f"{D4},52000022,11000011,test",
        ],
        gz=gz,
    )


def test_mimic_cxr_jpg(tmp_path):
    root = tmp_path / "physionet.org/files/mimic-cxr-jpg/2.0.0"
    mimic_tables(root, gz=True)
    write_image(root / f"files/p10/p10000032/s50414267/{D1}.jpg")
    write_image(root / f"files/p10/p10000032/s50414267/{D2}.jpg")
    write_image(root / f"files/p11/p11000011/s51000011/{D3}.jpg")  # D4 missing on disk
    rows, header, report = run(tmp_path, "mimic-cxr-jpg", root)
    assert header[9:] == MIMIC_LABEL_HEADER.split(",")[2:]
    rows = by(rows, "image_id")
    assert set(rows) == {D1, D2, D3}
    assert rows[D1]["resolved"] == str(root / f"files/p10/p10000032/s50414267/{D1}.jpg")
    assert (rows[D1]["patient_id"], rows[D1]["study_id"]) == ("10000032", "50414267")
    assert (rows[D1]["view"], rows[D2]["view"], rows[D3]["view"]) == ("PA", "lateral", "AP")
    assert (rows[D1]["split"], rows[D3]["split"]) == ("train", "val")
    assert rows[D1]["No Finding"] == "1" and rows[D1]["Pleural Effusion"] == ""
    assert (rows[D3]["Atelectasis"], rows[D3]["Pleural Effusion"], rows[D3]["Edema"]) == (
        "-1",
        "-1",
        "0",
    )
    assert rows[D1]["sex"] == rows[D1]["age"] == ""  # not in MIMIC-CXR (MIMIC-IV has them)
    assert report["counts"]["duplicates"] == 1 and report["duplicates"][0]["id"] == D1
    assert report["missing_images"] == [str(root / f"files/p11/p11000011/s52000022/{D4}.jpg")]
    assert any("no chexpert row" in note for note in report["notes"])


def test_mimic_cxr_dicom_joins_jpg_metadata(tmp_path):
    root = tmp_path / "mimic-cxr/2.0.0"
    jpg = tmp_path / "mimic-cxr-jpg/2.0.0"
    mimic_tables(jpg, gz=False)

    def record(subject, study, dicom):
        return f"{subject},{study},{dicom},files/p{subject[:2]}/p{subject}/s{study}/{dicom}.dcm"

    write_text(
        root / "cxr-record-list.csv.gz",
        [
            "subject_id,study_id,dicom_id,path",
            record("10000032", "50414267", D1),
            record("10000032", "50414267", D2),
            record("11000011", "51000011", D3),
            "11000011,52000022",  # malformed
        ],
        gz=True,
    )
    write_text(
        root / "cxr-study-list.csv.gz",
        [
            "subject_id,study_id,path",
            "10000032,50414267,files/p10/p10000032/s50414267.txt",
        ],
        gz=True,
    )
    write_dicom(root / f"files/p10/p10000032/s50414267/{D1}.dcm")
    write_dicom(root / f"files/p10/p10000032/s50414267/{D2}.dcm")
    rows, _, report = run(tmp_path, "mimic-cxr", root, "--metadata-dir", str(jpg), "--frontal-only")
    assert [row["image_id"] for row in rows] == [D1]
    row = rows[0]
    assert row["resolved"] == str(root / f"files/p10/p10000032/s50414267/{D1}.dcm")
    assert pydicom.dcmread(row["resolved"]).ViewPosition == "PA"
    assert (row["view"], row["split"], row["No Finding"], row["source"]) == (
        "PA",
        "train",
        "1",
        "mimic-cxr",
    )
    assert report["counts"]["excluded_by_view"] == 1  # D2 is lateral
    assert report["missing_images"] == [str(root / f"files/p11/p11000011/s51000011/{D3}.dcm")]
    assert report["unreadable_rows"] == [
        {"file": "cxr-record-list.csv.gz", "line": 5, "reason": "2 fields, the header has 4"}
    ]


# ------------------------------------------------------------------------------------------
# NIH ChestX-ray14
# ------------------------------------------------------------------------------------------


def nih_replica(tmp_path):
    root = tmp_path / "nih"
    write_text(
        root / "Data_Entry_2017_v2020.csv",
        [
            NIH_HEADER,
            "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
            "00000001_001.png,Cardiomegaly|Effusion,1,1,58,M,AP,2894,2729,0.143,0.143",
            "00000002_000.png,No Finding,0,2,81,F,PA,2500,2048,0.168,0.168",
            "00000003_000.png,Hernia|Pleural_Thickening,0,3,74,F,PA,2500,2048,0.168,0.168",
            "00000004_000.png,Mass,0,4,80,M,PA,2500,2048,0.168,0.168",  # not on disk
            "00000002_000.png,No Finding,0,2,81,F,PA,2500,2048,0.168,0.168",  # duplicate
            "00000005_000.png,,0,5,30,M,PA,2500,2048,0.168,0.168",  # no finding labels at all
        ],
    )
    write_text(
        root / "train_val_list.txt", ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
    )
    write_text(root / "test_list.txt", ["00000003_000.png", "00000004_000.png"])
    write_image(root / "images_001/images/00000001_000.png")
    write_image(root / "images_001/images/00000001_001.png")
    write_image(root / "images_002/images/00000002_000.png")
    write_image(root / "images/00000003_000.png")  # Box layout
    return root


def test_nih(tmp_path):
    root = nih_replica(tmp_path)
    rows, header, report = run(tmp_path, "nih-cxr14", root)
    assert header[9:] == [
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
    ]
    rows = by(rows, "image_id")
    assert set(rows) == {
        "00000001_000.png",
        "00000001_001.png",
        "00000002_000.png",
        "00000003_000.png",
    }
    second = rows["00000001_001.png"]
    assert second["resolved"] == str(root / "images_001/images/00000001_001.png")
    assert (second["Cardiomegaly"], second["Effusion"], second["Mass"]) == ("1", "1", "0")
    assert (
        second["patient_id"],
        second["study_id"],
        second["age"],
        second["sex"],
        second["view"],
        second["split"],
    ) == ("1", "00000001_001", "58", "M", "AP", "train")
    assert rows["00000002_000.png"]["No Finding"] == "1"
    third = rows["00000003_000.png"]
    assert third["split"] == "test" and third["Pleural_Thickening"] == third["Hernia"] == "1"
    assert third["resolved"] == str(root / "images/00000003_000.png")
    assert report["missing_images"] == [str(root / "images/00000004_000.png")]
    assert report["counts"]["duplicates"] == 1
    assert report["unreadable_rows"] == [
        {"file": "Data_Entry_2017_v2020.csv", "line": 8, "reason": "empty Finding Labels"}
    ]


def test_nih_original_2017_file(tmp_path):
    """Data_Entry_2017.csv: CRLF, a trailing comma in the header, padded ids, '058Y' ages."""
    root = tmp_path / "nih"
    root.mkdir()
    (root / "Data_Entry_2017.csv").write_bytes(
        (
            NIH_HEADER + ",\r\n00000001_001.png,Cardiomegaly|Emphysema,001,00000001,058Y,M,PA,"
            "2894,2729,0.143,0.143\r\n"
        ).encode()
    )
    write_image(root / "images/00000001_001.png")
    rows, _, report = run(tmp_path, "nih-cxr14", root)
    assert (rows[0]["patient_id"], rows[0]["age"], rows[0]["Emphysema"]) == ("1", "58", "1")
    assert rows[0]["split"] == "" and report["counts"]["unreadable_rows"] == 0
    assert sum("train_val_list.txt not found" in note for note in report["notes"]) == 1


# ------------------------------------------------------------------------------------------
# PadChest
# ------------------------------------------------------------------------------------------


def test_padchest(tmp_path):
    root = tmp_path / "padchest"

    def row(image, folder, projection, labels, patient="p1", birth="1950.0"):
        values = dict.fromkeys(PADCHEST_COLUMNS, "")
        values.update(
            ImageID=image,
            ImageDir=folder,
            StudyDate_DICOM="20140315",
            StudyID=f"s-{patient}",
            PatientID=patient,
            PatientBirth=birth,
            PatientSex_DICOM="F",
            ViewPosition_DICOM="POSTEROANTERIOR",
            Projection=projection,
            Labels=labels,
            Report='sin hallazgos, "texto" . cardiomegalia',
        )
        return values

    rows = [
        row("a_00-001-001.png", "0", "PA", "['pleural effusion', 'cardiomegaly']"),
        row("a_00-001-002.png", "0", "L", "['normal']"),
        row(
            "b_00-002-001.png",
            "12",
            "AP_horizontal",
            "[' pleural effusion', 'pacemaker']",
            patient="p2",
            birth="",
        ),
        row("c_00-003-001.png", "0", "PA", "", patient="p3"),  # blank Labels
        row("d_00-004-001.png", "0", "PA", "['unclosed", patient="p4"),  # unparsable
        row("e_00-005-001.png", "1", "PA", "['normal']", patient="p5"),  # missing image
        row("a_00-001-001.png", "0", "PA", "['normal']"),  # duplicate ImageID
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PADCHEST_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    root.mkdir()
    (root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz").write_bytes(
        gzip.compress(buffer.getvalue().encode())
    )
    write_image(root / "0/a_00-001-001.png")
    write_image(root / "0/a_00-001-002.png")
    write_image(root / "b_00-002-001.png")  # flat layout (resized releases)
    write_image(root / "0/c_00-003-001.png")

    out_rows, header, report = run(tmp_path, "padchest", root)
    assert header[9:] == ["cardiomegaly", "normal", "pacemaker", "pleural effusion"]
    out = by(out_rows, "image_id")
    assert set(out) == {
        "a_00-001-001.png",
        "a_00-001-002.png",
        "b_00-002-001.png",
        "c_00-003-001.png",
    }
    first = out["a_00-001-001.png"]
    assert (first["pleural effusion"], first["cardiomegaly"], first["normal"]) == ("1", "1", "0")
    assert (first["age"], first["sex"], first["view"], first["split"]) == ("64", "F", "PA", "")
    assert out["a_00-001-002.png"]["view"] == "lateral"
    flat = out["b_00-002-001.png"]
    assert flat["resolved"] == str(root / "b_00-002-001.png") and flat["view"] == "AP"
    assert flat["pleural effusion"] == "1" and flat["age"] == ""
    assert {out["c_00-003-001.png"][f] for f in header[9:]} == {""}
    assert report["missing_images"] == [str(root / "1/e_00-005-001.png")]
    assert [r["line"] for r in report["unreadable_rows"]] == [6]
    assert report["duplicates"][0]["id"] == "a_00-001-001.png"


# ------------------------------------------------------------------------------------------
# BRAX
# ------------------------------------------------------------------------------------------


def test_brax(tmp_path):
    root = tmp_path / "brax/1.1.0"
    labels_pos = "1.0," + ",".join([""] * 13)
    labels_mixed = ",,-1.0,,1.0,,,0.0,,,-1.0,,,1.0"

    def line(index, name, patient, sex, age, accession, labels, view):
        folder = f"images/id_{patient}/Study_{accession}/Series_1"
        return (
            f"{index},{folder}/{name}.dcm,{folder}/{name}.png,{patient},{sex},{age},"
            f"{accession},2016-01-01,{labels},{view},2048,2048,3"
        )

    write_text(
        root / "master_spreadsheet_update.csv",
        [
            BRAX_HEADER,
            line(0, "image-1", "aaa", "M", "85 or more", "111", labels_pos, "PA"),
            line(1, "image-2", "aaa", "M", "85 or more", "111", labels_pos, "L"),
            line(2, "image-3", "bbb", "F", "40", "222", labels_mixed, ""),
            line(3, "image-4", "ccc", "O", "20", "333", labels_pos, "AP"),  # missing
            line(4, "image-1", "aaa", "M", "85 or more", "111", labels_pos, "PA"),  # duplicate
            line(5, "image-5", "ddd", "F", "30", "444", labels_pos.replace("1.0", "2.0"), "PA"),
        ],
    )
    for patient, accession, name in (
        ("aaa", "111", "image-1"),
        ("aaa", "111", "image-2"),
        ("bbb", "222", "image-3"),
        ("ddd", "444", "image-5"),
    ):
        write_image(root / f"images/id_{patient}/Study_{accession}/Series_1/{name}.png")
    rows, header, report = run(tmp_path, "brax", root)
    assert header[9:] == list(common.CHEXPERT_FINDINGS)
    rows = by(rows, "image_id")
    first = rows["images/id_aaa/Study_111/Series_1/image-1.png"]
    assert (first["patient_id"], first["sex"], first["age"], first["view"]) == (
        "aaa",
        "M",
        "85",
        "PA",
    )
    assert first["study_id"] == "111"
    mixed = rows["images/id_bbb/Study_222/Series_1/image-3.png"]
    assert (mixed["Cardiomegaly"], mixed["Lung Opacity"], mixed["Pneumonia"], mixed["Edema"]) == (
        "-1",
        "1",
        "0",
        "",
    )
    assert mixed["view"] == "" and mixed["sex"] == "F"
    assert report["counts"] == {
        "metadata_rows": 6,
        "unreadable_rows": 1,
        "duplicates": 1,
        "records": 4,
        "excluded_by_view": 0,
        "missing_images": 1,
        "written": 3,
    }
    assert "2.0" in report["unreadable_rows"][0]["reason"]
    assert report["views"] == {"": 1, "PA": 1, "lateral": 1}


# ------------------------------------------------------------------------------------------
# Units and the hand-over to data_prep.build
# ------------------------------------------------------------------------------------------


def test_value_normalisation():
    assert [common.chexpert_value(v) for v in ("1.0", "0", "-1.0", "", "nan")] == [
        "1",
        "0",
        "-1",
        "",
        "",
    ]
    with pytest.raises(ValueError):
        common.chexpert_value("0.5")
    assert [
        common.normalise_view(v)
        for v in ("PA", "postero-anterior", "AP_horizontal", "LATERAL", "LL", "AP LLD", "", "UNK")
    ] == ["PA", "PA", "AP", "lateral", "lateral", "other", "", ""]
    assert [common.parse_age(v) for v in ("058Y", "006M", "57", "85 or more", "", "x")] == [
        "58",
        "0.5",
        "57",
        "85",
        "",
        "",
    ]
    assert manifest.parse_views("pa,Lateral,unknown") == {"PA", "lateral", ""}
    with pytest.raises(ValueError):
        manifest.parse_views("PA,frontal")


def test_build_consumes_manifest(tmp_path):
    """4 CheXpert images at --size 28: labels, splits and column names survive data_prep.build."""
    import tensorflow_datasets as tfds

    from data_prep import build

    root = chexpert_replica(tmp_path, "CheXpert-v1.0-small")
    manifest.main(
        ["--dataset", "chexpert-small", "--root", str(root), "--out", str(root / "manifest.csv")]
    )
    report = build.main(
        [
            "--input",
            str(root / "manifest.csv"),
            "--output",
            str(tmp_path / "data"),
            "--name",
            "chexpert_small",
            "--size",
            "28",
            "--workers",
            "1",
        ]
    )
    assert report["counts"]["converted"] == 4 and report["splits"] == {"train": 3, "val": 1}
    assert report["labels"]["Pleural Effusion"] == "float"  # blanks -> float32 with NaN
    assert report["labels"]["label_sex"] == "text"

    builder = tfds.builder_from_directory(str(tmp_path / "data/chexpert_small/1.0.0"))
    decoders = {"image": tfds.decode.SkipDecoding()}
    train = builder.as_data_source(split="train", decoders=decoders)
    records = {train[i]["path"].decode(): train[i] for i in range(len(train))}
    first = records["train/patient00001/study1/view1_frontal.jpg"]
    second = records["train/patient00002/study2/view1_frontal.jpg"]
    assert math.isnan(first["Pleural Effusion"]) and second["Pleural Effusion"] == -1.0
    assert first["No Finding"] == 1.0 and first["patient_id"] == b"patient00001"
    assert first["label_sex"] == b"F" and first["view"] == b"AP" and first["age"] == 68
    assert first["label_source"] == b"chexpert-small"
    val = builder.as_data_source(split="val", decoders=decoders)
    assert len(val) == 1 and val[0]["Pleural Effusion"] == 1.0
