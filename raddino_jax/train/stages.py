"""Resolution stages of one run (`config.stages`): which crop sizes and batch size each step uses.

The first stage is the top-level config (`data.global_size`, `data.local_size`, `batch_size`)
from step 0. `config.stages` lists the later ones as (start step, global size, local size,
batch size) tuples, each starting before `total_steps`. E.g. the DINOv2 recipe's short
high-resolution stage at the end of a run, on configs/vitb14.py (100k steps) trained at
224 px globals (`data.global_size = 224`) until its last 10k steps:

    config.stages = ((90_000, 518, 98, 2560),)

Each stage has its own config (the run's, with the stage's sizes), so everything that reads
sizes from a config (crop and mask specs, `config.step_flops`, the batch checks of
`config.validate`) follows the stage. The model keeps the first stage's `img_size`: the
position embeddings are interpolated to the other sizes, as for any input size. The learning
rate keeps the first stage's batch scaling, so the schedules are one function of the step.

The data stream is continuous across stages: stage k starts at the global stream position
where stage k-1 stopped (`Stage.start_position`, the images consumed before it), so an image's
position, and with it its shuffle order and crop randomness, does not depend on the stages.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class Stage:
    """Steps [start_step, end_step) at one resolution; `config` is the run config with the
    stage's sizes; `start_position` counts the images (global) consumed before the stage."""

    index: int
    start_step: int
    end_step: int
    global_size: int
    local_size: int
    batch_size: int
    start_position: int
    config: ml_collections.ConfigDict


class StageError(ValueError):
    """A `config.stages` entry is malformed; the message names the entry."""


def _entry(config: ml_collections.ConfigDict, index: int, entry) -> tuple[int, int, int, int]:
    where = f"config.stages[{index}]"
    if not isinstance(entry, list | tuple) or len(entry) != 4:
        raise StageError(
            f"{where}: {entry!r} must be (start step, global size, local size, batch size)"
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in entry):
        raise StageError(f"{where}: {entry!r} must hold 4 positive integers")
    start = entry[0]
    if start >= config.total_steps:
        raise StageError(
            f"{where}: start step {start} is not before total_steps={config.total_steps}; a "
            "stage must start inside the run (or raise total_steps)"
        )
    return tuple(entry)


def stage_config(
    config: ml_collections.ConfigDict, global_size: int, local_size: int, batch_size: int
) -> ml_collections.ConfigDict:
    """The run config with one stage's sizes; the model keeps the first stage's img_size."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.model.img_size = config.model.img_size or config.data.global_size
    out.data.global_size, out.data.local_size = global_size, local_size
    out.batch_size = batch_size
    out.stages = ()
    out.lock()
    return out


def stage_table(config: ml_collections.ConfigDict) -> tuple[Stage, ...]:
    """Every stage of the run, in order; the last ends at total_steps.

    Raises StageError naming the entry for a malformed one, a start step that is not after
    the previous stage's, or one at or past total_steps.
    """
    first = (0, config.data.global_size, config.data.local_size, config.batch_size)
    entries = [first]
    for i, entry in enumerate(config.stages):
        start, *sizes = _entry(config, i, entry)
        if start <= entries[-1][0]:
            previous = "step 0 (the top-level stage)" if i == 0 else f"step {entries[-1][0]}"
            raise StageError(
                f"config.stages[{i}]: start step {start} must come after {previous}; the first "
                "stage is data.global_size/local_size and batch_size from step 0, list only "
                "the later ones"
            )
        entries.append((start, *sizes))
    stages, position = [], 0
    for i, (start, global_size, local_size, batch) in enumerate(entries):
        end = entries[i + 1][0] if i + 1 < len(entries) else config.total_steps
        cfg = config if len(entries) == 1 else stage_config(config, global_size, local_size, batch)
        stages.append(Stage(i, start, end, global_size, local_size, batch, position, cfg))
        position += (end - start) * batch
    return tuple(stages)


def stage_at(stages: tuple[Stage, ...], step: int) -> Stage:
    """The stage that runs `step` (0-based; the step after the last runs in the last stage)."""
    for stage in stages:
        if step < stage.end_step:
            return stage
    return stages[-1]


def images_before(stages: tuple[Stage, ...], step: int) -> int:
    """Global images consumed by steps [0, step): the stream position of step `step`."""
    stage = stage_at(stages, step)
    return stage.start_position + (step - stage.start_step) * stage.batch_size



# Every step-denominated setting that belongs to the recipe, and so scales with the run length
# (`scale_to_steps`). Adding a key here is all a new schedule length needs. The start steps of
# `stages` scale too. Not listed, on purpose: the cadences of running the run (log_every,
# checkpoint_every, eval.every, preemption_check_every, profile_steps) are about the machine,
# not the recipe, and a run always saves at its last step.
STEP_SCHEDULE_KEYS: tuple[str, ...] = (
    "optim.warmup_steps",
    "optim.freeze_last_layer_steps",
    "optim.freeze_backbone_steps",
    "teacher.warmup_temperature_steps",
    "ssl.gram_start_step",
    "ssl.gram_update_every",
)


def scale_to_steps(
    config: ml_collections.ConfigDict, total_steps: int
) -> tuple[ml_collections.ConfigDict, dict[str, tuple[Any, Any]]]:
    """A copy of `config` that runs `total_steps` steps, with every step-denominated schedule
    (`STEP_SCHEDULE_KEYS` and the stage start steps) scaled by total_steps / config.total_steps,
    so a shortened run keeps the recipe's proportions (10k of 100k warm-up steps -> 1,250 of
    12,500) instead of spending most of it warming up with a frozen last layer.

    Values are rounded to whole steps; a non-zero value stays at least 1 and 0 stays 0 (off).
    Returns (config, {key: (old, new)} for every value that changed), for the caller to print.
    `raddino_jax.scaling` uses it for every run; call it to shorten any config.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps: must be > 0, got {total_steps}")
    ratio = total_steps / config.total_steps

    def scaled(value: int) -> int:
        return max(1, round(value * ratio)) if value else 0

    out = ml_collections.ConfigDict(config.to_dict())
    changes: dict[str, tuple[Any, Any]] = {}
    if total_steps != config.total_steps:
        changes["total_steps"] = (config.total_steps, total_steps)
    out.total_steps = total_steps
    for key in STEP_SCHEDULE_KEYS:
        section, name = key.split(".")
        old = config[section][name]
        out[section][name] = scaled(old)
        if out[section][name] != old:
            changes[key] = (old, out[section][name])
    if config.stages:
        stages = tuple((scaled(start), *sizes) for start, *sizes in config.stages)
        if stages != tuple(tuple(entry) for entry in config.stages):
            changes["stages"] = (tuple(tuple(entry) for entry in config.stages), stages)
        out.stages = stages
    if config.is_locked:
        out.lock()
    return out, changes


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """The changes of `scale_to_steps` as "key old -> new, ...", for the console."""
    return ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items()) or "none"
