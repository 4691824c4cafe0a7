"""XLA flags of every test process (pytest's and the driver subprocesses it starts); no jax
import, so conftest can set them before jax reads them."""

# LLVM at -O0 for the CPU backend: compiles of the tiny steps take about half as long, and
# compiles dominate this suite (measured: the mesh-layout step test 93 s -> 55 s cold). HLO
# passes still run, and -O0 does not reorder floating point, so the numerics are the same.
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 8) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_CPU_COMPILE}"
