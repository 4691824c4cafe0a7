"""Where training records come from: a built tfds dataset, or the built-in samples."""

from __future__ import annotations

import jax
from absl import logging
from etils import epath

BUILTIN_NAME = "samples"


def builtin_dataset(workdir: str | epath.Path, n_phantoms: int, size: int) -> tuple[str, str]:
    """Materialise the built-in samples as a tfds dataset under WORKDIR (once; re-runs reuse it).

    Process 0 generates and builds, the others wait at a barrier. Returns (data_dir, name).
    """
    from raddino_jax.data.builder import BuildOptions, build_dataset
    from raddino_jax.data.samples.generate import generate_samples

    root = epath.Path(workdir) / "builtin"
    samples, data_dir = root / "samples", root / "tfds"
    if jax.process_index() == 0:
        if not (samples / "labels.csv").exists():
            logging.info("generating the built-in samples in %s", samples)
            generate_samples(samples, n_phantoms=n_phantoms, seed=0)
        build_dataset(
            BuildOptions(
                input=str(samples / "labels.csv"),
                output=str(data_dir),
                name=BUILTIN_NAME,
                size=size,
                workers=1,
            )
        )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("raddino_jax builtin samples ready")
    return str(data_dir), BUILTIN_NAME


def open_training_split(data_dir: str, name: str, split: str):
    """Random-access records (PNG bytes undecoded) of one split."""
    from raddino_jax.data.records import open_split

    source = open_split(data_dir, name, split)
    if len(source) == 0:
        raise ValueError(f"{epath.Path(data_dir) / name} split {split!r} has no records")
    return source
