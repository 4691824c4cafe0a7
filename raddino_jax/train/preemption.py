"""Preemption: SIGTERM / SIGINT become a checkpoint of the current step and a clean exit.

Preemptible TPU and GPU capacity sends SIGTERM before it goes away; Ctrl-C sends SIGINT. The
loop records the signal (`SignalFlag`) instead of dying mid-step, and at the next check saves
the step and raises `Preempted` (the driver exits with 128 + the signal). With several
processes the check is an all-gather every process enters on the same steps
(`preemption_check_due`), so a signal to any one of them makes all of them save.
"""

from __future__ import annotations

import signal

import jax
import numpy as np


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint of the current step was written."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"received {signal.Signals(signum).name}: saved checkpoint at step {step}")


class SignalFlag:
    """Records SIGTERM / SIGINT instead of dying mid-step (preemption, Ctrl-C)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def raised(self) -> int | None:
        """The signal, agreed across processes (any process preempted -> all save).

        With several processes this is a collective: every process must call it on the same
        step (`preemption_check_due`)."""
        flag = np.int32(self.signum or 0)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = np.max(multihost_utils.process_allgather(flag))
        return int(flag) or None


def preemption_check_due(
    steps_done: int, every: int, process_count: int, checkpoint_step: bool
) -> bool:
    """Whether the loop checks for a signal after its `steps_done`-th step.

    One process reads its own flag: free, so every step. Several agree on it with an
    all-gather that every process must enter on the same step; they do so every `every` steps
    (`config.preemption_check_every`) and on checkpoint steps. The decision depends only on
    the step count and the config, so all processes take it alike; a signal is honoured
    within `every` steps.
    """
    return process_count == 1 or checkpoint_step or steps_done % every == 0
