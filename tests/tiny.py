"""Tiny shared building blocks for the training tests (a few layers, small crops)."""

from __future__ import annotations

import cv2
import numpy as np

from configs import tiny
from raddino_jax.data import augment, pipeline
from raddino_jax.models import ModelSpec, abstract_params
from raddino_jax.models.heads import HeadConfig
from raddino_jax.models.vit import vit_config
from raddino_jax.ssl.schedules import build_schedules
from raddino_jax.train.optim import OptimizerConfig, build_optimizer

GLOBAL, LOCAL, N_LOCAL = tiny.GLOBAL_SIZE, tiny.LOCAL_SIZE, tiny.N_LOCAL


def tiny_spec(k: int = 64, embed_dim: int = 32) -> ModelSpec:
    return ModelSpec(
        vit_config(
            "vit_small",
            embed_dim=embed_dim,
            depth=2,
            num_heads=2,
            img_size=GLOBAL,
            layerscale_init=0.1 if embed_dim == 32 else 1.0,
        ),
        HeadConfig(in_dim=embed_dim, out_dim=k, hidden_dim=embed_dim, bottleneck_dim=16),
    )


def synthetic_source(n: int = 32, seed: int = 0) -> list[dict]:
    """PNG-encoded grey images, each a distinct texture: a sinusoidal grating (random orientation,
    frequency, contrast, brightness) under a few bright blobs. Distinct textures give distinct
    features from the start, so a 100-step run has structure to learn."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:72, 0:64].astype(np.float32)
    records = []
    for _ in range(n):
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.5)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * freq
        image = rng.uniform(60, 190) + rng.uniform(20, 60) * np.sin(phase)
        for _ in range(rng.integers(0, 3)):
            centre = (int(rng.integers(8, 56)), int(rng.integers(8, 64)))
            mask = np.zeros((72, 64), np.uint8)
            cv2.circle(mask, centre, int(rng.integers(4, 14)), 1, -1)
            image = np.where(mask > 0, 250.0, image)
        image = np.clip(image, 0, 255).astype(np.uint8)
        records.append({"image": cv2.imencode(".png", image)[1].tobytes()})
    return records


def tiny_dataset(
    batch: int = 16, group: int = 2, seed: int = 0, source=None, transfer_dtype: str = "float32"
):
    """The pipeline over `synthetic_source`; crops host-normalised float32 unless
    `transfer_dtype` says otherwise (tests that call the loss directly need floats)."""
    crop = augment.MultiCropConfig(
        global_size=GLOBAL, local_size=LOCAL, n_local=N_LOCAL, transfer_dtype=transfer_dtype
    )
    return pipeline.make_dataset(
        source if source is not None else synthetic_source(),
        seed=seed,
        per_process_batch=batch,
        crop_cfg=crop,
        mask_group_size=group,
        process_index=0,
        process_count=1,
    )


def tiny_optimizer(spec: ModelSpec, total_steps: int = 100, global_batch: int = 16, **schedule):
    """(optimizer, schedules) of the recipe's shape with short lengths; `schedule` overrides
    any `build_schedules` argument."""
    schedules = build_schedules(
        **{
            "base_lr": 2e-3,
            "global_batch": global_batch,
            "total_steps": total_steps,
            "warmup_steps": 10,
            "freeze_last_layer_steps": 5,
            "warmup_teacher_temp_steps": 20,
            "momentum_teacher": 0.99,
            "min_lr": 1e-6,
            "weight_decay": 0.04,
            "weight_decay_end": 0.4,
            "warmup_teacher_temp": 0.04,
            "teacher_temp": 0.07,
            **schedule,
        }
    )
    optimizer = build_optimizer(
        abstract_params(spec),
        OptimizerConfig(),
        lr_schedule=schedules.lr,
        last_layer_lr_schedule=schedules.last_layer_lr,
        wd_schedule=schedules.weight_decay,
    )
    return optimizer, schedules


def tiny_run_config(data_dir: str, name: str, **overrides):
    """`configs/tiny.py` over a prebuilt tiny dataset, with {"data.global_size": 56, ...}."""
    c = tiny.get_config()
    c.data.dir, c.data.name = data_dir, name
    return set_dotted(c, overrides)


def set_dotted(config, overrides: dict):
    """Apply {"data.global_size": 56, ...} to a ConfigDict (like --config.key=value)."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def build_tiny_dataset(root) -> tuple[str, str]:
    """Built-in samples (few phantoms, 64 px records) as a tfds dataset under `root`."""
    from data_prep.build import BuildOptions, build_dataset
    from data_prep.samples import generate_samples

    generate_samples(f"{root}/samples", n_phantoms=24, size=64, seed=0)
    build_dataset(
        BuildOptions(
            input=f"{root}/samples/labels.csv",
            output=f"{root}/tfds",
            name="tiny",
            size=64,
            workers=1,
        )
    )
    return f"{root}/tfds", "tiny"
