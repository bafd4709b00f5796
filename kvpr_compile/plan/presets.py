"""The presets: cited hardware profiles for GPUs this project plans for without measuring them.

Each preset's ``source`` says where every figure comes from (datasheet peaks, estimates of
achievable rates, or this project's measurements, named); ``DEFAULT_PRESET`` is what a machine
without CUDA plans with. ``preset(name)`` hands out a copy, so callers may edit it.
"""
from __future__ import annotations

import dataclasses

from .device_memory import RATES
from .profile import HardwareProfile


def _preset(name: str, device_name: str, link: float, fp16: float, fp32: float, source: str,
            torch_version: str = "n/a (preset)") -> HardwareProfile:
    """A preset with the same rate both ways on the link, bf16 = fp16, and its GPU's
    device-memory rates (device_memory.RATES)."""
    copy, read = RATES[name]
    return HardwareProfile(name=name, device_name=device_name, h2d_bytes_per_s=link,
                           d2h_bytes_per_s=link,
                           flops_per_s={"float16": fp16, "bfloat16": fp16, "float32": fp32},
                           torch_version=torch_version, date="2026-11-26", source=source,
                           mem_copy_bytes_per_s=copy, mem_read_bytes_per_s=read)


PRESETS: dict[str, HardwareProfile] = {p.name: p for p in (
    _preset("a100-pcie4", "NVIDIA A100 80GB on PCIe 4.0 x16", 25e9, 218e12, 17.5e12,
            "preset: PCIe 4.0 x16 is 31.5 GB/s per direction theoretical (PCI-SIG spec: 16 "
            "GT/s, 128b/130b); 25 GB/s pinned H2D/D2H is an estimate of the achievable rate "
            "(~80%), not measured by this project. A100 dense fp16/bf16 tensor 312 TFLOP/s and "
            "fp32 19.5 TFLOP/s are NVIDIA datasheet peaks; 218 (70%) and 17.5 (90%) TFLOP/s "
            "are estimates of achievable GEMM rates. Device memory: the H100 figures scaled "
            "by HBM bandwidth 1.94/3.35 (estimate)."),
    _preset("h100-pcie5", "NVIDIA H100 SXM5 80GB with a PCIe 5.0 x16 host link", 52e9, 660e12,
            60e12,
            "preset: PCIe 5.0 x16 is 63 GB/s per direction theoretical (PCI-SIG spec: 32 GT/s, "
            "128b/130b); 52 GB/s pinned H2D/D2H is an estimate (~83%; this project measured 55 "
            "GB/s H2D on an H200 over Gen5), not an H100 measurement. H100 SXM5 dense "
            "fp16/bf16 tensor 989 TFLOP/s and fp32 67 TFLOP/s are NVIDIA datasheet peaks; 660 "
            "(~67%) and 60 (90%) TFLOP/s are estimates of achievable GEMM rates. Device memory: "
            "700 GB/s for strided copies and 1.6 TB/s effective reads, both derived from this "
            "project's profile of an H100 80GB HBM3 (benchmarks/results/2026-11-26-h100.md)."),
    _preset("h200-pcie5", "NVIDIA H200 with a PCIe 5.0 x16 host link", 55e9, 650e12, 60e12,
            "preset: measured on an H200 by the kvpr_compile project (docs/design.md): 55 GB/s "
            "pinned H2D and fp16 GEMM at 600-700 TFLOP/s (650 used). D2H is assumed equal to "
            "H2D and bf16 equal to fp16 (not measured); fp32 60 TFLOP/s is an estimate (90% of "
            "the 67 TFLOP/s datasheet fp32 peak). Device memory: the H100 measurements scaled "
            "by HBM bandwidth 4.8/3.35 (estimate).",
            torch_version="2.11 (lent H200 image)"),
)}
DEFAULT_PRESET = "h200-pcie5"


def preset(name: str) -> HardwareProfile:
    """A copy of PRESETS[name] (so callers may edit it); ValueError listing presets if unknown."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None
    return dataclasses.replace(base, flops_per_s=dict(base.flops_per_s))
