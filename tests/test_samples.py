"""Tests for the built-in sample data: phantom generator, DICOM writer and the CLI output."""

import collections
import csv
import dataclasses
import io
import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from scipy import ndimage

from data_prep import samples
from data_prep.samples import builtin, generate, phantom_dicom, phantoms

N_PHANTOMS = 24  # two passes over the 12 DICOM variants
SIZE = 72


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    """One generated sample folder shared by the read-only tests."""
    output = tmp_path_factory.mktemp("samples")
    samples.main(["--output", str(output), "--n-phantoms", str(N_PHANTOMS), "--size", str(SIZE)])
    return output


@pytest.fixture(scope="module")
def rows(sample_dir):
    with open(sample_dir / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _phantom(seed: int, **labels) -> tuple[phantoms.PhantomParams, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = phantoms.sample_patient(rng, 96, **labels)
    image, mask = phantoms.render_phantom(rng, params)
    return params, image, mask


def _meta(index: int = 0) -> phantom_dicom.DicomMeta:
    return phantom_dicom.DicomMeta(
        patient_id="P0",
        study_uid=phantom_dicom.deterministic_uid("test", index, "study"),
        series_uid=phantom_dicom.deterministic_uid("test", index, "series"),
        instance_uid=phantom_dicom.deterministic_uid("test", index, "instance"),
        study_date="20200101",
        study_time="120000",
        manufacturer="Test",
        view_position="PA",
        pixel_spacing=(0.15, 0.15),
    )


def _presentation(ds: pydicom.Dataset) -> np.ndarray:
    """Decoded anatomy with bright = dense: modality LUT, then invert MONOCHROME1."""
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    return -values if ds.PhotometricInterpretation == "MONOCHROME1" else values


def _available_variants() -> list[phantom_dicom.DicomVariant]:
    return [v for v in phantom_dicom.VARIANTS if phantom_dicom.syntax_available(v.transfer_syntax)]


# ------------------------------------------------------------------------------- generator


def test_render_shapes_ranges_and_purity():
    params, image, mask = _phantom(3, nodule=1, effusion=1)
    assert image.dtype == np.float32 and mask.dtype == np.uint8
    assert image.shape == mask.shape == (params.height, params.width)
    assert 96 <= params.width <= 120 and params.width <= params.height <= 1.2 * params.width + 1
    assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0.1
    assert set(np.unique(mask).tolist()) == {0, 255}
    again = phantoms.render_phantom(np.random.default_rng(7), params)
    same = phantoms.render_phantom(np.random.default_rng(7), params)
    np.testing.assert_array_equal(again[0], same[0])
    other = phantoms.render_phantom(np.random.default_rng(8), params)[0]
    assert not np.array_equal(again[0], other)  # only noise/texture differ ...
    assert np.corrcoef(again[0].ravel(), other.ravel())[0, 1] > 0.9  # ... not the anatomy


@pytest.mark.parametrize("effusion", [0, 1, 2])
@pytest.mark.parametrize("nodule", [0, 1])
def test_lesion_masks_match_labels(nodule, effusion):
    for seed in range(3):
        params, _, mask = _phantom(seed, nodule=nodule, effusion=effusion)
        assert params.nodule == nodule and params.effusion == effusion
        assert 1 <= len(params.nodules) <= 3 if nodule else not params.nodules
        nodule_mask, effusion_mask = phantoms.lesion_masks(params)
        assert nodule_mask.any() == bool(nodule)
        assert effusion_mask.any() == bool(effusion)
        np.testing.assert_array_equal(mask > 0, nodule_mask | effusion_mask)
        if effusion:
            # Patient's left (1) is on the image's right; patient's right (2) on the left.
            column = np.nonzero(effusion_mask)[1].mean() / params.width
            assert (column > 0.5) == (effusion == phantoms.EFFUSION_LEFT)
            # The effusion sits at the lung base: lower half of the lung's extent.
            lung_rows = np.nonzero(
                phantoms._lung_fields(*phantoms._canonical_grid(params), params)["lung"] > 0.5
            )[0]
            assert np.nonzero(effusion_mask)[0].mean() > np.median(lung_rows)


def test_nodules_lie_inside_lung_fields():
    for seed in range(20):
        params = phantoms.sample_patient(np.random.default_rng(seed), nodule=1)
        xs = np.array([n.x for n in params.nodules])
        ys = np.array([n.y for n in params.nodules])
        fields = phantoms._lung_fields(xs, ys, params)
        assert np.all(fields["lung"] > 0.95) and np.all(fields["effusion"] < 0.05)


def test_lesions_are_visible_and_local():
    """Rendering the same patient and noise without lesions changes only the mask region,
    and the lesion is denser (brighter) than the lung around it."""
    for seed, labels in [(11, dict(nodule=1, effusion=0)), (12, dict(nodule=0, effusion=2))]:
        params, image, mask = _phantom(seed, **labels)
        clean = phantoms.PhantomParams(**{**params.__dict__, "nodules": (), "effusion": 0})
        clean_image = phantoms.render_phantom(np.random.default_rng(99), clean)[0]
        lesion_image = phantoms.render_phantom(np.random.default_rng(99), params)[0]
        inside = mask > 0
        near = ndimage.binary_dilation(inside, iterations=6)
        difference = lesion_image - clean_image
        assert difference[inside].mean() > 0.04
        assert np.abs(difference[~near]).max() < 5e-3  # soft edges + blur tails only
        # Against the surrounding aerated lung (a ring around the lesion, inside the lung).
        lung = phantoms._lung_fields(*phantoms._canonical_grid(params), params)["lung"] > 0.9
        ring = ndimage.binary_dilation(inside, iterations=9) & ~near & lung
        assert ring.sum() > 10
        assert image[inside].mean() > image[ring].mean() + 0.03


def test_patient_dependent_anatomy():
    draws = [phantoms.sample_patient(np.random.default_rng(s)) for s in range(300)]
    men = [p for p in draws if p.sex == "M"]
    women = [p for p in draws if p.sex == "F"]
    assert 100 < len(men) < 200
    assert all(p.breast_size == 0 for p in men) and all(p.breast_size > 0 for p in women)
    assert np.mean([p.thorax_scale for p in men]) > np.mean([p.thorax_scale for p in women])
    assert np.mean([p.heart_scale for p in men]) > np.mean([p.heart_scale for p in women])
    ages = np.array([p.age for p in draws])
    assert ages.min() >= phantoms.MIN_AGE and ages.max() <= phantoms.MAX_AGE
    assert np.corrcoef(ages, [p.bone_contrast for p in draws])[0, 1] < -0.8
    assert np.corrcoef(ages, [p.aortic_radius for p in draws])[0, 1] > 0.8
    # Breast shadows make a woman's lower lung zones denser than the same body as a man.
    woman = next(p for p in women if p.breast_size > 1.0)
    as_man = phantoms.PhantomParams(**{**woman.__dict__, "sex": "M", "breast_size": 0.0})
    noise = 5
    f_image = phantoms.render_phantom(np.random.default_rng(noise), woman)[0]
    m_image = phantoms.render_phantom(np.random.default_rng(noise), as_man)[0]
    lower = slice(int(0.55 * woman.height), int(0.8 * woman.height))
    assert f_image[lower].mean() > m_image[lower].mean() + 0.01


def test_effusion_extent_opacity_and_hemidiaphragm_vary():
    """Effusions range from a blunted angle to a moderate one at partial opacity, and every
    patient's hemidiaphragm heights vary (a raised dome shrinks the lung base without fluid),
    so no fixed pixel set decides the label."""
    draws = [phantoms.sample_patient(np.random.default_rng(s), 64) for s in range(200)]
    levels = np.array([p.effusion_level for p in draws])
    opacity = np.array([p.effusion_opacity for p in draws])
    domes = np.array([p.dome_shift for p in draws])
    assert levels.min() < 0.12 and levels.max() > 0.26
    assert opacity.min() < 0.55 and opacity.max() > 0.85
    assert domes.min() < -0.1 and domes.max() > 0.0
    assert abs(np.corrcoef(domes[:, 0], domes[:, 1])[0, 1]) < 0.3  # sides independent
    params = phantoms.sample_patient(np.random.default_rng(4), 96, nodule=0, effusion=0)
    low = dataclasses.replace(params, dome_shift=(0.04, 0.04))
    raised = dataclasses.replace(params, dome_shift=(-0.14, 0.04))
    lung = [
        phantoms._lung_fields(*phantoms._canonical_grid(p), p)["lung"] > 0.5 for p in (low, raised)
    ]
    left_half = slice(0, params.width // 2)  # the patient's right: image left
    assert lung[1][:, left_half].sum() < 0.9 * lung[0][:, left_half].sum()
    assert lung[1][:, params.width // 2 :].sum() == lung[0][:, params.width // 2 :].sum()
    # Opacity scales the fluid's contrast: a fainter effusion changes the image less.
    wet = dataclasses.replace(params, effusion=2, effusion_level=0.25)
    dry = phantoms.render_phantom(np.random.default_rng(1), params)[0]
    faint, dense = (
        phantoms.render_phantom(
            np.random.default_rng(1), dataclasses.replace(wet, effusion_opacity=o)
        )[0]
        for o in (0.45, 0.95)
    )
    assert 0 < np.abs(faint - dry).sum() < 0.7 * np.abs(dense - dry).sum()


def test_acquisition_profiles_change_the_exposure_not_the_patient():
    standard = phantoms.sample_patient(np.random.default_rng(9), 64, nodule=1, effusion=1)
    portable = phantoms.sample_patient(
        np.random.default_rng(9), 64, nodule=1, effusion=1, acquisition="portable"
    )
    for name in ("sex", "age", "nodules", "effusion", "effusion_level", "dome_shift"):
        assert getattr(portable, name) == getattr(standard, name)
    for name, (low, high) in phantoms.ACQUISITION_PROFILES["portable"].items():
        assert low <= getattr(portable, name) <= high
        assert getattr(portable, name) != getattr(standard, name)
    followup = phantoms.sample_followup(np.random.default_rng(3), standard, 64, "portable")
    assert phantoms.ACQUISITION_PROFILES["portable"]["gamma"][0] <= followup.gamma
    with pytest.raises(ValueError, match="acquisition"):
        phantoms.sample_patient(np.random.default_rng(0), 64, acquisition="mobile")
    with pytest.raises(ValueError, match="acquisition"):
        generate.generate_samples("/nonexistent", 4, 64, 0, acquisition="mobile")


def test_followup_keeps_patient_changes_acquisition():
    params = phantoms.sample_patient(np.random.default_rng(0), nodule=1, effusion=1)
    followup = phantoms.sample_followup(np.random.default_rng(1), params)
    for name in ("sex", "age", "nodules", "effusion", "heart_scale", "thorax_scale"):
        assert getattr(followup, name) == getattr(params, name)
    assert (followup.shift_x, followup.rotation_deg) != (params.shift_x, params.rotation_deg)


# ------------------------------------------------------------------------------- DICOM


def test_every_variant_round_trips_losslessly_with_declared_metadata():
    params, image, _ = _phantom(1, nodule=1, effusion=0)
    for index, variant in enumerate(_available_variants()):
        encoded = phantom_dicom.encode_dicom(image, params, variant, _meta())
        ds = pydicom.dcmread(io.BytesIO(encoded))
        assert ds.file_meta.TransferSyntaxUID == variant.transfer_syntax
        assert ds.PhotometricInterpretation == variant.photometric
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (
            16,
            variant.bits_stored,
            variant.bits_stored - 1,
        )
        assert ds.PixelRepresentation == int(variant.signed)
        assert ds.SOPClassUID in (
            phantom_dicom.CR_IMAGE_STORAGE,
            phantom_dicom.DX_IMAGE_STORAGE_FOR_PRESENTATION,
        )
        assert ds.SOPInstanceUID == _meta().instance_uid, index  # never a random UID
        assert ds.SOPInstanceUID.is_valid and ds.StudyInstanceUID.is_valid
        assert (ds.Rows, ds.Columns) == image.shape
        pixels = ds.pixel_array
        np.testing.assert_array_equal(pixels, phantom_dicom.stored_values(image, variant))
        assert pixels.min() >= (-(2 ** (variant.bits_stored - 1)) if variant.signed else 0)
        assert pixels.max() < 2 ** (variant.bits_stored - (1 if variant.signed else 0))
        # Modality LUT (+ MONOCHROME1 inversion) gives image * levels * slope + constant,
        # up to one quantisation step.
        expected = image * (2**variant.bits_stored - 1) * variant.rescale_slope
        residual = _presentation(ds) - expected
        assert np.ptp(residual) <= variant.rescale_slope * 1.01


def test_variant_table_covers_the_decoder_paths():
    variants = phantom_dicom.VARIANTS
    assert {v.photometric for v in variants} == {"MONOCHROME1", "MONOCHROME2"}
    assert {v.bits_stored for v in variants} == {10, 12, 14, 16}
    assert {v.signed for v in variants} == {False, True}
    assert any(v.rescale_slope != 1 for v in variants)
    assert any(v.window for v in variants) and any(v.voi_lut for v in variants)
    syntaxes = {v.transfer_syntax for v in variants}
    assert {
        pydicom.uid.ExplicitVRLittleEndian,
        pydicom.uid.ImplicitVRLittleEndian,
        pydicom.uid.RLELossless,
        pydicom.uid.JPEG2000Lossless,
    } <= syntaxes
    assert all(v.rescale_slope == 1 and v.intercept == 0 for v in variants if v.modality == "DX")


def test_monochrome1_and_monochrome2_render_the_same_anatomy():
    params, image, _ = _phantom(2, nodule=1, effusion=2)
    decoded = []
    for variant in _available_variants():
        encoded = phantom_dicom.encode_dicom(image, params, variant, _meta())
        ds = pydicom.dcmread(io.BytesIO(encoded))
        decoded.append((variant.photometric, _presentation(ds).ravel()))
    mono1 = [d for kind, d in decoded if kind == "MONOCHROME1"]
    mono2 = [d for kind, d in decoded if kind == "MONOCHROME2"]
    assert mono1 and mono2
    for a in mono1:
        for b in mono2:
            assert np.corrcoef(a, b)[0, 1] > 0.99
    # Raw stored values of the two interpretations are anti-correlated: the inversion matters.
    m1 = next(v for v in phantom_dicom.VARIANTS if v.photometric == "MONOCHROME1")
    m2 = next(v for v in phantom_dicom.VARIANTS if v.photometric == "MONOCHROME2")
    raw1 = phantom_dicom.stored_values(image, m1).astype(float).ravel()
    raw2 = phantom_dicom.stored_values(image, m2).astype(float).ravel()
    assert np.corrcoef(raw1, raw2)[0, 1] < -0.99


def test_window_and_voi_lut_are_usable():
    params, image, _ = _phantom(4)
    for variant in [v for v in _available_variants() if v.window or v.voi_lut]:
        encoded = phantom_dicom.encode_dicom(image, params, variant, _meta())
        ds = pydicom.dcmread(io.BytesIO(encoded))
        assert ("VOILUTSequence" in ds) == variant.voi_lut
        # A VOI LUT is indexed by (integer) stored values; its variants have identity rescale.
        values = ds.pixel_array if variant.voi_lut else apply_modality_lut(ds.pixel_array, ds)
        shown = apply_voi_lut(values, ds).astype(float)
        if variant.photometric == "MONOCHROME1":
            shown = -shown
        # The VOI transform is monotonic: it keeps the anatomy's ordering.
        rank_corr = np.corrcoef(
            np.argsort(np.argsort(shown.ravel())), np.argsort(np.argsort(image.ravel()))
        )[0, 1]
        assert rank_corr > 0.95
        assert np.ptp(shown) > 0


def test_missing_encoder_is_refused():
    params, image, _ = _phantom(0)
    unavailable = pydicom.uid.JPEGLSLossless
    if phantom_dicom.syntax_available(unavailable):
        pytest.skip("JPEG-LS encoder installed here")
    variant = phantom_dicom.DicomVariant(unavailable, "MONOCHROME2", 12, False)
    with pytest.raises(ValueError, match="no encoder"):
        phantom_dicom.encode_dicom(image, params, variant, _meta())


# ------------------------------------------------------------------------------- CLI output


def test_labels_csv_is_consistent_with_files(sample_dir, rows):
    assert tuple(rows[0].keys()) == generate.CSV_COLUMNS
    real = [r for r in rows if r["kind"] == "real"]
    fake = [r for r in rows if r["kind"] == "phantom"]
    assert len(fake) == N_PHANTOMS
    assert {r["path"] for r in real} >= {
        "real/RG1_UNCR.dcm",
        "real/RG1_J2KR.dcm",
        "real/RG1_J2KI.dcm",
    }
    for row in real:
        ds = pydicom.dcmread(sample_dir / row["path"], stop_before_pixels=True)
        assert row["split"] == "train" and row["mask_path"] == ""
        assert row["patient_id"] == ds.PatientID
        assert (row["nodule"], row["effusion"], row["age"]) == ("-1", "-1", "-1")
        assert row["effusion_present"] == "-1"
    rg1 = pydicom.dcmread(sample_dir / "real/RG1_UNCR.dcm")
    assert rg1.PhotometricInterpretation == "MONOCHROME1" and rg1.BodyPartExamined == "CHEST"
    assert "MIT" in (sample_dir / "LICENSE-pydicom-data.txt").read_text()
    for row in fake:
        ds = pydicom.dcmread(sample_dir / row["path"])
        mask = np.asarray(Image.open(sample_dir / row["mask_path"]))
        assert mask.dtype == np.uint8 and mask.shape == (ds.Rows, ds.Columns)
        assert set(np.unique(mask).tolist()) <= {0, 255}
        assert row["effusion_present"] == str(int(row["effusion"] != "0"))
        has_finding = row["nodule"] == "1" or row["effusion"] != "0"
        assert mask.any() == has_finding
        assert ds.PatientID == row["patient_id"] and ds.PatientSex == row["sex"]
        assert ds.PatientAge == f"{int(row['age']):03d}Y"
        assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition in ("PA", "AP")
        assert ds.Modality in ("CR", "DX")
        assert ds.pixel_array.shape == mask.shape
    uids = [
        pydicom.dcmread(sample_dir / r["path"], stop_before_pixels=True).SOPInstanceUID
        for r in fake
    ]
    assert len(set(uids)) == len(uids)


def test_summary_matches_csv(sample_dir, rows):
    summary = json.loads((sample_dir / "samples.json").read_text())
    fake = [r for r in rows if r["kind"] == "phantom"]
    assert summary["n_phantoms"] == len(fake) and summary["seed"] == 0
    assert summary["n_real"] == len(rows) - len(fake)
    assert sum(summary["transfer_syntaxes"].values()) == len(fake)
    assert summary["n_patients"] == len({r["patient_id"] for r in fake})
    written = {
        str(
            pydicom.dcmread(
                sample_dir / r["path"], stop_before_pixels=True
            ).file_meta.TransferSyntaxUID.name
        )
        for r in fake
    }
    assert written == set(summary["transfer_syntaxes"])
    spacings = [
        pydicom.dcmread(sample_dir / r["path"], stop_before_pixels=True).get("PixelSpacing")
        for r in fake
    ]
    assert any(s is None for s in spacings) and any(
        s is not None and float(s[0]) == 0 for s in spacings
    )
    assert sum(s is not None and 0.14 <= float(s[0]) <= 0.2 for s in spacings) > len(fake) / 2


def test_patient_splits_are_disjoint(rows):
    split_of: dict[str, set] = {}
    for row in rows:
        split_of.setdefault(row["patient_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of.values())
    fake = [r for r in rows if r["kind"] == "phantom"]
    assert {r["split"] for r in fake} == {"train", "val", "test"}
    per_patient = np.bincount(np.unique([r["patient_id"] for r in fake], return_inverse=True)[1])
    assert per_patient.max() == 2 and (per_patient == 2).sum() >= 1


def test_split_fractions_and_plan_balance():
    ids = [f"P{i}" for i in range(200)]
    split = generate.split_patients(np.random.default_rng(0), ids)
    counts = {name: list(split.values()).count(name) for name in ("train", "val", "test")}
    assert counts == {"train": 140, "val": 30, "test": 30}
    demo = generate.split_patients(np.random.default_rng(0), ids, builtin.BUILTIN_SPLIT_FRACTIONS)
    counts = {name: list(demo.values()).count(name) for name in ("train", "val", "test")}
    assert counts == {"train": 90, "val": 20, "test": 90}
    for bad in ({"train": 0.5, "test": 0.5}, {"train": 0.5, "val": 0.1, "test": 0.3}):
        with pytest.raises(ValueError, match="split_fractions"):
            generate.split_patients(np.random.default_rng(0), ids, bad)
    plans = generate.plan_phantoms(np.random.default_rng(0), 96)
    assert len(plans) == 96
    first = [p for p in plans if p.study_index == 0]
    repeats = len(plans) - len(first)
    assert 0.08 <= repeats / len(plans) <= 0.12
    assert abs(sum(p.sex == "M" for p in first) - len(first) / 2) <= 1
    assert abs(sum(p.nodule for p in first) - len(first) / 2) <= 1
    effusion = np.bincount([p.effusion for p in first], minlength=3)
    assert abs(effusion[0] - len(first) / 2) <= 1 and abs(effusion[1] - effusion[2]) <= 1
    # Labels are not tied to each other by the balancing.
    nodule = np.array([p.nodule for p in first])
    male = np.array([p.sex == "M" for p in first])
    assert abs(np.corrcoef(nodule, male)[0, 1]) < 0.5


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    def snapshot(folder):
        return {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    args = ["--n-phantoms", "13", "--size", "64"]
    samples.main(["--output", str(tmp_path / "a"), *args, "--seed", "5"])
    samples.main(["--output", str(tmp_path / "b"), *args, "--seed", "5"])
    samples.main(["--output", str(tmp_path / "c"), *args, "--seed", "6"])
    a, b, c = (snapshot(tmp_path / name) for name in "abc")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    phantom_files = [k for k in a if k.startswith("phantoms/") and k.endswith(".dcm")]
    assert len(phantom_files) == 13
    assert all(a[k] != c.get(k) for k in phantom_files)
    assert a["labels.csv"] != c["labels.csv"]


def test_cli_split_fractions(tmp_path):
    """--split-fractions sets the phantom patients' split (the demo's held-out set: 45% test);
    a malformed value is refused."""
    samples.main(
        ["--output", str(tmp_path), "--n-phantoms", "40", "--size", "64"]
        + ["--seed", "3", "--split-fractions", "0.2,0.05,0.75"]
    )
    rows = list(csv.DictReader((tmp_path / "labels.csv").open()))
    splits = collections.Counter(r["split"] for r in rows if r["kind"] == "phantom")
    assert splits["test"] > 2 * splits["train"] > 2 * splits["val"] > 0
    with pytest.raises(SystemExit):
        samples.main(["--output", str(tmp_path / "x"), "--split-fractions", "0.5,0.5"])


def test_builtin_data_needs_the_command_line_maker(tmp_path):
    """The runtime package never generates samples itself: data.builtin without the maker that
    the command lines pass (data_prep.samples.builtin) is refused, naming the key; with a maker,
    its dataset is what is opened."""
    from raddino_jax.config import base_config
    from raddino_jax.data import sources

    config = base_config()
    config.data.builtin = True
    with pytest.raises(ValueError, match="data.builtin"):
        sources.open_training_data(config, tmp_path)
    calls = []

    def maker(workdir, n_phantoms, size):
        calls.append((workdir, n_phantoms, size))
        raise FileNotFoundError("stop here")

    with pytest.raises(FileNotFoundError, match="stop here"):
        sources.open_training_data(config, tmp_path, maker)
    assert calls == [(tmp_path, config.data.builtin_phantoms, config.data.builtin_size)]


def test_cli_acquisition_portable(tmp_path):
    """--acquisition portable: the same patients (labels) as the standard draw of the seed,
    other pixels, other UIDs, and the profile recorded in samples.json."""
    common = ["--n-phantoms", "6", "--size", "64", "--seed", "5"]
    samples.main(["--output", str(tmp_path / "std"), *common])
    samples.main(["--output", str(tmp_path / "ap"), *common, "--acquisition", "portable"])
    std, ap = (list(csv.DictReader((tmp_path / d / "labels.csv").open())) for d in ("std", "ap"))
    keys = ("nodule", "effusion", "sex", "age", "split")
    assert [tuple(r[k] for k in keys) for r in std] == [tuple(r[k] for k in keys) for r in ap]
    assert json.loads((tmp_path / "ap" / "samples.json").read_text())["acquisition"] == "portable"
    a = pydicom.dcmread(tmp_path / "std" / std[-1]["path"])
    b = pydicom.dcmread(tmp_path / "ap" / ap[-1]["path"])
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert not np.array_equal(a.pixel_array, b.pixel_array)
