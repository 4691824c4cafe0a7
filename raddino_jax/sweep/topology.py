"""Devices of a TPU topology without a TPU: the compile target of `--topology`.

`jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")`
returns device descriptions that a mesh can be built from; `jax.jit(...).lower(abstract
inputs).compile()` then runs libtpu's real TPU compiler on the CPU host, so XLA's memory and
cost analysis of the step for that slice are available before paying for it. Names as libtpu
spells them: "v4:2x2x1", "v5e:2x4", "v5p:4x4x4", "v6e:2x4".

v4 topologies describe each TensorCore as a device (two per chip, `core_on_chip` 0 and 1),
where a v4 VM runs them as one megacore device; the per-device HBM and peak are then per core
(half the chip's): `per_device_share`.
"""

from __future__ import annotations

import os

import jax

INSTALL_HINT = (
    'libtpu is needed to compile for a TPU topology on this machine: pip install "raddino-jax[tpu]"'
    f' (or pip install "jax[tpu]=={jax.__version__}")'
)


def libtpu_available() -> bool:
    """Whether libtpu (the TPU compiler) is importable; it needs no TPU."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def topology_devices(name: str) -> list:
    """The devices of TPU topology `name` ("v5p:2x2x1"); RuntimeError with the install hint
    when libtpu is missing, ValueError naming the topology when libtpu refuses it."""
    if not libtpu_available():
        raise RuntimeError(INSTALL_HINT)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # one host, no cluster lookup
    # Compiling needs no TPU, so the lockfile that keeps two processes off one TPU does not
    # apply: without this a second compiling process fails with "libtpu lockfile".
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as err:  # noqa: BLE001 - libtpu raises XlaRuntimeError for a bad name
        raise ValueError(
            f"--topology={name}: {str(err).strip().splitlines()[0]} (names as libtpu spells "
            'them, e.g. "v4:2x2x1", "v5e:2x4", "v5p:2x2x1", "v6e:2x4")'
        ) from err
    return list(topology.devices)


def per_device_share(devices) -> float:
    """Fraction of a chip one device is: 1/2 for v4 topologies' per-core devices, else 1."""
    cores = {getattr(d, "core_on_chip", 0) for d in devices}
    return 1.0 / len(cores)
