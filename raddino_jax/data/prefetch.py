"""Host batches onto the devices, ahead of the step that uses them.

The last stage of the input pipeline (``pipeline.make_dataset`` builds the host batches):

- ``to_global_batch`` assembles every process's host batch into global ``jax.Array``s placed
  by the batch shardings (``parallel.sharding.batch_shardings``); the image axis
  (``layout.IMAGE_AXIS``) is the one split over processes and devices.
- ``DevicePrefetcher`` takes the step's global batch (``train.build.Run.batch``, from
  ``layout.batch_spec``): a host batch whose arrays are not this process's share of it is an
  error naming the array (it would otherwise recompile the step), and the host-side entries
  (``layout.HOST_KEYS``: records skipped, source ids) stay on the host (``last_host``).
  It wraps the host-batch iterator so that, while the current step runs on
  the devices, a background thread is already reading the next host batches and transferring
  them: up to ``config.data.device_prefetch`` global batches wait on the devices, in the
  iterator's order, and the loop's ``next`` only takes one from a queue. Depth 0 or 1 runs
  nothing in the background (``next`` reads and transfers one batch).

Checkpointed iterator state: the prefetcher reads ahead of the training loop, so the wrapped
iterator's own state would skip the batches still in the queue. ``DevicePrefetcher.get_state``
is instead the iterator's state *after the last batch ``next`` returned*, i.e. at the first
batch no step has used, as the JSON bytes of Grain's own file. Grain's Orbax handler
(``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``) writes those bytes unchanged
for an iterator that is not a Grain ``DatasetIterator``, so the file is the one the bare
iterator would have written and a checkpoint restores into either. On restore the handler
calls ``set_state`` (the batches prepared before are dropped) and ``start_prefetch`` (the
thread starts again from the restored position); the dropped batches are made again exactly,
since every pipeline element is a pure function of (seed, position).

No Grain import here: the wrapped iterator only needs ``next``, ``get_state`` and
``set_state`` (``start_prefetch`` and ``close`` are used when it has them).
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from raddino_jax.data.layout import HOST_KEYS, IMAGE_AXIS


def to_global_batch(
    host_batch: Mapping[str, np.ndarray], shardings: Mapping[str, jax.sharding.Sharding]
) -> dict[str, jax.Array]:
    """Assembles every process's host batch into global arrays.

    Each process passes its own batch; the global shape is inferred from the sharding (its
    image axis, ``layout.IMAGE_AXIS``, is ``process_count`` times longer). ``shardings`` must name
    exactly the batch's keys, so a typo is an error rather than a silently unsharded array.
    """
    if set(host_batch) != set(shardings):
        raise KeyError(
            f"batch keys {sorted(host_batch)} differ from sharding keys {sorted(shardings)}"
        )
    return {
        key: jax.make_array_from_process_local_data(shardings[key], np.asarray(value))
        for key, value in host_batch.items()
    }


def check_host_batch(
    host_batch: Mapping[str, np.ndarray], batch: Mapping[str, jax.ShapeDtypeStruct]
) -> None:
    """Raises ValueError naming the first array of ``host_batch`` whose dtype or shape is not
    this process's share of ``batch`` (the global batch the step was compiled for)."""
    for key, want in batch.items():
        got = np.asarray(host_batch[key])
        shape = list(want.shape)
        shape[IMAGE_AXIS[key]] //= jax.process_count()
        if got.dtype != want.dtype or list(got.shape) != shape:
            raise ValueError(
                f"host batch {key!r} is {got.dtype}{list(got.shape)}; the step takes "
                f"{np.dtype(want.dtype)}{shape} per process (data.layout.batch_spec)"
            )


class DevicePrefetcher:
    """Global batches assembled and put on the devices ahead of the step that uses them.

    Iterates ``to_global_batch`` over a host-batch iterator (a Grain iterator of
    ``pipeline.make_dataset``), placing each array as ``batch`` (the step's global batch,
    ``ShapeDtypeStruct``s with shardings) says, after ``check_host_batch``. With ``depth`` >= 2
    (``config.data.device_prefetch``) a background thread keeps up to ``depth`` global batches
    ready in a queue, so the host's next batches are built and transferred while the current
    step runs, also while the loop waits on a step's metrics or a checkpoint; the batches come
    in the iterator's order. With ``depth`` 0 or 1 nothing runs in the background: ``next``
    reads and transfers one batch.

    Checkpointing: ``get_state()`` is the wrapped iterator's state at the first batch that
    ``next`` has not returned yet (prefetched batches are made again after a restore), as the
    JSON bytes Grain's Orbax handler writes unchanged for an iterator that is not a Grain
    ``DatasetIterator``: the file is the one the bare iterator would write, so checkpoints
    restore into either. ``set_state`` takes those bytes (or the state dict) and
    ``start_prefetch`` restarts the thread, as the handler's restore calls them.
    """

    def __init__(
        self,
        iterator: Any,
        batch: Mapping[str, jax.ShapeDtypeStruct],
        depth: int,
    ):
        if depth < 0:
            raise ValueError(f"config.data.device_prefetch must be >= 0, got {depth}")
        self._iterator = iterator
        self._batch = batch
        self._shardings = {key: leaf.sharding for key, leaf in batch.items()}
        self._depth = depth
        self._state = iterator.get_state()  # at the first batch not yet returned by next()
        # the host-side entries (layout.HOST_KEYS) of the batch `next` returned last, taken out
        # before the transfer ({} when the host batches have none)
        self.last_host: dict[str, np.ndarray] = {}
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.start_prefetch()

    @property
    def threaded(self) -> bool:
        """Whether a background thread prepares the batches (depth >= 2)."""
        return self._depth >= 2

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if not self.threaded:
            batch, self.last_host = self._transfer(next(self._iterator))
            self._state = self._iterator.get_state()
            return batch
        if self._thread is None:
            self.start_prefetch()
        kind, value, state, host = self._queue.get()
        if kind == "error":
            self._join()
            raise value
        if kind == "end":
            self._join()
            raise StopIteration
        self._state, self.last_host = state, host
        return value

    def start_prefetch(self) -> None:
        """Starts the wrapped iterator's own prefetch and, with depth >= 2, the thread."""
        start = getattr(self._iterator, "start_prefetch", None)
        if start is not None:
            start()
        if self.threaded and self._thread is None:
            self._stop.clear()
            self._queue = queue.Queue(maxsize=self._depth)
            self._thread = threading.Thread(
                target=self._produce, name="device-prefetch", daemon=True
            )
            self._thread.start()

    def _produce(self) -> None:
        """The thread: read, transfer, queue (with the iterator's state after the batch)."""
        try:
            while not self._stop.is_set():
                batch, host = self._transfer(next(self._iterator))
                self._offer(("batch", batch, self._iterator.get_state(), host))
        except StopIteration:
            self._offer(("end", None, None, {}))
        except BaseException as err:  # re-raised by __next__ in the loop's thread
            self._offer(("error", err, None, {}))

    def _transfer(self, host_batch: dict) -> tuple[dict[str, jax.Array], dict[str, np.ndarray]]:
        """(global batch, the host batch's host-side entries, which stay on the host)."""
        arrays = dict(host_batch)
        host = {key: arrays.pop(key) for key in HOST_KEYS if key in arrays}
        check_host_batch(arrays, self._batch)
        return to_global_batch(arrays, self._shardings), host

    def _offer(self, item: tuple) -> None:
        """Queues ``item``, waiting for room unless the prefetcher is being stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def _join(self) -> None:
        """Stops the thread and drops the batches it prepared (they are made again)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread, self._queue = None, None

    def get_state(self) -> bytes:
        """The iterator's state at the first batch not yet returned, as Grain's JSON bytes."""
        return json.dumps(self._state, indent=4).encode()

    def set_state(self, state: bytes | str | dict) -> None:
        """Continues from ``state`` (``get_state``'s bytes, or the iterator's state dict);
        batches prepared before are dropped. ``start_prefetch`` (or ``next``) restarts."""
        self._join()
        if isinstance(state, bytes | str):
            state = json.loads(state)
        self._iterator.set_state(state)
        self._state = self._iterator.get_state()

    def close(self) -> None:
        """Stops the thread and closes the wrapped iterator (its worker processes)."""
        self._join()
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
