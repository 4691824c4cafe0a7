"""Where training records come from: a built tfds dataset, a mixture of them, or the built-in
samples (made by `data_prep.samples.builtin`, handed in by the command line); optionally a
nested, patient-level subset of them (`config.data.fraction`)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from raddino_jax import config as config_lib

# (workdir, n_phantoms, size) -> (data_dir, name): `data_prep.samples.builtin.builtin_dataset`
MakeBuiltin = Callable[[epath.Path, int, int], tuple[str, str]]

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


def open_training_data(
    config, workdir: str | epath.Path, make_builtin: MakeBuiltin | None = None
) -> TrainingData:
    """`config.data`'s records: the built-in samples (data.builtin, made by `make_builtin`),
    data.dir/data.name, or the weighted mixture of data.sources; each restricted to
    `data.fraction` of its patients."""
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
    if make_builtin is None:
        raise ValueError(
            "config.data.builtin=True: the built-in samples are made by the command lines "
            "(python -m raddino_jax.main / raddino_jax.scaling); elsewhere build them with "
            "data_prep.samples + data_prep.build and set data.dir/data.name"
        )
    data_dir, name = make_builtin(epath.Path(workdir), d.builtin_phantoms, d.builtin_size)
    return TrainingData(open_one(data_dir, name), data_dir, name, ())


def source_names(names) -> tuple[str, ...]:
    """Metric-friendly names of the mixture's sources; repeats get a suffix (_2, _3, ...)."""
    out, seen = [], {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return tuple(out)


def training_datasets(
    config: ml_collections.ConfigDict, builtin: tuple[str, str] | None = None
) -> list[tuple[str, str, str]]:
    """(report name, data_dir, tfds name) of each configured training dataset: the mixture's
    sources (named as in `images_seen/<name>`), data.dir/data.name, or the built-in samples
    at `builtin` (data_dir, name) once they exist."""
    d = config.data
    if d.sources:
        names = source_names([name for name, _, _ in d.sources])
        return [(n, data_dir, name) for n, (name, data_dir, _) in zip(names, d.sources)]
    if d.dir:
        return [(d.name, d.dir, d.name)]
    return [(builtin[1], *builtin)] if builtin else []


def validate_data(d: ml_collections.ConfigDict, choice: bool = True) -> None:
    """config.data's sources, fraction and dataset paths (they must exist); with `choice`,
    also that exactly one of them names the training data (a sweep needs none)."""
    _validate_sources(d)
    if choice:
        _validate_data_choice(d)
    if d.dir or d.name:
        config_lib.require(
            bool(d.dir) and bool(d.name), "data.dir", "set both data.dir and data.name"
        )
        path = epath.Path(d.dir) / d.name
        config_lib.require(
            path.exists(),
            "data.dir",
            f"{path} does not exist; build it with `python -m data_prep.build` (or set "
            "data.dir/data.name empty and data.builtin=True to use the built-in samples)",
        )


def _validate_data_choice(d: ml_collections.ConfigDict) -> None:
    """Exactly one of data.dir/data.name, data.sources and data.builtin names the training data:
    an empty data.dir never falls back to the built-in samples silently."""
    if d.builtin:
        config_lib.require(
            not d.dir and not d.name and not d.sources,
            "data.builtin",
            "trains on the built-in samples: leave data.dir, data.name and data.sources empty, "
            "or set data.builtin=False to train on them",
        )
        return
    config_lib.require(
        bool(d.dir or d.name or d.sources),
        "data.dir",
        "no training data: set data.dir and data.name to a dataset built with `python -m "
        "data_prep.build` (or data.sources to a mixture), or data.builtin=True to train on "
        "the built-in samples (a demo, not a radiograph corpus)",
    )


def _validate_sources(d: ml_collections.ConfigDict) -> None:
    """data.sources entries and data.fraction (the datasets must exist)."""
    config_lib.require(0 < d.fraction <= 1, "data.fraction", f"must be in (0, 1], got {d.fraction}")
    if not d.sources:
        return
    config_lib.require(
        not d.dir and not d.name,
        "data.sources",
        "set either data.sources or data.dir/data.name, not both",
    )
    for i, entry in enumerate(d.sources):
        key = f"data.sources[{i}]"
        config_lib.require(
            isinstance(entry, list | tuple) and len(entry) == 3,
            key,
            f"{entry!r} must be (tfds name, data_dir, weight)",
        )
        name, data_dir, weight = entry
        config_lib.require(
            isinstance(name, str) and isinstance(data_dir, str) and bool(name) and bool(data_dir),
            key,
            f"{entry!r}: name and data_dir must be non-empty strings",
        )
        config_lib.require(
            weight == "proportional"
            or (isinstance(weight, int | float) and not isinstance(weight, bool) and weight > 0),
            key,
            f"weight {weight!r} must be a number > 0 or 'proportional'",
        )
        path = epath.Path(data_dir) / name
        config_lib.require(
            path.exists(), key, f"{path} does not exist; build it with `python -m data_prep.build`"
        )
    kinds = {entry[2] == "proportional" for entry in d.sources}
    config_lib.require(
        len(kinds) == 1,
        "data.sources",
        "weights must all be numbers or all be 'proportional'",
    )
