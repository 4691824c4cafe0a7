"""`python -m raddino_jax.main --config=configs/vitb14.py --workdir=DIR`: pretrain (or resume).

Override any config key with `--config.key=value` (e.g. `--config.batch_size=512`). Restarting
the same command resumes from the latest checkpoint in DIR. Several processes (TPU pod, GPU
cluster, or local CPU processes for tests) are joined with `jax.distributed`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (local or gs://)", required=True)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "join processes with jax.distributed.initialize(): auto = when a cluster is detected or "
    "--coordinator_address is given",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")

_CLUSTER_ENV = (
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_NUM_SLICES",
)

EXIT_NONFINITE = 2
EXIT_CONFIG = 3
EXIT_MEMORY = 4  # the memory preflight: the step does not fit the devices
EXIT_DATA = 5  # more than config.data.max_bad_fraction of the records do not decode


def _in_cluster() -> bool:
    for name in _CLUSTER_ENV:
        value = os.environ.get(name, "")
        if name == "TPU_WORKER_HOSTNAMES" and "," in value:
            return True
        if name != "TPU_WORKER_HOSTNAMES" and value.isdigit() and int(value) > 1:
            return True
    return False


def init_distributed() -> None:
    """jax.distributed.initialize() with explicit flags, or auto-detected on a cluster."""
    import jax

    mode = _DISTRIBUTED.value
    explicit = _COORDINATOR.value is not None
    if mode == "off" or (mode == "auto" and not explicit and not _in_cluster()):
        return
    # CPU processes need a collectives backend; the setting is ignored by GPU/TPU backends (and
    # querying the backend here would initialise it too early).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )


def _builtin_maker(config):
    """The built-in samples' maker when the config trains on them (data.builtin): the offline
    generator lives in data_prep, imported only then."""
    if not config.data.builtin:
        return None
    from data_prep.samples.builtin import builtin_dataset

    return builtin_dataset


def main(argv: list[str]) -> None:
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/<name>.py is required")
    init_distributed()
    import jax

    from raddino_jax.checkpoint import RestoreError
    from raddino_jax.config import ConfigError
    from raddino_jax.data.pipeline import BadDataError
    from raddino_jax.sweep import preflight
    from raddino_jax.sweep.preflight import MemoryPreflightError
    from raddino_jax.train import loop
    from raddino_jax.train.metrics import NonFiniteError
    from raddino_jax.train.preemption import Preempted

    # what each way of stopping prints (a prefix) and exits with
    stops = {
        ConfigError: ("config error", EXIT_CONFIG),
        RestoreError: ("config error", EXIT_CONFIG),
        MemoryPreflightError: ("does not fit", EXIT_MEMORY),
        BadDataError: ("stopped", EXIT_DATA),
        NonFiniteError: ("stopped", EXIT_NONFINITE),
        Preempted: ("preempted", None),  # 128 + the signal
    }
    logging.set_verbosity(logging.WARNING)  # orbax/grain INFO chatter; the loop prints its own
    try:
        last = loop.train(
            _CONFIG.value,
            _WORKDIR.value,
            check_memory=preflight.check_training_memory,
            make_builtin=_builtin_maker(_CONFIG.value),
        )
    except tuple(stops) as err:
        prefix, code = next(v for kind, v in stops.items() if isinstance(err, kind))
        print(f"{prefix}: {err}", file=sys.stderr)
        sys.exit(128 + err.signum if code is None else code)
    if jax.process_index() == 0:
        print(
            f"done: {_WORKDIR.value} step {_CONFIG.value.total_steps}: "
            + ", ".join(
                f"{k}={v:.4g}"
                for k, v in last.items()
                if k in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "images_per_s")
            )
        )


if __name__ == "__main__":
    app.run(main)
