"""Training throughput as model FLOPs: TFLOP/s per device and model FLOPs utilisation (MFU).

MFU = model FLOPs per second per device / the device's dense peak. Model FLOPs leave out pads
and recomputation (see models/teacher.py's train_flops), so MFU measures useful work only.
"""

from __future__ import annotations

import torch

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
# Looked up by substring of torch.cuda.get_device_name, first match wins (PCIe before SXM).
PEAK_HALF_PRECISION_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
]


def peak_tflops(
    device: torch.device, configured: float | None, half_precision: bool
) -> float | None:
    """The peak MFU is measured against: `configured` (train.peak_tflops) when set, else the
    table's entry for this GPU in bf16/fp16; None (no MFU) on CPU, fp32 or an unknown GPU."""
    if configured:
        return float(configured)
    if device.type != "cuda" or not half_precision:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_HALF_PRECISION_TFLOPS if key in name), None)


def throughput_record(
    flops: float, seconds: float, devices: int, peak: float | None
) -> dict[str, float]:
    """`flops` done by `devices` together in `seconds` -> TFLOP/s per device (and MFU)."""
    per_device = flops / seconds / devices / 1e12
    record = {"tflops_per_device": per_device}
    if peak:
        record["mfu"] = per_device / peak
    return record
