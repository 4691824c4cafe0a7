"""Test setup: 8 fake CPU devices, float32 matmuls at full precision."""

import os
import tempfile

from tests.xla_env import FAST_CPU_COMPILE, xla_flags  # imports no jax

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
if FAST_CPU_COMPILE not in os.environ["XLA_FLAGS"]:  # `make test` sets only the device count
    os.environ["XLA_FLAGS"] += f" {FAST_CPU_COMPILE}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Persistent compilation cache, inherited by the driver subprocesses: runs of the same config
# (e.g. a run and its resumed restart) compile once per test session.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "raddino_jax_test_jit_cache")
)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
