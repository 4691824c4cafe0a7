"""One sweep result (`SweepRow`) and its console line; shared by `measure` and `report`."""

from __future__ import annotations

import dataclasses

MiB = 2**20


@dataclasses.dataclass
class SweepRow:
    """One (layout, batch, remat) result; byte counts are per device, FLOPs per step (global).

    status: "ok" (timed), "compiled" (--compile-only), "state" (--state-only) or "failed"
    (then `reason` says why). Fields a mode does not measure stay None (NaN in the CSV).
    `remat` is the policy name (`vit.REMAT_POLICIES`: none, full, dots).

    The `estimated_*` fields are XLA's cost-model estimate of the compiled step
    (`cost_analysis()["optimal_seconds"]`, reported by the TPU compiler), not a measurement:
    estimated step time, the images/s and MFU it implies (analytic FLOPs, `flops.py`).
    `hbm_bytes_per_device` is the device's HBM (`flops.hbm_bytes_per_device`), `fits` whether
    XLA's peak is within it, `hbm_fraction` = peak / HBM.
    """

    layout: str
    batch_size: int
    remat: str
    status: str = "failed"
    reason: str = ""
    n_devices: int = 0
    state_bytes_total: int | None = None
    state_bytes_per_device: int | None = None
    compile_time_s: float | None = None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    temp_bytes: int | None = None
    generated_code_bytes: int | None = None
    alias_bytes: int | None = None
    peak_bytes_per_device: int | None = None
    xla_flops_per_device: float | None = None
    analytic_flops_per_step: float | None = None
    # xla_flops_per_device * n_devices / analytic: ~1 when the batch's compute is split over the
    # devices, ~n_devices when every device computes the whole batch (XLA also counts
    # elementwise work, a few % at tiny widths).
    replication: float | None = None
    step_time_s: float | None = None
    images_per_s: float | None = None
    tflops_per_s: float | None = None
    mfu: float | None = None
    device_kind: str = ""
    hbm_bytes_per_device: int | None = None
    fits: bool | None = None
    hbm_fraction: float | None = None
    xla_bytes_accessed_per_device: float | None = None
    estimated_step_time_s: float | None = None
    estimated_images_per_s: float | None = None
    estimated_mfu: float | None = None

    @property
    def label(self) -> str:
        return f"{self.layout} b{self.batch_size}" + (
            f" remat={self.remat}" if self.remat != "none" else ""
        )

    @property
    def memory_bytes(self) -> int | None:
        """Best available per-device memory: XLA's peak estimate, else the state alone."""
        return self.peak_bytes_per_device or self.state_bytes_per_device


def layout_name(layout: tuple[int, int, int]) -> str:
    """(data, fsdp, tensor) -> "DxFxT"."""
    return "x".join(str(n) for n in layout)


def mib(value: int | None) -> str:
    """Bytes as MiB with one decimal; "" for None."""
    return "" if value is None else f"{value / MiB:.1f}"


def describe_row(row: SweepRow) -> str:
    """One console line per point."""
    if row.status == "failed":
        return f"{row.label}: failed ({row.reason})"
    parts = [f"{row.label}: {row.status}", f"state {mib(row.state_bytes_per_device)} MiB/dev"]
    if row.peak_bytes_per_device is not None:
        parts.append(f"peak {mib(row.peak_bytes_per_device)} MiB/dev")
    if row.hbm_fraction is not None:
        parts.append(
            f"{100 * row.hbm_fraction:.0f}% of HBM ({'fits' if row.fits else 'DOES NOT FIT'})"
        )
    if row.compile_time_s is not None:
        parts.append(f"compile {row.compile_time_s:.1f} s")
    if row.estimated_step_time_s is not None:
        parts.append(
            f"estimated {row.estimated_step_time_s * 1e3:.0f} ms/step, "
            f"{row.estimated_images_per_s:.1f} img/s, estimated MFU {row.estimated_mfu:.3f}"
        )
    if row.images_per_s is not None:
        parts.append(f"{row.step_time_s * 1e3:.0f} ms/step, {row.images_per_s:.1f} img/s")
    return ", ".join(parts)
