"""Weight import/export against transformers and the original dinov2 layout (recipe s9)."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import (
    AutoModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from raddino_jax import checkpoint
from raddino_jax.convert import __main__ as cli
from raddino_jax.convert import names
from raddino_jax.convert.verify import jax_last_hidden_state, torch_last_hidden_state

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14
)
SIZES = [(56, 56), (28, 28), (84, 84), (42, 70)]  # native, smaller, larger, non-square


def _random_hf(registers: bool, swiglu: bool = False):
    torch.manual_seed(1 + registers + 2 * swiglu)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=2, **TINY))
    else:
        model = Dinov2Model(Dinov2Config(use_swiglu_ffn=swiglu, **TINY))
    with torch.no_grad():  # every tensor random, layer scales and mask token included
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=[False, True], ids=["dinov2", "registers"])
def hf_model(request, tmp_path_factory):
    model = _random_hf(request.param)
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    return model, folder


def _import(tmp_path, *argv):
    out = tmp_path / "params"
    assert cli.main(["from-torch", *argv, "--out", str(out)]) == 0
    spec, params = checkpoint.load_params(out)
    return out, spec, params


def _images(hw, seed=0):
    return np.random.default_rng(seed).standard_normal((2, *hw, 3)).astype(np.float32)


def test_hf_import_matches_torch_at_every_size(hf_model, tmp_path):
    model, folder = hf_model
    _, spec, params = _import(tmp_path, "--input", str(folder))
    assert spec.backbone.interpolate_mode == (
        "size_antialias" if spec.backbone.num_register_tokens else "size"
    )
    for hw in SIZES:
        x = _images(hw)
        diff = np.abs(
            torch_last_hidden_state(model, x) - jax_last_hidden_state(spec, params, x)
        ).max()
        assert diff <= 1e-5, (hw, diff)


def test_original_layout_import_is_identical(hf_model, tmp_path):
    model, folder = hf_model
    _, spec_hf, params_hf = _import(tmp_path / "a", "--input", str(folder))
    hub = names.hf_to_dinov2(load_file(folder / "model.safetensors"))
    assert len(hub) == 5 + 14 * 2 + 2 + bool(spec_hf.backbone.num_register_tokens)
    raw = tmp_path / "hub.safetensors"
    save_file(hub, raw)
    # a dinov2 training checkpoint: nested, prefixed, FSDP-chunked block keys (recipe s1, s9)
    chunked = {
        "teacher": {
            "backbone." + re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.\1.", k): torch.from_numpy(v)
            for k, v in hub.items()
        }
    }  # 2 chunks for 2 blocks: chunk c holds block c
    pth = tmp_path / "train.pth"
    torch.save(chunked, pth)
    for source in (raw, pth):
        _, spec, params = _import(
            tmp_path / source.stem,
            "--input",
            str(source),
            "--num-heads",
            "2",
            "--interpolate-mode",
            spec_hf.backbone.interpolate_mode,
        )
        assert spec.backbone == spec_hf.backbone
        flat_a, flat_b = names.flatten(params_hf), names.flatten(params)
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]))
        for hw in SIZES[:2]:
            x = _images(hw, 1)
            np.testing.assert_array_equal(
                jax_last_hidden_state(spec, params, x), jax_last_hidden_state(spec_hf, params_hf, x)
            )


def test_original_import_defaults_to_dinov2_offset_interpolation(tmp_path):
    folder = tmp_path / "hf"
    _random_hf(False).save_pretrained(folder)
    save_file(
        names.hf_to_dinov2(load_file(folder / "model.safetensors")), tmp_path / "hub.safetensors"
    )
    _, spec, _ = _import(tmp_path, "--input", str(tmp_path / "hub.safetensors"), "--num-heads", "2")
    assert spec.backbone.interpolate_mode == "offset" and spec.backbone.num_heads == 2


def test_round_trip_to_hf_and_dinov2_bit_for_bit(hf_model, tmp_path):
    model, folder = hf_model
    out, spec, params = _import(tmp_path, "--input", str(folder))
    hf_out = tmp_path / "hf_export"
    assert cli.main(["to-hf", "--checkpoint", str(out), "--out", str(hf_out), "--verify"]) == 0
    original, exported = (
        load_file(folder / "model.safetensors"),
        load_file(hf_out / "model.safetensors"),
    )
    assert original.keys() == exported.keys()
    for key in original:
        np.testing.assert_array_equal(original[key], exported[key])
    config = json.loads((hf_out / "config.json").read_text())
    for field in ("image_size", "patch_size", "layerscale_value", "layer_norm_eps", "hidden_size"):
        assert field in config
    pre = json.loads((hf_out / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == [0.5307] * 3 and pre["crop_size"]["height"] == 56
    reloaded, info = AutoModel.from_pretrained(hf_out, output_loading_info=True)
    assert not any(info.values()), info
    x = _images((56, 56), 2)
    np.testing.assert_allclose(
        torch_last_hidden_state(reloaded.eval(), x),
        torch_last_hidden_state(model, x),
        atol=0,
        rtol=0,
    )

    hub_out = tmp_path / "hub.safetensors"
    assert cli.main(["to-dinov2", "--checkpoint", str(out), "--out", str(hub_out), "--verify"]) == 0
    hub = load_file(hub_out)
    want = names.hf_to_dinov2(original)
    assert hub.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(hub[key], want[key])
    pth_out = tmp_path / "hub.pth"
    assert cli.main(["to-dinov2", "--checkpoint", str(out), "--out", str(pth_out)]) == 0
    pth = torch.load(pth_out, weights_only=True)
    assert set(pth) == set(want) and all(np.array_equal(pth[k].numpy(), want[k]) for k in want)


def test_vit_b14_hub_and_hf_name_counts():
    # recipe s9: 175 hub tensors, 223 HF tensors for ViT-B/14 without registers
    from raddino_jax.convert.to_torch import backbone_to_dinov2
    from raddino_jax.models import ModelSpec, abstract_params
    from raddino_jax.models.vit import vit_config

    abstract = abstract_params(ModelSpec(vit_config("vit_base")))
    zeros = {
        "backbone": {
            k: np.zeros(v.shape, np.float32) for k, v in names.flatten(abstract["backbone"]).items()
        }
    }
    zeros["backbone"] = names.unflatten(zeros["backbone"])
    hub = backbone_to_dinov2(zeros)
    assert len(hub) == 175 and hub["blocks.11.attn.qkv.weight"].shape == (2304, 768)
    assert len(names.dinov2_to_hf(hub)) == 223


def test_v5_names_and_swiglu_import(tmp_path):
    model = _random_hf(False, swiglu=True)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}  # in-memory v5 names
    assert any("q_proj" in k for k in state) and any("gate_proj" in k for k in state)
    folder = tmp_path / "v5"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    _, spec, params = _import(tmp_path, "--input", str(folder))
    assert spec.backbone.ffn_layer == "swiglu"
    x = _images((56, 56))
    diff = np.abs(torch_last_hidden_state(model, x) - jax_last_hidden_state(spec, params, x)).max()
    assert diff <= 1e-5


def test_rad_dino_style_heads(tmp_path, hf_model):
    _, folder = hf_model
    from tests.test_models import TorchDINOHead

    head = TorchDINOHead(32, 48, 24, 8)
    head_file = tmp_path / "dino_head.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in head.state_dict().items()}, head_file)
    out, spec, params = _import(tmp_path, "--input", str(folder), "--heads", str(head_file))
    assert spec.dino_head.out_dim == 48 and spec.dino_head.bottleneck_dim == 8
    back = tmp_path / "back_head.safetensors"
    assert (
        cli.main(
            [
                "to-dinov2",
                "--checkpoint",
                str(out),
                "--out",
                str(tmp_path / "b.safetensors"),
                "--heads",
                str(back),
            ]
        )
        == 0
    )
    original, exported = load_file(head_file), load_file(back)
    assert original.keys() == exported.keys()
    for key in original:
        np.testing.assert_array_equal(original[key], exported[key])


def _hub_state(tmp_path):
    folder = tmp_path / "hf_src"
    _random_hf(False).save_pretrained(folder)
    return names.hf_to_dinov2(load_file(folder / "model.safetensors"))


@pytest.mark.parametrize(
    "corrupt, expect",
    [
        (lambda s: s.pop("blocks.1.mlp.fc2.bias"), ["missing", "blocks/1/mlp/fc2/bias"]),
        (
            lambda s: s.__setitem__("blocks.0.attn.qkv.bias", np.zeros(95, np.float32)),
            ["wrong shape", "blocks.0.attn.qkv.bias"],
        ),
        (
            lambda s: s.__setitem__("blocks.0.attn.rope.weight", np.zeros(3, np.float32)),
            ["unexpected", "blocks.0.attn.rope.weight"],
        ),
    ],
    ids=["missing", "shape", "unknown"],
)
def test_mismatched_inputs_fail_loudly_and_write_nothing(tmp_path, capsys, corrupt, expect):
    state = _hub_state(tmp_path)
    corrupt(state)
    src = tmp_path / "bad.safetensors"
    save_file(state, src)
    out = tmp_path / "out"
    assert cli.main(["from-torch", "--input", str(src), "--out", str(out), "--num-heads", "2"]) == 1
    err = capsys.readouterr().err
    for text in expect:
        assert text in err, err
    assert not out.exists()


def test_wrong_patch_size_flag(tmp_path, capsys):
    src = tmp_path / "hub.safetensors"
    save_file(_hub_state(tmp_path), src)
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "from-torch",
                "--input",
                str(src),
                "--out",
                str(out),
                "--num-heads",
                "2",
                "--patch-size",
                "16",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "patch_size=16" in err and "patch_embed.proj.weight" in err
    assert not out.exists()


def test_hf_config_patch_size_disagreeing_with_weights(tmp_path, capsys):
    folder = tmp_path / "hf"
    _random_hf(False).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["patch_size"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert cli.main(["from-torch", "--input", str(folder), "--out", str(out)]) == 1
    assert "patch_size" in capsys.readouterr().err
    assert not out.exists()


def _hf_folder(tmp_path, registers=False, swiglu=False):
    folder = tmp_path / "hf"
    _random_hf(registers, swiglu).save_pretrained(folder)
    return folder


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _refused(tmp_path, capsys, argv, *expect):
    out = tmp_path / "out"
    assert cli.main(["from-torch", *argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "nothing was written" in err, err
    for text in expect:
        assert text in err, err
    assert not out.exists()
    return err


def test_registers_declared_but_missing_from_weights_is_refused(tmp_path, capsys):
    """The issue's case: a Dinov2WithRegistersModel folder whose model.safetensors lost
    embeddings.register_tokens must not import as a 0-register model."""
    folder = _hf_folder(tmp_path, registers=True)
    tensors = load_file(folder / "model.safetensors")
    del tensors["embeddings.register_tokens"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _refused(tmp_path, capsys, ["--input", str(folder)], "num_register_tokens=2", "register")


def test_registers_default_of_the_with_registers_model_type_is_checked(tmp_path, capsys):
    folder = _hf_folder(tmp_path, registers=True)
    config = json.loads((folder / "config.json").read_text())
    del config["num_register_tokens"]  # transformers then builds 4 registers; the weights have 2
    (folder / "config.json").write_text(json.dumps(config))
    _refused(tmp_path, capsys, ["--input", str(folder)], "num_register_tokens=4")


@pytest.mark.parametrize(
    "changes, expect",
    [
        ({"hidden_size": 48}, "hidden_size=48"),
        ({"num_hidden_layers": 3}, "num_hidden_layers=3"),
        ({"num_attention_heads": 3}, "num_attention_heads=3"),
        ({"mlp_ratio": 2}, "mlp_ratio=2"),
        ({"use_swiglu_ffn": True}, "use_swiglu_ffn=True"),
        ({"image_size": 84}, "image_size=84"),
        ({"num_channels": 1}, "num_channels=1"),
        ({"num_register_tokens": 1}, "num_register_tokens=1"),
        ({"layer_norm_eps": -1.0}, "layer_norm_eps=-1.0"),
        ({"qkv_bias": False}, "qkv_bias=False"),
        ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_each_declared_field_must_agree_with_the_weights(tmp_path, capsys, changes, expect):
    folder = _hf_folder(tmp_path)
    _edit_config(folder, **changes)
    _refused(tmp_path, capsys, ["--input", str(folder)], expect)


def test_layerscale_declared_but_absent_is_refused(tmp_path, capsys):
    folder = _hf_folder(tmp_path)
    tensors = {
        k: v for k, v in load_file(folder / "model.safetensors").items() if "layer_scale" not in k
    }
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _refused(tmp_path, capsys, ["--input", str(folder)], "layerscale_value")


def test_swiglu_mlp_ratio_is_checked(tmp_path, capsys):
    folder = _hf_folder(tmp_path, swiglu=True)
    _import(tmp_path / "ok", "--input", str(folder))  # the untouched folder imports
    _edit_config(folder, mlp_ratio=2)
    _refused(tmp_path, capsys, ["--input", str(folder)], "mlp_ratio=2", "weights_in")


def test_num_heads_flag_contradicting_config_json_is_refused(tmp_path, capsys):
    folder = _hf_folder(tmp_path)
    _refused(tmp_path, capsys, ["--input", str(folder), "--num-heads", "4"], "--num-heads=4")


def _head_file(tmp_path, out_dim=48):
    from tests.test_models import TorchDINOHead

    head = TorchDINOHead(32, out_dim, 24, 8)
    path = tmp_path / "heads" / "dino_head.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().numpy().copy() for k, v in head.state_dict().items()}, path)
    return path


def test_head_sizes_declared_in_dinov2_yaml_must_agree(tmp_path, capsys):
    folder = _hf_folder(tmp_path)
    head = _head_file(tmp_path)
    # RAD-DINO ships its dinov2 configs next to the head: the run config overrides the defaults.
    (head.parent / "ssl_default_config.yaml").write_text(
        "dino:\n  head_n_prototypes: 65536\n  head_hidden_dim: 24\n  head_bottleneck_dim: 8\n"
        "  head_nlayers: 3\n"
    )
    (head.parent / "vitb14_cxr.yaml").write_text("dino:\n  head_n_prototypes: 48\n")
    _import(tmp_path / "ok", "--input", str(folder), "--heads", str(head))
    (head.parent / "vitb14_cxr.yaml").write_text("dino:\n  head_bottleneck_dim: 16\n")
    _refused(
        tmp_path,
        capsys,
        ["--input", str(folder), "--heads", str(head)],
        "dino.head_n_prototypes in ssl_default_config.yaml, vitb14_cxr.yaml = 65536",
        "dino.head_bottleneck_dim",
    )


def test_exported_head_declares_its_sizes_and_import_checks_them(tmp_path, capsys):
    folder = _hf_folder(tmp_path)
    out, _, _ = _import(
        tmp_path / "a", "--input", str(folder), "--heads", str(_head_file(tmp_path))
    )
    back = tmp_path / "export" / "dino_head.safetensors"
    argv = [
        "to-dinov2",
        "--checkpoint",
        str(out),
        "--out",
        str(tmp_path / "export" / "b.safetensors"),
    ]
    assert cli.main([*argv, "--heads", str(back)]) == 0
    from raddino_jax.convert import declared

    sizes = {k: v for k, (v, _) in declared.declared_head_sizes(back).items()}
    assert sizes == {
        "head_n_prototypes": 48,
        "head_hidden_dim": 24,
        "head_bottleneck_dim": 8,
        "head_nlayers": 3,
    }
    _import(tmp_path / "b", "--input", str(folder), "--heads", str(back))  # agrees: imports
    tensors = load_file(back)
    tensors["last_layer.weight_v"] = tensors["last_layer.weight_v"][:40]
    tensors["last_layer.weight_g"] = tensors["last_layer.weight_g"][:40]
    save_file(tensors, back, metadata={"format": "pt", **{k: str(v) for k, v in sizes.items()}})
    _refused(
        tmp_path,
        capsys,
        ["--input", str(folder), "--heads", str(back)],
        "head_n_prototypes in the metadata of dino_head.safetensors = 48: the tensors have 40",
    )
