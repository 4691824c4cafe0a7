"""Metric sinks of the training loop: `WORKDIR/metrics.jsonl`, TensorBoard events, console.

Only process 0 writes. metrics.jsonl holds one JSON object per log step; on resume, lines past
the restored step are dropped first so that the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from etils import epath

METRICS_FILE = "metrics.jsonl"


def _clean(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


class MetricsWriter:
    """Appends metrics to metrics.jsonl and TensorBoard (tensorboardX: no TensorFlow needed)."""

    def __init__(
        self, workdir: str | epath.Path, *, enabled: bool = True, tensorboard: bool = True
    ):
        self.enabled = enabled
        self.path = epath.Path(workdir) / METRICS_FILE
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records with step > `step` (written after the checkpoint we resume from)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self.path.exists() and not str(self.path).startswith("gs://"):
            with self.path.open("a") as handle:
                handle.write(line)
        else:  # object stores have no append: rewrite
            previous = self.path.read_text() if self.path.exists() else ""
            self.path.write_text(previous + line)
        if self._tb is not None:
            for key, value in metrics.items():
                value = float(value)
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | epath.Path) -> list[dict]:
    path = epath.Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
