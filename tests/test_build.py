"""End-to-end tests of the dataset builder (CLI data_prep.build) and data.records (tiny --size)."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import pathlib
import shutil

import cv2
import numpy as np
import pydicom
import pytest

from data_prep import build
from raddino_jax.data import builder, records
from raddino_jax.data.images import decode_png

data_store = pytest.importorskip("data_store", reason="pydicom-data is not installed")
REAL = pathlib.Path(data_store.__file__).parent / "data"
PYDICOM_FILES = pathlib.Path(pydicom.__file__).parent / "data" / "test_files"
SIZE = 32


def real_file(name: str) -> pathlib.Path:
    for folder in (REAL, PYDICOM_FILES):
        if (folder / name).exists():
            return folder / name
    pytest.skip(f"{name} is not installed locally")


def _rewritten(name: str, edit) -> bytes:
    ds = pydicom.dcmread(real_file(name))
    edit(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _private_syntax(ds):
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9999.1"


def _write_png(path: pathlib.Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def make_folder(root: pathlib.Path) -> dict[str, str]:
    """A folder of good, duplicate, bad and irrelevant files. Returns {relative path: expected}."""
    mr = real_file("MR2_UNCR.dcm").read_bytes()
    root.mkdir(parents=True)
    (root / "sub").mkdir()
    shutil.copy(real_file("RG1_J2KR.dcm"), root / "a_chest_j2k.dcm")
    shutil.copy(real_file("RG1_UNCR.dcm"), root / "b_chest_uncompressed.dcm")  # same pixels
    shutil.copy(real_file("MR2_UNCR.dcm"), root / "sub" / "mr.dicom")
    shutil.copy(real_file("CT_small.dcm"), root / "sub" / "IM0001")  # extensionless, sniffed
    gradient = np.linspace(0, 65535, 40 * 60).reshape(40, 60).astype(np.uint16)
    _write_png(root / "sub" / "image16.png", gradient)
    (root / "sub" / "empty.dcm").write_bytes(b"")
    (root / "sub" / "truncated.dcm").write_bytes(mr[: len(mr) // 2])
    (root / "sub" / "no_pixels.dcm").write_bytes(
        _rewritten("MR2_UNCR.dcm", lambda ds: delattr(ds, "PixelData"))
    )
    (root / "sub" / "no_decoder.dcm").write_bytes(_rewritten("MR2_UNCR.dcm", _private_syntax))
    (root / "text.dcm").write_text("not a dicom file\n" * 10)
    (root / "notes.txt").write_text("ignored")
    (root / "README").write_text("extensionless but not DICOM: ignored")
    return {
        "a_chest_j2k.dcm": "ok",
        "b_chest_uncompressed.dcm": "duplicate",
        "sub/mr.dicom": "ok",
        "sub/IM0001": "ok",
        "sub/image16.png": "ok",
        "sub/empty.dcm": "empty_file",
        "sub/truncated.dcm": "truncated",
        "sub/no_pixels.dcm": "no_pixel_data",
        "sub/no_decoder.dcm": "no_decoder",
        "text.dcm": "not_dicom",
    }


@pytest.fixture(scope="module")
def folder_build(tmp_path_factory):
    """A 16-bit build of the folder through the CLI entry point, on a 2-process spawn pool."""
    tmp = tmp_path_factory.mktemp("folder")
    expected = make_folder(tmp / "in")
    argv = [
        "--input",
        str(tmp / "in"),
        "--output",
        str(tmp / "out"),
        "--name",
        "mixed",
        "--size",
        str(SIZE),
        "--bits",
        "16",
        "--workers",
        "2",
    ]
    report = build.main(argv)
    return tmp, argv, expected, report


def test_tensorflow_is_not_needed():
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow happens to be installed; cannot check its absence")
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/data/tfds/chest", ("/data/tfds", "chest")),
        ("gs://bucket/tfds/chest/", ("gs://bucket/tfds", "chest")),
        ("tfds/chest", ("tfds", "chest")),
        ("chest", None),
        ("/chest", None),
        ("/data/tfds/", ("/data", "tfds")),
    ],
)
def test_dataset_path_splits_into_data_dir_and_name(path, expected):
    if expected is None:
        with pytest.raises(ValueError, match=r"--eval-data: .* is not DATA_DIR/NAME"):
            records.split_dataset_path(path, "--eval-data")
    else:
        assert records.split_dataset_path(path) == expected


def test_report_counts_and_reasons(folder_build):
    tmp, _, expected, report = folder_build
    on_disk = json.loads((tmp / "out" / "mixed" / "report.json").read_text())
    assert on_disk == report
    counts = report["counts"]
    assert counts["found"] == len(expected)
    assert counts["found"] == counts["converted"] + counts["failed"] + counts["duplicates"]
    assert counts["converted"] == sum(v == "ok" for v in expected.values())
    failures = {f["path"]: f["reason"] for f in report["failures"]}
    assert failures == {p: r for p, r in expected.items() if r not in ("ok", "duplicate")}
    for failure in report["failures"]:
        assert failure["path"] in failure["message"]
    assert report["duplicates"] == [
        {"path": "b_chest_uncompressed.dcm", "duplicate_of": "a_chest_j2k.dcm"}
    ]
    assert sorted(report["ignored_files"]) == ["README", "notes.txt"]
    assert report["splits"] == {"train": counts["converted"]}
    assert report["options"]["result"]["bits"] == 16


def test_records_read_back_without_tensorflow(folder_build):
    tmp, _, _, _ = folder_build
    source = records.open_split(tmp / "out", "mixed", "train")
    assert len(source) == 4
    by_path = {}
    for index in range(len(source)):
        record = source[index]
        assert isinstance(record["image"], bytes)  # kept encoded (SkipDecoding)
        image = decode_png(record["image"])
        assert image.dtype == np.uint16 and image.ndim == 3 and image.shape[2] == 1
        assert min(image.shape[:2]) == SIZE
        by_path[record["path"].decode()] = (record, image)
    assert sorted(by_path) == ["a_chest_j2k.dcm", "sub/IM0001", "sub/image16.png", "sub/mr.dicom"]

    chest, chest_image = by_path["a_chest_j2k.dcm"]
    assert chest_image.shape == (round(1955 * SIZE / 1841), SIZE, 1)
    assert (int(chest["orig_height"]), int(chest["orig_width"])) == (1955, 1841)
    assert chest["sex"] == b"F" and chest["modality"] == b"CR"
    assert chest["photometric"] == b"MONOCHROME1" and chest["source"] == b"mixed"
    assert float(chest["pixel_spacing_row_mm"]) == -1.0  # RG1's "0\0" is invalid
    assert float(chest["age_years"]) == -1.0
    assert chest["transfer_syntax"] == b"1.2.840.10008.1.2.4.90"

    mr, _ = by_path["sub/mr.dicom"]
    assert float(mr["pixel_spacing_row_mm"]) == pytest.approx(0.195313)
    ct, _ = by_path["sub/IM0001"]
    assert ct["modality"] == b"CT" and float(ct["age_years"]) == 0.0
    png, png_image = by_path["sub/image16.png"]
    assert png_image.shape == (SIZE, 48, 1)
    assert int(png["orig_width"]) == 60 and png["windowing"] == b"as_stored"
    # the horizontal-major gradient survives: increasing along rows, full 16-bit range used
    assert png_image[0, 0, 0] < png_image[-1, -1, 0] and png_image.max() > 60000


def test_decoded_view_matches_bytes(folder_build):
    tmp, _, _, _ = folder_build
    raw = records.open_split(tmp / "out", "mixed", "train")
    decoded = records.open_split(tmp / "out", "mixed", "train", decode_images=True)
    np.testing.assert_array_equal(decoded[0]["image"], decode_png(raw[0]["image"]))
    assert decoded[0]["image"].dtype == np.uint16


def test_rerun_is_skipped_and_options_change_needs_overwrite(folder_build):
    tmp, argv, _, report = folder_build
    shard = next((tmp / "out" / "mixed" / records.DATASET_VERSION).glob("*.array_record*"))
    before = shard.stat().st_mtime_ns
    assert build.main(argv) == report
    assert shard.stat().st_mtime_ns == before  # nothing rewritten
    with pytest.raises(FileExistsError):
        build.main([*argv[:-4], "--bits", "8", "--workers", "1"])


def _write_csv_inputs(root: pathlib.Path) -> None:
    root.mkdir(parents=True)
    (root / "images").mkdir()
    for index in range(4):
        image = np.full((24, 36), 40 * index + 10, np.uint8)
        image[: 6 + index, :] = 250  # distinct content so none are duplicates
        _write_png(root / "images" / f"img{index}.png", image)
    mask = np.zeros((12, 18), np.uint8)
    mask[:, 9:] = 1
    _write_png(root / "masks" / "img0_mask.png", mask)
    shutil.copy(real_file("MR2_UNCR.dcm"), root / "images" / "mr.dcm")
    (root / "labels.csv").write_text(
        "path,split,patient_id,mask_path,finding,score,note,sex\n"
        "images/img0.png,train,P0,masks/img0_mask.png,1,0.5,left,M\n"
        "images/img1.png,train,P1,,0,,,M\n"
        "images/gone.png,test,P8,,1,1,v,M\n"
        "images/img2.png,validation,P2,,1,2,x,M\n"
        f"{root / 'images' / 'img3.png'},validation,,,0,1.25,y,M\n"
        "images/mr.dcm,,,,2,3,z,M\n"
        "images/missing.png,validation,P9,,0,1,w,M\n"
    )


@pytest.fixture(scope="module")
def csv_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("csv")
    _write_csv_inputs(tmp / "in")
    options = builder.BuildOptions(
        input=str(tmp / "in" / "labels.csv"),
        output=str(tmp / "out"),
        name="labelled",
        size=SIZE,
        bits=8,
        workers=1,
    )
    return tmp, options, builder.build_dataset(options)


def test_csv_labels_splits_and_masks(csv_build):
    tmp, _, report = csv_build
    assert report["labels"] == {
        "finding": "int",
        "score": "float",
        "note": "text",
        "label_sex": "text",
    }
    assert report["splits"] == {"train": 3, "test": 0, "validation": 2}
    assert report["counts"] == {"found": 7, "converted": 5, "failed": 2, "duplicates": 0}
    assert [f["path"] for f in report["failures"]] == ["images/gone.png", "images/missing.png"]
    # tfds cannot hold an empty split: it is left out and said so
    assert report["dropped_empty_splits"] == ["test"] and report["dataset_written"]
    with pytest.raises(Exception, match="test"):
        records.open_split(tmp / "out", "labelled", "test")

    train = records.open_split(tmp / "out", "labelled", "train")
    validation = records.open_split(tmp / "out", "labelled", "validation")
    assert (len(train), len(validation)) == (3, 2)
    rows = {r["path"].decode(): r for r in [*train, *validation]}
    first = rows["images/img0.png"]
    assert first["finding"] == 1 and isinstance(first["finding"], int)
    assert first["score"] == 0.5 and first["note"] == b"left"
    features = train.dataset_info.features
    assert features["finding"].np_dtype == np.int64
    assert features["score"].np_dtype == np.float32
    assert features["image"].np_dtype == np.uint8 and features["mask"].shape == (None, None, 1)
    assert first["patient_id"] == b"P0"
    assert first["label_sex"] == b"M" and first["sex"] == b""  # PNG: no DICOM sex tag
    assert math.isnan(float(rows["images/img1.png"]["score"]))
    mr = rows["images/mr.dcm"]
    assert mr["finding"] == 2 and mr["patient_id"] != b""  # from the DICOM tag
    assert rows[str(tmp / "in" / "images" / "img3.png")]["note"] == b"y"

    image = decode_png(first["image"])
    mask = decode_png(first["mask"])
    assert image.shape == mask.shape == (SIZE, 48, 1) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask[:, :24, 0], 0)  # nearest neighbour keeps labels exact
    np.testing.assert_array_equal(mask[:, 24:, 0], 1)
    assert not decode_png(rows["images/img1.png"]["mask"]).any()


def test_overwrite_rebuilds(csv_build):
    tmp, options, report = csv_build
    (tmp / "in" / "images" / "img1.png").unlink()
    rebuilt = builder.build_dataset(builder.BuildOptions(**{**vars(options), "overwrite": True}))
    assert rebuilt["counts"] == {"found": 7, "converted": 4, "failed": 3, "duplicates": 0}
    assert len(records.open_split(tmp / "out", "labelled", "train")) == 2


@pytest.mark.parametrize(
    "values, kind",
    [
        (["1", "2", "-3"], "int"),
        (["1", "", "2"], "float"),
        (["1.5", "2"], "float"),
        (["a", "1"], "text"),
        (["", ""], "text"),
    ],
)
def test_infer_label_type(values, kind):
    assert builder.infer_label_type(values) == kind


def test_folder_without_valid_images_still_reports(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.dcm").write_bytes(b"")
    options = builder.BuildOptions(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), name="nothing", size=SIZE
    )
    report = builder.build_dataset(options)
    assert report["counts"] == {"found": 1, "converted": 0, "failed": 1, "duplicates": 0}
    assert not report["dataset_written"] and report["dropped_empty_splits"] == ["train"]
    assert builder.build_dataset(options) == report  # re-run is safe


def test_label_name_clash_is_an_error():
    with pytest.raises(ValueError):
        records.build_features(8, {"sex": "text"})
