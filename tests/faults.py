"""Fault injection for the driver tests: a NaN loss at a chosen step, SIGKILL (or, in process, an
exception) after a checkpoint or during one, and damaged records in a real dataset build.

Production code carries no test hooks. Each fault is a replacement for one function the
driver looks up at call time; in-process tests install it with pytest's `monkeypatch`:

    monkeypatch.setattr(step, "train_step", faults.train_step_with_nan_loss(4))
    monkeypatch.setattr(checkpoint.TrainCheckpointer, "save", faults.save_then_kill(3))

and subprocess tests run the driver through this module, which installs them and then runs
`raddino_jax.main` with the remaining flags:

    python -m tests.faults --nan_loss_at_step=4 --kill_after_checkpoint=3 \\
        --config=tests/tiny_config.py --workdir=DIR
"""

from __future__ import annotations

import os
import signal

import jax.numpy as jnp

from raddino_jax import checkpoint
from raddino_jax.train import step as step_lib


def train_step_with_nan_loss(nan_step: int):
    """A replacement for `step.train_step`: the real step, except that the loss is NaN when
    `state.step == nan_step`. Gradients stay finite, so the step's own guard must reject the
    update because of the loss alone (`metrics["finite"]` 0, "non-finite loss" in the loop)."""
    real_train_step, real_ssl_loss = step_lib.train_step, step_lib.ssl_loss

    def train_step(state, batch, rng, **kwargs):
        # A constant added to the loss: NaN at nan_step, 0 otherwise; gradients are unchanged.
        poison = jnp.where(state.step == nan_step, jnp.nan, 0.0).astype(jnp.float32)

        def ssl_loss(*args, **loss_kwargs):
            loss, aux = real_ssl_loss(*args, **loss_kwargs)
            return loss + poison, aux

        # The real step reads `ssl_loss` from its module while it is traced (under jit: once).
        step_lib.ssl_loss = ssl_loss
        try:
            return real_train_step(state, batch, rng, **kwargs)
        finally:
            step_lib.ssl_loss = real_ssl_loss

    return train_step


def save_then_kill(kill_step: int):
    """A replacement for `checkpoint.TrainCheckpointer.save`: the real save; when it saved step
    `kill_step`, wait until that checkpoint is on disk, then SIGKILL this process (a lost node:
    no cleanup, no handler runs). The metrics line of that step is already written (the loop
    flushes a step's metrics before saving it)."""
    real_save = checkpoint.TrainCheckpointer.save

    def save(self, state, data_iterator, **kwargs):
        saved = real_save(self, state, data_iterator, **kwargs)
        if saved and int(state.step) == kill_step:
            self.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    return save


def kill_during_save(kill_step: int):
    """A replacement for `checkpoint.TrainCheckpointer.save`: starts the real (asynchronous)
    save of step `kill_step` and SIGKILLs this process at once, while Orbax is still writing
    it (a node lost mid-save: the step's temporary directory is left behind)."""
    real_save = checkpoint.TrainCheckpointer.save

    def save(self, state, data_iterator, **kwargs):
        saved = real_save(self, state, data_iterator, **kwargs)
        if saved and int(state.step) == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    return save


def corrupt_records(split_file: str, indices) -> None:
    """Rewrites an ArrayRecord file of a tfds build with the PNG bytes of
    the `image` feature of the records at `indices` overwritten in place (the record keeps its
    length, so it still parses), signature included, so that nothing decodes it."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    reader = ArrayRecordReader(split_file)
    options, records = reader.writer_options_string(), reader.read_all()
    reader.close()
    for index in indices:
        record = bytearray(records[index])
        # the PNG right after the "image" key of the tf.Example map (a "mask" PNG may precede it)
        start = record.find(b"\x89PNG\r\n\x1a\n", record.find(b"\n\x05image"))
        end = record.find(b"IEND", start) + 8
        assert start >= 0 and end > start, f"record {index} holds no PNG"
        record[start:end] = bytes((7 * k + 3) % 256 for k in range(end - start))
        records[index] = bytes(record)
    writer = ArrayRecordWriter(split_file, options)
    for record in records:
        writer.write(record)
    writer.close()


class Crash(RuntimeError):
    """The in-process stand-in for a lost node (`save_then_crash`)."""


def save_then_crash(crash_step: int):
    """Like `save_then_kill`, but raises `Crash` instead of SIGKILL, so an in-process test can
    interrupt `loop.train` after the checkpoint of `crash_step` and call it again. The loop's
    cleanup runs (threads stopped, checkpoints finished), as a new process would start clean."""
    real_save = checkpoint.TrainCheckpointer.save

    def save(self, state, data_iterator, **kwargs):
        saved = real_save(self, state, data_iterator, **kwargs)
        if saved and int(state.step) == crash_step:
            self.wait()
            raise Crash(f"crash after the checkpoint of step {crash_step}")
        return saved

    return save


def install(
    nan_loss_at_step: int | None,
    kill_after_checkpoint: int | None,
    kill_during_checkpoint: int | None = None,
) -> None:
    """Install the requested faults for the rest of this process."""
    if nan_loss_at_step is not None:
        step_lib.train_step = train_step_with_nan_loss(nan_loss_at_step)
    if kill_after_checkpoint is not None:
        checkpoint.TrainCheckpointer.save = save_then_kill(kill_after_checkpoint)
    if kill_during_checkpoint is not None:
        checkpoint.TrainCheckpointer.save = kill_during_save(kill_during_checkpoint)


def main() -> None:
    """The driver's command line plus the fault flags. Flags are defined only here, so
    importing this module from a test registers nothing with absl."""
    from absl import app, flags

    from raddino_jax import main as driver

    nan_loss_at_step = flags.DEFINE_integer(
        "nan_loss_at_step", None, "make the loss NaN at this step (state.step, 0-based)"
    )
    kill_after_checkpoint = flags.DEFINE_integer(
        "kill_after_checkpoint",
        None,
        "SIGKILL this process once the checkpoint of this step is saved",
    )

    kill_during_checkpoint = flags.DEFINE_integer(
        "kill_during_checkpoint",
        None,
        "SIGKILL this process while the checkpoint of this step is being written",
    )

    def run(argv: list[str]) -> None:
        install(nan_loss_at_step.value, kill_after_checkpoint.value, kill_during_checkpoint.value)
        driver.main(argv)

    app.run(run)


if __name__ == "__main__":
    main()
