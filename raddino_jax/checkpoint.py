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
import functools
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from raddino_jax.data.augment import MultiCropConfig
from raddino_jax.models import ModelSpec, abstract_params

# Orbax writes a replicated array "replica-parallel" on CPU and TPU: each replica device writes
# one slice of it, and each (shape, device) pair costs a small compile on the first save. With
# 8 devices and a few hundred parameter arrays that is a stall of seconds (6.6 s of a tiny test
# run's 20 s, measured) for biases and norms too small for parallel writes to pay; arrays whose
# slice per replica would be under this size are written whole by one replica instead.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 1 << 20

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
    use_replica_parallel_for_large_arrays_only()
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
    return spec, ocp.StandardCheckpointer().restore((path / PARAMS_ITEM).resolve(), target)


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
# `integrity` (the state's fingerprints, `state_fingerprints`) is in every checkpoint written
# since it was added; older ones restore without the check.
TRAIN_ITEMS = ("student", "teacher", "train", "data", "gram_teacher", "integrity", "counters")
GRAM_ITEM = "gram_teacher"
INTEGRITY_ITEM = "integrity"
COUNTERS_ITEM = "counters"  # run-level counts that are not state (records_skipped)
DAMAGED_DIR = "damaged_checkpoints"  # WORKDIR/damaged_checkpoints/<step>: set aside, not deleted
# TrainState fields stored in the `train` item (student/teacher are items of their own).
_TRAIN_FIELDS = ("step", "opt_state", "dino_center", "ibot_center")


def _train_item(state) -> dict:
    """The `train` item of a (possibly abstract) TrainState."""
    return {name: getattr(state, name) for name in _TRAIN_FIELDS}


def _array_items(state) -> dict:
    """The state's array items by checkpoint item name; the Gram teacher only when it has one."""
    items = {"student": state.student, "teacher": state.teacher, "train": _train_item(state)}
    if state.gram_teacher is not None:
        items[GRAM_ITEM] = state.gram_teacher
    return items


class RestoreError(ValueError):
    """A training checkpoint cannot be restored into this run (and why)."""


class DamagedCheckpoint(RuntimeError):
    """A checkpoint step whose files do not restore, or restore to other values than were saved."""


@functools.cache
def use_replica_parallel_for_large_arrays_only() -> None:
    """Registers Orbax's array handler with `MIN_REPLICA_PARALLEL_SLICE_BYTES` (process-wide,
    once): the saved files and their metadata are the same, only which device writes what
    changes, and every process decides it alike from the array's shape."""
    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES
    )
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def _copy_backbone(teacher: dict, abstract_gram_teacher: dict) -> dict:
    """{"backbone": copy of teacher["backbone"]} in the Gram teacher's shardings."""
    shardings = jax.tree.map(lambda a: a.sharding, abstract_gram_teacher)
    return jax.jit(lambda t: {"backbone": t["backbone"]}, out_shardings=shardings)(teacher)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (16- and 8-bit types widened, 64-bit types split)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = jnp.dtype(x.dtype).itemsize * 8
    if bits in (8, 16):
        unsigned = jnp.uint8 if bits == 8 else jnp.uint16
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _fingerprints(items: dict) -> dict:
    """{item: [uint32 per leaf]}: each leaf's words summed modulo 2**32 (`_words`)."""
    return {
        name: [jnp.sum(_words(leaf), dtype=jnp.uint32) for leaf in jax.tree.leaves(tree)]
        for name, tree in items.items()
    }


@functools.lru_cache(maxsize=4)
def _fingerprints_on(mesh) -> Callable:
    """`_fingerprints` jitted with replicated outputs, so every process can read them."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(_fingerprints, out_shardings=replicated)


def state_fingerprints(state) -> dict[str, list[int]]:
    """A fingerprint of every array of the checkpointed state, per item.

    Each leaf's bits summed as uint32 words with wrap-around: any change of one word (a flipped
    bit, a chunk read back as zeros from a truncated file) changes it, and the sum is exact and
    independent of the mesh, so a restore onto another mesh or device count checks against the
    same numbers. Orbax/tensorstore read a flipped bit back without an error, hence this check.
    Costs one pass over the state on the devices at each save and restore.
    """
    sharding = jax.tree.leaves(state.student)[0].sharding
    compute = (
        _fingerprints_on(sharding.mesh)
        if isinstance(sharding, jax.sharding.NamedSharding)
        else jax.jit(_fingerprints)
    )
    values = jax.device_get(compute(_array_items(state)))
    return {name: [int(v) for v in leaves] for name, leaves in values.items()}


def _mismatched_leaves(expected: dict, got: dict, state) -> list[str]:
    """Names of the leaves whose fingerprint differs from the saved one."""
    named = _array_items(state)
    bad = []
    for item, saved in expected.items():
        if item not in got:
            continue
        paths = [
            jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(named[item])
        ]
        if len(saved) != len(got[item]):
            bad.append(f"{item} ({len(saved)} arrays saved, {len(got[item])} restored)")
            continue
        bad += [f"{item}{path}" for path, a, b in zip(paths, saved, got[item]) if a != b]
    return bad


def all_processes_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process (each reads its own shards of a step)."""
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


class TrainCheckpointer:
    """Orbax CheckpointManager over `WORKDIR/checkpoints`, one step per directory.

    Items: `student`, `teacher` (pure param dicts, also readable alone by the exporter),
    `train` (optimizer state, step, centres), `data` (the Grain iterator, one file per
    process), `integrity` (`state_fingerprints` of the saved state) and, with Gram anchoring
    on, `gram_teacher` ({"backbone": ...}). Saves are asynchronous; `check()` re-raises a failed
    background save.

    A damaged step (`restore_latest_valid`): a save killed half-way is never a step (Orbax
    writes a temporary directory and renames it when complete); a finished step whose files
    fail to read or whose arrays differ from their fingerprints is moved to
    `WORKDIR/damaged_checkpoints/<step>` (kept for inspection, out of the manager's sight, so
    its `max_to_keep` clean-up never counts it) and the next older step is tried.
    """

    def __init__(self, workdir: str | epath.Path, keep: int, async_save: bool = True):
        use_replica_parallel_for_large_arrays_only()
        self.directory = (epath.Path(workdir) / CHECKPOINTS_DIR).resolve()
        self.damaged_directory = (epath.Path(workdir) / DAMAGED_DIR).resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=TRAIN_ITEMS, options=options
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, data_iterator, *, force: bool = False, counters=None) -> bool:
        import grain

        args = {name: ocp.args.StandardSave(tree) for name, tree in _array_items(state).items()}
        args["data"] = grain.checkpoint.CheckpointSave(item=data_iterator)
        args[INTEGRITY_ITEM] = ocp.args.JsonSave(state_fingerprints(state))
        if counters is not None:
            args[COUNTERS_ITEM] = ocp.args.JsonSave(dict(counters))
        return self.manager.save(int(state.step), args=ocp.args.Composite(**args), force=force)

    def restore_counters(self, step: int) -> dict[str, int]:
        """The step's `counters` item ({} when it has none)."""
        if not (self.directory / str(step) / COUNTERS_ITEM).exists():
            return {}
        restored = self.manager.restore(
            step, args=ocp.args.Composite(counters=ocp.args.JsonRestore())
        )
        return dict(restored[COUNTERS_ITEM])

    def data_process_count(self, step: int) -> int | None:
        """How many processes wrote the step's data iterator (one file each); None if unknown."""
        data_dir = self.directory / str(step) / "data"
        files = [p.name for p in data_dir.iterdir()] if data_dir.exists() else []
        counts = {name.split("-of-")[1].split(".")[0] for name in files if "-of-" in name}
        return int(counts.pop()) if len(counts) == 1 else None

    def has_gram_teacher(self, step: int) -> bool:
        return (self.directory / str(step) / GRAM_ITEM).exists()

    def restore(
        self, step: int, abstract_state, data_iterator=None, *, gram_teacher_from_teacher=False
    ):
        """The train state at `step`, placed in `abstract_state`'s shardings, and (when
        `data_iterator` is given) the iterator advanced to where it was (restored in place;
        the checkpoint must come from as many processes as this run has: `restore_data`).

        The Gram teacher is restored when `abstract_state` has one (Gram anchoring on). A
        checkpoint written with it off has none: then `gram_teacher_from_teacher` (the caller
        knows the first refresh is still ahead, so the value is overwritten before use) starts
        it as a copy of the restored teacher's backbone; otherwise this is a RestoreError. A
        stored Gram teacher is ignored when the run has Gram anchoring off.

        Raises DamagedCheckpoint when the step's arrays differ from their saved fingerprints.
        """
        read = self._read(step, abstract_state, gram_teacher_from_teacher)
        state = self._assemble(read, abstract_state)
        if data_iterator is not None:
            self.restore_data(step, data_iterator)
        return state

    def _read(self, step: int, abstract_state, gram_teacher_from_teacher: bool) -> dict:
        """The step's items as Orbax restores them (this process's reads only, no collective)."""
        args = dict(
            student=ocp.args.StandardRestore(abstract_state.student),
            teacher=ocp.args.StandardRestore(abstract_state.teacher),
            train=ocp.args.StandardRestore(_train_item(abstract_state)),
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
        if (self.directory / str(step) / INTEGRITY_ITEM).exists():
            args[INTEGRITY_ITEM] = ocp.args.JsonRestore()
        return dict(self.manager.restore(step, args=ocp.args.Composite(**args)))

    def _assemble(self, restored: dict, abstract_state):
        """The TrainState from `_read`'s items, checked against the saved fingerprints (a
        computation over all processes: each gets the same verdict)."""
        stored_gram = GRAM_ITEM in restored
        state = abstract_state.replace(
            student=restored["student"],
            teacher=restored["teacher"],
            gram_teacher=restored[GRAM_ITEM] if stored_gram else None,
            **restored["train"],
        )
        if INTEGRITY_ITEM in restored:
            saved = dict(restored[INTEGRITY_ITEM])
            if not stored_gram:
                saved.pop(GRAM_ITEM, None)
            bad = _mismatched_leaves(saved, state_fingerprints(state), state)
            if bad:
                raise DamagedCheckpoint(
                    f"{len(bad)} array(s) differ from the fingerprints saved with them: "
                    + ", ".join(bad[:5])
                    + (" ..." if len(bad) > 5 else "")
                )
        if abstract_state.gram_teacher is not None and not stored_gram:
            gram_teacher = _copy_backbone(state.teacher, abstract_state.gram_teacher)
            state = state.replace(gram_teacher=gram_teacher)
        return state

    def restore_data(self, step: int, data_iterator) -> None:
        """Restores the data iterator in place; the step must come from this many processes."""
        import grain

        count = self.data_process_count(step)
        if count is not None and count != jax.process_count():
            raise RestoreError(
                f"checkpoint {self.directory / str(step)} holds the data iterator of {count} "
                f"process(es) but this run has {jax.process_count()}"
            )
        self.manager.restore(
            step,
            args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(item=data_iterator)),
        )

    def restore_latest_valid(self, abstract_state, *, gram_teacher_from_teacher=None, say=print):
        """(step, state) of the newest step that restores intact, or (None, None) if none.

        Newest first: a step whose files fail to read, or whose arrays differ from their saved
        fingerprints, is skipped and the next older step is tried; every process takes the
        same decision. Once an older step restores, the skipped newer ones are set aside
        (`set_aside`) with their reasons printed. When none restores, nothing is moved (a
        changed model config fails every step alike: that is not damage) and RestoreError lists
        the reasons: starting over silently would throw the run away. A `RestoreError` from a
        step (it does not fit this run's config) is raised at once.
        `gram_teacher_from_teacher(step)` says whether a step without a Gram teacher may start
        one from its teacher (see `restore`).
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        skipped = []
        for step in steps:
            from_teacher = bool(gram_teacher_from_teacher and gram_teacher_from_teacher(step))
            state, reason = None, ""
            try:  # reads: a process may fail alone, so all agree before going on together
                read = self._read(step, abstract_state, from_teacher)
            except RestoreError:
                raise
            except Exception as err:  # noqa: BLE001 - any read failure marks the step damaged
                reason = one_line(err)
            if all_processes_ok(not reason):
                try:  # the fingerprint check: the same verdict on every process
                    state = self._assemble(read, abstract_state)
                except DamagedCheckpoint as err:
                    reason = one_line(err)
                if not reason:
                    for bad_step, bad_reason in skipped:
                        where = self.set_aside(bad_step)
                        say(f"checkpoint step {bad_step} skipped: {bad_reason}; moved to {where}")
                    return step, state
            skipped.append((step, reason or "another process failed to read its part"))
        if skipped:
            raise RestoreError(
                f"no checkpoint in {self.directory} restores ("
                + "; ".join(f"step {s}: {r}" for s, r in skipped)
                + "). If the model config changed since they were written, restore it; if "
                "their files are damaged, use another --workdir to start over"
            )
        return None, None

    def set_aside(self, step: int) -> epath.Path:
        """Moves a damaged step out of the manager's directory (process 0; all wait)."""
        target = self.damaged_directory / str(step)
        if jax.process_index() == 0:
            self.damaged_directory.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target = (
                    self.damaged_directory / f"{step}.{len(list(self.damaged_directory.iterdir()))}"
                )
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"raddino_jax set aside checkpoint {step}")
        self.manager.reload()
        return target

    def check(self) -> None:
        self.manager.check_for_errors()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def one_line(err: BaseException) -> str:
    """The exception as one short line (the type and the first line of its message)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__
