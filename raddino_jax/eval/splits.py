"""Train / val / test roles for frozen-feature evaluation, split by patient.

The dataset's own train / val / test splits (data_prep splits by patient) are kept; a missing
val or test split is carved out of train by patient (patient_id, else the file:
`features.group_ids`), `CARVE_FRACTION` of train's patients each. Patient overlaps between the
resulting roles are counted and reported, not fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from raddino_jax.eval import features as feats

CARVE_FRACTION = 0.15  # share of train patients moved to a missing val / test split


def assign_roles(
    split_names: Sequence[str], fields: dict[str, np.ndarray], seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Role ("train" / "val" / "test") of every example of the stacked splits.

    `fields` must hold `_split` (the source split name per example). Given val / test splits
    are kept; a missing one is carved out of train by patient (`CARVE_FRACTION` of its
    patients). Returns (roles [N] object array, info with counts and patient overlaps).
    """
    roles = np.asarray([s if s in feats.SPLIT_ROLES else "" for s in fields["_split"]], object)
    groups = feats.group_ids(fields)
    missing = [r for r in ("val", "test") if r not in split_names]
    carved = {}
    if missing:
        in_train = roles == "train"
        fractions = (CARVE_FRACTION, CARVE_FRACTION if len(missing) == 2 else 0.0)
        first, second = feats.split_by_patient(groups[in_train], fractions, seed)
        index = np.nonzero(in_train)[0]
        for role, chosen in zip(missing, (first, second)):
            roles[index[chosen]] = role
        carved = {r: "carved out of train by patient" for r in missing}
    patients = {r: set(groups[roles == r]) for r in feats.SPLIT_ROLES}
    overlap = {
        f"{a}-{b}": len(patients[a] & patients[b])
        for i, a in enumerate(feats.SPLIT_ROLES)
        for b in feats.SPLIT_ROLES[i + 1 :]
    }
    info = {
        "dataset_splits": list(split_names),
        "counts": {r: int(np.sum(roles == r)) for r in feats.SPLIT_ROLES},
        "carved": carved,
        "patient_overlap": overlap,
    }
    return roles, info


def load_roles(
    data_dir: str,
    name: str,
    image_size: int,
    *,
    max_examples: int | None,
    with_masks: bool,
    seed: int,
) -> tuple[dict[str, feats.SplitData], dict[str, Any]]:
    """train / val / test SplitData at `image_size` (see `assign_roles`)."""
    from raddino_jax.data.records import dataset_contents  # tensorflow_datasets: only here

    split_names = sorted(dataset_contents(data_dir, name)[1])
    parts = []
    for split in split_names:
        part = feats.load_split(
            data_dir, name, split, image_size, max_examples=max_examples, with_masks=with_masks
        )
        part.fields["_split"] = np.asarray([split] * len(part), dtype=object)
        parts.append(part)
    data = feats.concatenate(parts)
    roles, info = assign_roles(split_names, data.fields, seed)
    return {r: data.subset(roles == r) for r in feats.SPLIT_ROLES}, info
