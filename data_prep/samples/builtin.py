"""The built-in samples as a training dataset: what `config.data.builtin=True` trains on.

The command lines that honour data.builtin (`raddino_jax.main`, `raddino_jax.scaling`) hand
`builtin_dataset` to the loop (`sources.open_training_data(..., make_builtin=...)`); the
runtime package itself never imports the generator.
"""

from __future__ import annotations

import jax
from absl import logging
from etils import epath

from data_prep.samples.generate import generate_samples
from raddino_jax.data.builder import BuildOptions, build_dataset

BUILTIN_NAME = "samples"
# The built-in samples serve the demo: pretraining reads train, and the held-out evaluation
# needs a test split large enough for bootstrap intervals (>= 200 images from 500 phantoms),
# hence a larger test share than the generator's 70/15/15 default.
BUILTIN_SPLIT_FRACTIONS = {"train": 0.45, "val": 0.10, "test": 0.45}


def builtin_dataset(workdir: str | epath.Path, n_phantoms: int, size: int) -> tuple[str, str]:
    """Materialise the built-in samples as a tfds dataset under WORKDIR (once; re-runs reuse it).

    Phantom patients are split by `BUILTIN_SPLIT_FRACTIONS`. Process 0 generates and builds,
    the others wait at a barrier. Returns (data_dir, name).
    """
    root = epath.Path(workdir) / "builtin"
    samples, data_dir = root / "samples", root / "tfds"
    if jax.process_index() == 0:
        if not (samples / "labels.csv").exists():
            logging.info("generating the built-in samples in %s", samples)
            generate_samples(
                samples,
                n_phantoms=n_phantoms,
                size=max(size, 64),
                seed=0,
                split_fractions=BUILTIN_SPLIT_FRACTIONS,
            )
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
