"""Orbax checkpoints of model parameters (the converter's output and training's starting point).

A parameter checkpoint is a directory (local or gs://) holding:
- `model_spec.json`: the `ModelSpec` (architecture of backbone and heads);
- `preprocessing.json`: the inference preprocessing the weights expect;
- `params/`: an Orbax `StandardCheckpointer` item, the pure dict {"backbone", "dino_head", ...}.
Restores always go through a target built from the spec, so shapes are checked and the arrays can
land directly in any sharding.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import orbax.checkpoint as ocp
from etils import epath

from raddino_jax.data.augment import MultiCropConfig
from raddino_jax.models import ModelSpec, abstract_params

SPEC_FILE = "model_spec.json"
PREPROCESSING_FILE = "preprocessing.json"
PARAMS_ITEM = "params"


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Inference preprocessing: resize shorter side, centre crop, /255, normalise (recipe s8).

    RAD-DINO's processor: 518 px, mean 0.5307, std 0.2583 on every channel.
    """

    image_size: int = 518
    mean: float = MultiCropConfig.mean  # training and inference share one normalisation
    std: float = MultiCropConfig.std

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def is_param_checkpoint(path: str | epath.Path) -> bool:
    path = epath.Path(path)
    return (path / SPEC_FILE).exists() and (path / PARAMS_ITEM).exists()


def save_params(
    path: str | epath.Path,
    spec: ModelSpec,
    params: dict,
    preprocessing: Preprocessing | None = None,
) -> epath.Path:
    """Write a parameter checkpoint; refuses to overwrite an existing one."""
    path = epath.Path(path)
    if (path / PARAMS_ITEM).exists():
        raise FileExistsError(f"{path / PARAMS_ITEM} exists; choose another --out or delete it")
    expected = jax.tree.map(lambda x: tuple(x.shape), abstract_params(spec))
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    if expected != got:
        raise ValueError(f"parameters do not match the model spec for {path}")
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((path / PARAMS_ITEM).resolve(), params)
    checkpointer.wait_until_finished()
    (path / SPEC_FILE).write_text(spec.to_json())
    preprocessing = preprocessing or Preprocessing(image_size=spec.backbone.img_size)
    (path / PREPROCESSING_FILE).write_text(preprocessing.to_json())
    return path


def load_spec(path: str | epath.Path) -> ModelSpec:
    path = epath.Path(path)
    if not (path / SPEC_FILE).exists():
        raise FileNotFoundError(
            f"{path} is not a raddino_jax parameter checkpoint (no {SPEC_FILE}); "
            "create one with `python -m raddino_jax.convert from-torch`"
        )
    return ModelSpec.from_json((path / SPEC_FILE).read_text())


def load_preprocessing(path: str | epath.Path) -> Preprocessing:
    path = epath.Path(path) / PREPROCESSING_FILE
    return Preprocessing(**json.loads(path.read_text())) if path.exists() else Preprocessing()


def load_params(path: str | epath.Path, shardings=None) -> tuple[ModelSpec, dict]:
    """Restore (spec, params); `shardings` (a matching tree of Shardings) places them directly."""
    path = epath.Path(path)
    spec = load_spec(path)
    target = abstract_params(spec)
    if shardings is not None:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings
        )
    params = ocp.StandardCheckpointer().restore((path / PARAMS_ITEM).resolve(), target)
    return spec, params


CHECKPOINTS_DIR = "checkpoints"
MODEL_ITEMS = ("teacher", "student")


def is_run_dir(path: str | epath.Path) -> bool:
    """A training workdir: spec file plus an Orbax CheckpointManager directory."""
    path = epath.Path(path)
    return (path / SPEC_FILE).exists() and (path / CHECKPOINTS_DIR).is_dir()


def load_run_params(path: str | epath.Path, which: str = "teacher", step: int | None = None):
    """(spec, params) of `which` model from the latest (or given) step of a training run."""
    if which not in MODEL_ITEMS:
        raise ValueError(f"--which must be one of {MODEL_ITEMS}, got {which!r}")
    path = epath.Path(path)
    spec = load_spec(path)
    manager = ocp.CheckpointManager((path / CHECKPOINTS_DIR).resolve(), item_names=MODEL_ITEMS)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{path / CHECKPOINTS_DIR} holds no finished checkpoint yet")
    restored = manager.restore(
        step, args=ocp.args.Composite(**{which: ocp.args.StandardRestore(abstract_params(spec))})
    )
    manager.close()
    return spec, restored[which]


def load_any_params(path: str | epath.Path, which: str = "teacher") -> tuple[ModelSpec, dict]:
    """Params from a parameter checkpoint (from-torch output) or a training run directory.

    For a training run the latest checkpoint's `which` model ("teacher", as dinov2 evaluates the
    teacher, recipe s4; or "student") is restored.
    """
    path = epath.Path(path)
    if is_param_checkpoint(path):
        return load_params(path)
    if is_run_dir(path):
        return load_run_params(path, which)
    raise FileNotFoundError(
        f"{path} is neither a parameter checkpoint ({SPEC_FILE} + {PARAMS_ITEM}/) nor a training "
        "run directory (checkpoints/); create one with `python -m raddino_jax.convert from-torch` "
        "or `python -m raddino_jax.main`"
    )


# ----------------------------------------------------------------------------------------------
# Training checkpoints: student, teacher, optimizer + centres + step, and the data iterator
# ----------------------------------------------------------------------------------------------

# `gram_teacher` is written only by runs with Gram anchoring on (ssl.gram_weight > 0); the other
# four items are in every checkpoint, so checkpoints from before Gram anchoring still restore.
TRAIN_ITEMS = ("student", "teacher", "train", "data", "gram_teacher")
GRAM_ITEM = "gram_teacher"
# TrainState fields stored in the `train` item (student/teacher are items of their own).
_TRAIN_FIELDS = ("step", "opt_state", "dino_center", "ibot_center")


def _train_item(state) -> dict:
    """The `train` item of a (possibly abstract) TrainState."""
    return {name: getattr(state, name) for name in _TRAIN_FIELDS}


class RestoreError(ValueError):
    """A training checkpoint cannot be restored into this run (and why)."""


def _copy_backbone(teacher: dict, abstract_gram_teacher: dict) -> dict:
    """{"backbone": copy of teacher["backbone"]} in the Gram teacher's shardings."""
    shardings = jax.tree.map(lambda a: a.sharding, abstract_gram_teacher)
    return jax.jit(lambda t: {"backbone": t["backbone"]}, out_shardings=shardings)(teacher)


class TrainCheckpointer:
    """Orbax CheckpointManager over `WORKDIR/checkpoints`, one step per directory.

    Items: `student`, `teacher` (pure param dicts, also readable alone by the exporter),
    `train` (optimizer state, step, centres), `data` (the Grain iterator, one file per
    process) and, with Gram anchoring on, `gram_teacher` ({"backbone": ...}). Saves are
    asynchronous; `check()` re-raises a failed background save.
    """

    def __init__(self, workdir: str | epath.Path, keep: int, async_save: bool = True):
        self.directory = (epath.Path(workdir) / CHECKPOINTS_DIR).resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=TRAIN_ITEMS, options=options
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, data_iterator, *, force: bool = False) -> bool:
        import grain

        step = int(state.step)
        args = ocp.args.Composite(
            student=ocp.args.StandardSave(state.student),
            teacher=ocp.args.StandardSave(state.teacher),
            train=ocp.args.StandardSave(_train_item(state)),
            data=grain.checkpoint.CheckpointSave(item=data_iterator),
        )
        if state.gram_teacher is not None:
            args = ocp.args.Composite(
                **dict(args.items()), gram_teacher=ocp.args.StandardSave(state.gram_teacher)
            )
        return self.manager.save(step, args=args, force=force)

    def _check_process_count(self, step: int) -> None:
        data_dir = self.directory / str(step) / "data"
        files = [p.name for p in data_dir.iterdir()] if data_dir.exists() else []
        counts = {name.split("-of-")[1].split(".")[0] for name in files if "-of-" in name}
        if counts and counts != {str(jax.process_count())}:
            raise RestoreError(
                f"checkpoint {self.directory / str(step)} holds the data iterator of "
                f"{sorted(counts)} process(es) but this run has {jax.process_count()}: the "
                "model state restores onto any mesh or device count, the data iterator only "
                "onto the same number of processes. Relaunch with that many processes."
            )

    def has_gram_teacher(self, step: int) -> bool:
        return (self.directory / str(step) / GRAM_ITEM).exists()

    def restore(self, step: int, abstract_state, data_iterator, *, gram_teacher_from_teacher=False):
        """The train state at `step`, placed in `abstract_state`'s shardings, and the iterator
        advanced to where it was (restored in place).

        The Gram teacher is restored when `abstract_state` has one (Gram anchoring on). A
        checkpoint written with it off has none: then `gram_teacher_from_teacher` (the caller
        knows the first refresh is still ahead, so the value is overwritten before use) starts
        it as a copy of the restored teacher's backbone; otherwise this is a RestoreError. A
        stored Gram teacher is ignored when the run has Gram anchoring off.
        """
        import grain

        self._check_process_count(step)
        args = dict(
            student=ocp.args.StandardRestore(abstract_state.student),
            teacher=ocp.args.StandardRestore(abstract_state.teacher),
            train=ocp.args.StandardRestore(_train_item(abstract_state)),
            data=grain.checkpoint.CheckpointRestore(item=data_iterator),
        )
        wants_gram = abstract_state.gram_teacher is not None
        stored_gram = wants_gram and self.has_gram_teacher(step)
        if wants_gram and not stored_gram and not gram_teacher_from_teacher:
            raise RestoreError(
                f"checkpoint {self.directory / str(step)} was written with Gram anchoring off, "
                "so it holds no Gram teacher to resume from: set config.ssl.gram_teacher='ema' "
                f"and config.ssl.gram_start_step >= {step} (the EMA teacher is copied then), or "
                "config.ssl.gram_weight=0"
            )
        if stored_gram:
            args["gram_teacher"] = ocp.args.StandardRestore(abstract_state.gram_teacher)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if stored_gram:
            gram_teacher = restored["gram_teacher"]
        elif wants_gram:
            gram_teacher = _copy_backbone(restored["teacher"], abstract_state.gram_teacher)
        else:
            gram_teacher = None
        return abstract_state.replace(
            student=restored["student"],
            teacher=restored["teacher"],
            gram_teacher=gram_teacher,
            **restored["train"],
        )

    def check(self) -> None:
        self.manager.check_for_errors()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
