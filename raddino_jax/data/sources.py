"""Where training records come from: a built tfds dataset, a mixture of them, or the built-in
samples; optionally a nested, patient-level subset of them (`config.data.fraction`)."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

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
    from raddino_jax.data.builder import BuildOptions, build_dataset
    from raddino_jax.data.samples.generate import generate_samples

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


def open_training_split(data_dir: str, name: str, split: str):
    """Random-access records (PNG bytes undecoded) of one split."""
    from raddino_jax.data.records import open_split

    source = open_split(data_dir, name, split)
    if len(source) == 0:
        raise ValueError(f"{epath.Path(data_dir) / name} split {split!r} has no records")
    return source


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """What the loop trains on: `records` is one random-access source or a `mixture.Mixture`;
    (data_dir, name) is the first dataset (the built-in samples' location when none is set)."""

    records: Any
    data_dir: str
    name: str
    source_names: tuple[str, ...]  # one per mixture source; () for a single source


def subset_key(record) -> str:
    """The unit a subset keeps or drops whole: the patient (else the file)."""
    patient = record.get("patient_id", b"") or record.get("path", b"")
    return patient.decode() if isinstance(patient, bytes) else str(patient)


def patient_rank(key: str) -> float:
    """A patient's fixed position in [0, 1): a subset of fraction f keeps the patients with
    rank < f, so it is deterministic and contained in every larger fraction's subset."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class Subset:
    """`source` restricted to `indices` (random access, like the source)."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[int(self.indices[index])]


# Records per raw read while scanning the patient ids (ArrayRecord reads a batch in parallel).
SUBSET_SCAN_CHUNK = 1024
_SUBSET_FEATURES = ("patient_id", "path")


def subset_keys(source) -> list[str]:
    """`subset_key` of every record of `source`, in order.

    A tfds ArrayRecord source (`records.open_split`) is read as raw serialized records, in
    chunks, and only the patient_id / path features are taken out of each: the full tfds
    deserialisation of every feature (the image bytes included) is skipped. Any other
    random-access source (a list of dicts in tests) is indexed.
    """
    raw = getattr(source, "data_source", None)  # tfds ArrayRecordDataSource: the raw records
    if raw is None:
        return [subset_key(source[i]) for i in range(len(source))]
    from tensorflow_datasets.proto import tf_example_pb2

    keys = []
    for start in range(0, len(source), SUBSET_SCAN_CHUNK):
        chunk = range(start, min(start + SUBSET_SCAN_CHUNK, len(source)))
        for serialized in raw.__getitems__(chunk):
            features = tf_example_pb2.Example.FromString(serialized).features.feature
            ids = {
                name: features[name].bytes_list.value[0]
                for name in _SUBSET_FEATURES
                if name in features and features[name].bytes_list.value
            }
            keys.append(subset_key(ids))
    return keys


def patient_subset(source, fraction: float) -> Subset:
    """The records of the patients whose `patient_rank` is below `fraction` (one pass over the
    source reading only the patient ids: `subset_keys`). Nested: a smaller fraction's records
    are a subset of a larger one's; patient-disjoint: a patient's images are all kept or all
    dropped."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    keys = subset_keys(source)
    keep = [i for i, key in enumerate(keys) if patient_rank(key) < fraction]
    return Subset(source, np.asarray(keep, np.int64))


def open_training_data(config, workdir: str | epath.Path) -> TrainingData:
    """`config.data`'s records: the built-in samples (data.builtin), data.dir/data.name, or
    the weighted mixture of data.sources; each restricted to `data.fraction` of its patients."""
    from raddino_jax.data.mixture import Mixture, mixture_weights

    d = config.data

    def open_one(data_dir: str, name: str):
        source = open_training_split(data_dir, name, d.split)
        if d.fraction < 1:
            source = patient_subset(source, d.fraction)
            if len(source) == 0:
                raise ValueError(
                    f"config.data.fraction: {d.fraction} keeps no patient of "
                    f"{epath.Path(data_dir) / name}; raise it"
                )
        return source

    if d.sources:
        opened = [open_one(data_dir, name) for name, data_dir, _ in d.sources]
        weights = mixture_weights([len(s) for s in opened], [w for *_, w in d.sources])
        names = source_names([name for name, _, _ in d.sources])
        mixture = Mixture(tuple(opened), weights, names)
        return TrainingData(mixture, d.sources[0][1], d.sources[0][0], names)
    if not d.builtin:
        return TrainingData(open_one(d.dir, d.name), d.dir, d.name, ())
    data_dir, name = builtin_dataset(workdir, d.builtin_phantoms, d.builtin_size)
    return TrainingData(open_one(data_dir, name), data_dir, name, ())


def source_names(names) -> tuple[str, ...]:
    """Metric-friendly names of the mixture's sources; repeats get a suffix (_2, _3, ...)."""
    out, seen = [], {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return tuple(out)
