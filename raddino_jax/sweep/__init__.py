"""Mesh-layout sweeps of the SSL train step; the CLI is `python -m raddino_jax.sweep`.

row.py: `SweepRow` (one point's results) and its console line.
measure.py: a point's run (`train.build.build`), compiled and timed; `sweep` loops over
  (layout, batch size, remat).
estimate.py: what XLA's memory and cost analysis of the compiled step imply (peak bytes, fit,
  XLA FLOPs, the estimated step time; a scanned step's costs extrapolated over its depth).
report.py: rank the rows and write sweep.csv / sweep.json / sweep.md / sweep.png.
__main__.py: the absl flags and `main`.

The names used from outside the package are re-exported, so that
`from raddino_jax import sweep; sweep.run_point(...)` reads as one module.
"""

from raddino_jax.sweep.estimate import memory_fields, xla_flops
from raddino_jax.sweep.measure import (
    failure_reason,
    host_batch,
    infeasible_reason,
    point_config,
    run_point,
    state_bytes,
    step_flops,
    sweep,
)
from raddino_jax.sweep.report import cell, write_outputs
from raddino_jax.sweep.row import MiB, describe_row, layout_name, mib

__all__ = [
    "MiB",
    "cell",
    "mib",
    "describe_row",
    "failure_reason",
    "host_batch",
    "infeasible_reason",
    "layout_name",
    "memory_fields",
    "point_config",
    "run_point",
    "state_bytes",
    "step_flops",
    "sweep",
    "write_outputs",
    "xla_flops",
]
