"""Test setup: 8 fake CPU devices, float32 matmuls at full precision."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Persistent compilation cache, inherited by the driver subprocesses: runs of the same config
# (e.g. a run and its resumed restart) compile once per test session.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "raddino_jax_test_jit_cache")
)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(items):
    """Run the `slow` tests (60-120 s end-to-end runs) first: with `pytest -n 2` the workers then
    take the long tests while the short ones fill in behind, instead of one worker finishing a
    two-minute test alone at the end (the suite's budget is 15 minutes on 2 cores)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
