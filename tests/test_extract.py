"""Feature extraction CLI and the inference preprocessing (must equal the exported processor)."""

import cv2
import numpy as np
import pytest
from PIL import Image
from transformers import BitImageProcessor

from raddino_jax import checkpoint, extract
from raddino_jax.convert.to_torch import preprocessor_config
from raddino_jax.convert.verify import jax_last_hidden_state
from raddino_jax.data.preprocess import preprocess_uint8
from raddino_jax.models import ModelSpec, init_params
from raddino_jax.models.vit import vit_config


@pytest.mark.parametrize("shape", [(90, 70), (64, 120), (56, 56)])
def test_preprocessing_equals_exported_bit_image_processor(shape):
    pre = checkpoint.Preprocessing(image_size=56, mean=0.5307, std=0.2583)
    gray = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    processor = BitImageProcessor(
        **{k: v for k, v in preprocessor_config(pre).items() if k != "image_processor_type"}
    )
    want = processor(Image.fromarray(gray).convert("RGB"), return_tensors="np")["pixel_values"][0]
    got = preprocess_uint8(gray, pre)
    assert got.shape == (56, 56, 3)
    np.testing.assert_allclose(got, want.transpose(1, 2, 0), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    spec = ModelSpec(vit_config("vit_small", embed_dim=32, depth=3, num_heads=2, img_size=56))
    params = init_params(spec, 0)
    path = tmp_path_factory.mktemp("ckpt") / "params"
    checkpoint.save_params(path, spec, params, checkpoint.Preprocessing(image_size=56))
    return path, spec, params


def test_extract_from_npy_matches_model(tiny_checkpoint, tmp_path):
    path, spec, params = tiny_checkpoint
    images = np.random.default_rng(0).standard_normal((5, 56, 56, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "f.npz"
    argv = [
        "--checkpoint",
        str(path),
        "--input",
        str(tmp_path / "x.npy"),
        "--out",
        str(out),
        "--layers",
        "2",
        "--batch-size",
        "2",
    ]
    assert extract.main(argv) == 0
    feats = np.load(out)
    assert feats["cls"].shape == (5, 32) and feats["patch"].shape == (5, 4, 4, 32)
    assert feats["layers_cls"].shape == (5, 2, 32) and feats["layers_patch"].shape == (
        5,
        2,
        4,
        4,
        32,
    )
    tokens = jax_last_hidden_state(spec, params, images)
    np.testing.assert_allclose(feats["cls"], tokens[:, 0], atol=1e-5)
    np.testing.assert_allclose(feats["patch"].reshape(5, 16, 32), tokens[:, 1:], atol=1e-5)
    np.testing.assert_allclose(feats["layers_cls"][:, -1], feats["cls"], atol=1e-6)


def test_extract_from_folder_of_files(tiny_checkpoint, tmp_path):
    path, _, _ = tiny_checkpoint
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, shape in enumerate([(80, 64), (64, 96)]):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 256, shape, dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "f.npz"
    assert extract.main(["--checkpoint", str(path), "--input", str(folder), "--out", str(out)]) == 0
    feats = np.load(out)
    assert feats["cls"].shape == (2, 32)
    assert [p.rsplit("/", 1)[-1] for p in feats["paths"]] == ["img0.png", "img1.png"]
    assert np.isfinite(feats["patch"]).all()


def test_extract_bad_input_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    path, _, _ = tiny_checkpoint
    np.save(tmp_path / "bad.npy", np.zeros((2, 56, 56), np.float32))
    argv = [
        "--checkpoint",
        str(path),
        "--input",
        str(tmp_path / "bad.npy"),
        "--out",
        str(tmp_path / "f.npz"),
    ]
    assert extract.main(argv) == 1
    assert "(N, H, W, 3)" in capsys.readouterr().err
    assert extract.main(["--checkpoint", str(tmp_path), "--input", "x.npy", "--out", "f.npz"]) == 1
    assert "parameter checkpoint" in capsys.readouterr().err
