"""Checkpoint writing: which device writes what (the state's own save/restore is tested end to
end in test_main.py)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from raddino_jax import checkpoint


def _slice_compiles(records) -> int:
    return sum("Compiling jit(slice)" in r.getMessage() for r in records)


def test_only_large_replicated_arrays_are_written_replica_parallel(tmp_path, caplog):
    """Replicated over 8 devices: arrays under `MIN_REPLICA_PARALLEL_SLICE_BYTES` per replica
    are written whole by one device (no per-device slice compiles on the first save); a large
    one is still split over the replicas. Both read back exactly."""
    checkpoint.use_replica_parallel_for_large_arrays_only()
    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
    replicated = NamedSharding(mesh, P())
    side = 1536  # float32 [1536, 1536] over 8 replicas: slices of 1.1 MiB
    assert side * side * 4 / 8 >= checkpoint.MIN_REPLICA_PARALLEL_SLICE_BYTES
    trees = {
        "small": {"w": jnp.arange(96 * 32.0).reshape(96, 32), "b": jnp.ones(96) * 0.5},
        "large": {"w": jnp.arange(side * side, dtype=jnp.float32).reshape(side, side)},
    }
    compiles = {}
    for name, tree in trees.items():
        tree = jax.device_put(tree, replicated)
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level(logging.WARNING):
            with ocp.StandardCheckpointer() as saver:
                saver.save(tmp_path / name, tree)
        compiles[name] = _slice_compiles(caplog.records)
        with ocp.StandardCheckpointer() as reader:
            restored = reader.restore(tmp_path / name, jax.tree.map(np.asarray, tree))
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert compiles["small"] == 0
    assert compiles["large"] >= 7  # one slice per replica device (the first may reuse a shape)
