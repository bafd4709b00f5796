"""Device-memory rates of the presets' GPUs, and where a profile that lacks them gets them.

Two rates per GPU, bytes/s: ``copy`` (bytes read + written by strided copies such as the
assemble, and the recompute's elementwise passes) and ``read`` (bytes read by the layer's
streaming reads: weights, K,V in attention). The H100 figures come from this project's profile of
an H100 run and are effective rates, launch gaps and small kernels included; the other GPUs' are
those scaled by datasheet HBM bandwidth (estimates). How they were derived: docs/design.md, The
cost model.

Kept apart from the presets so that ``HardwareProfile`` (profile.py) can fill a profile saved
before these rates existed without importing the presets, which are made of profiles.
"""
from __future__ import annotations

H100_MEM_COPY_BYTES_PER_S = 700e9
H100_MEM_READ_BYTES_PER_S = 1.6e12
H100_HBM_TB_S = 3.35


def hbm_scaled(hbm_tb_s: float) -> tuple[float, float]:
    """(copy, read) of a GPU whose HBM runs at ``hbm_tb_s``: the H100 figures scaled."""
    scale = hbm_tb_s / H100_HBM_TB_S
    return H100_MEM_COPY_BYTES_PER_S * scale, H100_MEM_READ_BYTES_PER_S * scale


# preset name -> (copy, read); the first part of a name is the GPU model a device name may contain
RATES: dict[str, tuple[float, float]] = {
    "a100-pcie4": hbm_scaled(1.94),    # A100 80GB PCIe
    "h100-pcie5": hbm_scaled(H100_HBM_TB_S),
    "h200-pcie5": hbm_scaled(4.8),
}
# A profile lacking the device-memory rates whose device matches no preset gets the slowest
# preset's (A100): with slower device memory the planner recomputes less.
MEMORY_FALLBACK_PRESET = "a100-pcie4"


def memory_rates_for(name: str, device_name: str) -> tuple[str, float, float]:
    """(where from, copy, read) device-memory rates for a profile that lacks them: the preset
    named `name`, else the preset whose GPU model (A100/H100/H200) appears in `device_name`,
    else MEMORY_FALLBACK_PRESET."""
    key = str(name).lower()
    if key not in RATES:
        device = str(device_name).upper()
        key = next((k for k in RATES if k.split("-")[0].upper() in device),
                   MEMORY_FALLBACK_PRESET)
    copy, read = RATES[key]
    return f"preset {key}", copy, read
