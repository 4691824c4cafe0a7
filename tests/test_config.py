"""The config schema: one declaration per default, every knob reachable, errors name the key."""

import dataclasses
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from raddino_jax import config as config_lib
from raddino_jax.data.augment import MultiCropConfig
from raddino_jax.models.heads import HeadConfig
from raddino_jax.models.vit import ViTConfig
from raddino_jax.parallel import sharding
from raddino_jax.ssl.objective import ObjectiveConfig
from raddino_jax.train import build as build_lib
from raddino_jax.train import optim
from raddino_jax.train.optim import OptimizerConfig
from tests.tiny import set_dotted

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_every_dataclass_field_is_a_config_key_with_the_dataclass_default():
    """Walk the schema: each field of each section dataclass is reachable from the ConfigDict
    (or documented as derived), and its default is the dataclass's own: declared once."""
    c = config_lib.base_config()
    walked = 0
    for section, cls, prefix in config_lib.SECTIONS:
        for field in dataclasses.fields(cls):
            key = f"{section}.{prefix}{field.name}"
            walked += 1
            if key in config_lib.DERIVED_FIELDS:
                continue
            assert prefix + field.name in c[section], f"{key} is not reachable from the config"
            assert c[section][prefix + field.name] == field.default, key
    assert walked == sum(len(dataclasses.fields(cls)) for _, cls, _ in config_lib.SECTIONS)
    # Every derived entry names a real field.
    real = {
        f"{s}.{p}{f.name}" for s, cls, p in config_lib.SECTIONS for f in dataclasses.fields(cls)
    }
    assert set(config_lib.DERIVED_FIELDS) <= real


def test_formerly_unreachable_knobs_reach_the_built_objects():
    c = config_lib.base_config()
    set_dotted(
        c,
        {
            "data.blur_p": (0.1, 0.2, 0.3),
            "data.jitter_p": 0.5,
            "data.solarize_p": 0.0,
            "optim.eps": 1e-6,
            "model.ffn_layer": "swiglu",
            "model.layer_norm_eps": 1e-5,
            "optim.wd_mult_rules": ((r"bias$", 0.0),),
        },
    )
    crops = build_lib.crop_config(c)
    assert crops.blur_p == (0.1, 0.2, 0.3) and crops.jitter_p == 0.5 and crops.solarize_p == 0.0
    assert build_lib.optimizer_config(c).eps == 1e-6
    assert build_lib.optimizer_config(c).wd_mult_rules == ((r"bias$", 0.0),)
    spec = build_lib.model_spec(c)
    assert spec.backbone.ffn_layer == "swiglu" and spec.backbone.layer_norm_eps == 1e-5
    assert spec.dino_head.in_dim == spec.backbone.embed_dim  # derived, not a knob


def test_arch_presets_fill_fields_left_at_their_sentinel():
    c = config_lib.base_config()
    c.model.arch = "vit_giant2"
    backbone = build_lib.model_spec(c).backbone
    assert (backbone.embed_dim, backbone.depth, backbone.ffn_layer) == (1536, 40, "swiglu")
    c.model.ffn_layer, c.model.depth = "mlp", 2
    backbone = build_lib.model_spec(c).backbone
    assert (backbone.ffn_layer, backbone.depth, backbone.img_size) == ("mlp", 2, 224)


def test_rule_tables_are_config_data():
    c = config_lib.base_config()
    assert build_lib.tensor_rules(c) == sharding.TENSOR_RULES
    c.sharding.tensor_rules = ((r"attn/qkv/kernel$", ("tensor", None)),)
    rules = build_lib.tensor_rules(c)
    mesh = sharding.jax.sharding.AbstractMesh((1, 1, 2), ("data", "fsdp", "tensor"))
    spec = sharding.param_spec("backbone/blocks/0/attn/qkv/kernel", (64, 192), mesh, rules)
    assert spec == sharding.PartitionSpec("tensor", None)
    # The optimizer's rules too: a lr rule from the config changes the multipliers.
    c.model.update(arch="vit_small", embed_dim=32, depth=1, num_heads=2, head_out_dim=8)
    c.model.update(head_hidden_dim=16, head_bottleneck_dim=8)
    c.optim.lr_mult_rules = ((r"^dino_head/", 0.5),)
    from raddino_jax.models import abstract_params

    params = abstract_params(build_lib.model_spec(c))
    lr_mult, _, _ = optim.param_multipliers(params, build_lib.optimizer_config(c))
    assert lr_mult["dino_head"]["mlp"][0]["kernel"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"model.drop_path_rate": 1.5}, "config.model.drop_path_rate"),
        ({"model.dtype": "float16"}, "config.model.dtype"),
        ({"model.ffn_layer": "geglu"}, "config.model.ffn_layer"),
        ({"ssl.center_momentum": 1.0}, "config.ssl.center_momentum"),
        ({"data.blur_kernel": 4}, "config.data.blur_kernel"),
        ({"data.std": 0.0}, "config.data.std"),
        ({"optim.eps": 0.0}, "config.optim"),
        ({"optim.wd_mult_rules": (("(", 0.0),)}, "config.optim.wd_mult_rules"),
        ({"optim.wd_mult_rules": ((r"gama", 0.0),)}, "config.optim"),
        ({"data.transfer_dtype": "int8"}, "config.data.transfer_dtype"),
        ({"data.device_prefetch": -1}, "config.data.device_prefetch"),
        ({"preemption_check_every": 0}, "config.preemption_check_every"),
    ],
)
def test_dataclass_validation_errors_name_the_config_key(overrides, key):
    c = config_lib.base_config()
    c.model.update(arch="vit_small", embed_dim=32, depth=1, num_heads=2, head_out_dim=8)
    c.batch_size, c.data.global_size, c.data.local_size = 8, 28, 14
    set_dotted(c, overrides)
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        config_lib.validate(c, n_devices=1, process_count=1)


def test_command_line_reaches_new_keys(tmp_path):
    """`--config.x=y` for knobs that had no key before (tuples included), via absl flags."""
    script = tmp_path / "show.py"
    script.write_text(
        textwrap.dedent(
            """
            from absl import app
            from ml_collections import config_flags
            from raddino_jax.train import build as build_lib
            CONFIG = config_flags.DEFINE_config_file("config")
            def main(_):
                c = CONFIG.value
                print(build_lib.crop_config(c).blur_p, build_lib.optimizer_config(c).eps,
                      build_lib.model_spec(c).backbone.ffn_layer)
            app.run(main)
            """
        )
    )
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            "--config=configs/vitb14.py",
            "--config.data.blur_p=(0.5,0.5,0.5)",
            "--config.optim.eps=1e-6",
            "--config.model.ffn_layer=swiglu",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(0.5,", "0.5,", "0.5)", "1e-06", "swiglu"]


def test_section_dataclasses_are_the_ones_the_code_consumes():
    kinds = {cls for _, cls, _ in config_lib.SECTIONS}
    assert kinds == {ViTConfig, HeadConfig, ObjectiveConfig, OptimizerConfig, MultiCropConfig}
