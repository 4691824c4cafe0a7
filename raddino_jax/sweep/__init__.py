"""Mesh-layout sweeps of the SSL train step; the CLI is `python -m raddino_jax.sweep`.

row.py: `SweepRow` (one point's results) and its console line.
measure.py: a point's run (`train.build.build`), compiled and timed; `sweep` loops over
  (layout, batch size, remat).
estimate.py: what XLA's memory and cost analysis of the compiled step imply (peak bytes, fit,
  XLA FLOPs, the estimated step time; a scanned step's costs extrapolated over its depth).
report.py: rank the rows and write sweep.csv / sweep.json / sweep.md / sweep.png.
__main__.py: the absl flags and `main`.

The names below are re-exported so that `from raddino_jax import sweep; sweep.run_point(...)`
reads as one module (the benchmarks and tests use it that way).
"""

from raddino_jax.sweep.estimate import memory_fields, xla_flops
from raddino_jax.sweep.measure import (
    MODES,
    compile_step,
    device_batch,
    failure_reason,
    host_batch,
    infeasible_reason,
    initial_state,
    point_config,
    run_point,
    state_bytes,
    step_flops,
    step_keys,
    sweep,
    time_steps,
)
from raddino_jax.sweep.report import cell, markdown_table, ranked, write_outputs
from raddino_jax.sweep.row import MiB, SweepRow, describe_row, layout_name, mib

__all__ = [
    "MODES",
    "MiB",
    "SweepRow",
    "cell",
    "mib",
    "compile_step",
    "describe_row",
    "device_batch",
    "failure_reason",
    "host_batch",
    "infeasible_reason",
    "initial_state",
    "layout_name",
    "markdown_table",
    "memory_fields",
    "point_config",
    "ranked",
    "run_point",
    "state_bytes",
    "step_flops",
    "step_keys",
    "sweep",
    "time_steps",
    "write_outputs",
    "xla_flops",
]
