"""Measuring a hardware profile on this CUDA device: pinned copies, device copies and GEMMs,
timed with CUDA events, and the host's CPU-attention rates and round trip (host_measure.py).
Without CUDA nothing is measured here (RuntimeError naming the presets): nothing is ever made
up (the host's rates alone are measured by host_measure.py on any machine).
"""
from __future__ import annotations

import datetime
import re
import statistics

import torch

from .presets import PRESETS
from .profile import HardwareProfile, dtype_key

MiB = 1 << 20


def slug(text: str) -> str:
    """``text`` (a device name) with only file-name-safe characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "device"


def cuda_device(device: str | torch.device | int) -> torch.device:
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise RuntimeError(f"measure() times PCIe copies and GEMMs on a CUDA device; got {dev}. "
                           f"Use a preset instead: {', '.join(PRESETS)}")
    if not torch.cuda.is_available():
        raise RuntimeError("measure() needs a CUDA device and torch.cuda.is_available() is False; "
                           f"nothing was measured. Use a preset instead: {', '.join(PRESETS)}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _time_ms(fn, repeats: int, warmup: int, stream: torch.cuda.Stream) -> float:
    """Median CUDA-event time of `fn()` in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _copy_rates(dev: torch.device, size: int, repeats: int, warmup: int) -> tuple[float, float]:
    """(H2D, D2H) bytes/s for one pinned-host <-> device copy of `size` random bytes."""
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    host.random_(0, 256)
    gpu = torch.empty(size, dtype=torch.uint8, device=dev)
    stream = torch.cuda.current_stream(dev)
    h2d_ms = _time_ms(lambda: gpu.copy_(host, non_blocking=True), repeats, warmup, stream)
    d2h_ms = _time_ms(lambda: host.copy_(gpu, non_blocking=True), repeats, warmup, stream)
    return size / (h2d_ms / 1e3), size / (d2h_ms / 1e3)


def _memory_rates(dev: torch.device, size: int, repeats: int, warmup: int
                  ) -> tuple[float, float]:
    """(copy, read) device-memory rates in bytes/s. copy: a contiguous (b, h, s, d) fp16 tensor
    written from a permuted view of a sequence-major (s, b, h, d) one, like the assemble's reads
    of slot views (bytes read + written). read: a decode-shaped GEMM, 16 rows times a weight
    matrix of `size` bytes, i.e. how fast the layer's GEMMs stream their weights (bytes read)."""
    b, h, d = 16, 32, 128
    s = max(1, size // (b * h * d * 2))
    src = torch.empty(s, b, h, d, device=dev, dtype=torch.float16).normal_()
    dst = torch.empty(b, h, s, d, device=dev, dtype=torch.float16)
    stream = torch.cuda.current_stream(dev)
    moved = 2 * src.numel() * src.element_size()
    copy_ms = _time_ms(lambda dst=dst, src=src: dst.copy_(src.permute(1, 2, 0, 3)),
                       repeats, warmup, stream)
    del src, dst
    rows, k = 16, 4096
    weight = torch.empty(k, max(1, size // (k * 2)), device=dev, dtype=torch.float16).normal_()
    x = torch.randn(rows, k, device=dev, dtype=torch.float16)
    out = torch.empty(rows, weight.shape[1], device=dev, dtype=torch.float16)
    read_ms = _time_ms(lambda: torch.matmul(x, weight, out=out), repeats, warmup, stream)
    read = weight.numel() * weight.element_size()
    return moved / (copy_ms / 1e3), read / (read_ms / 1e3)


def _gemm_rate(dev: torch.device, dtype: torch.dtype, shape: tuple[int, int, int],
               repeats: int, warmup: int) -> float:
    m, k, n = shape
    a = torch.randn(m, k, device=dev, dtype=dtype)
    b = torch.randn(k, n, device=dev, dtype=dtype)
    out = torch.empty(m, n, device=dev, dtype=dtype)
    stream = torch.cuda.current_stream(dev)
    ms = _time_ms(lambda: torch.matmul(a, b, out=out), repeats, warmup, stream)
    return 2.0 * m * k * n / (ms / 1e3)


def measure(device: str | torch.device | int = "cuda", *, repeats: int = 10, warmup: int = 3,
            sizes: tuple[int, ...] = (64 * MiB, 256 * MiB),
            gemm_shape: tuple[int, int, int] = (16384, 4096, 8192),
            dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32),
            host: bool = True) -> HardwareProfile:
    """Measure pinned H2D/D2H bandwidth, device-memory copy rates and GEMM rates on a CUDA
    device.

    Copies: random bytes in pinned host memory, each size timed with CUDA events (median of
    `repeats` after `warmup`), the best size taken as the plateau. GEMMs: [m, k] x [k, n] at a
    recompute-like shape ([b*l, h] x [h, 2*h_kv]), one rate per dtype (bf16 skipped where the
    device lacks it; fp32 runs with whatever TF32 setting torch has). Device memory, at the
    largest size: a permuting copy (mem_copy) and a decode-shaped GEMM's weight reads (mem_read;
    the presets' read rates are lower: calibrated on whole layers, launch gaps and small kernels
    included). ``host``: also the host's CPU-attention rates and round trip (host_measure.py).
    Raises RuntimeError without CUDA: nothing is ever made up.
    """
    dev = cuda_device(device)
    if repeats < 1 or warmup < 0 or not sizes:
        raise ValueError("measure() needs repeats >= 1, warmup >= 0 and at least one size")
    with torch.cuda.device(dev):
        rates = [_copy_rates(dev, int(size), repeats, warmup) for size in sizes]
        h2d = max(r[0] for r in rates)
        d2h = max(r[1] for r in rates)
        mem_copy, mem_read = _memory_rates(dev, int(max(sizes)), repeats, warmup)
        flops = {}
        for dtype in dtypes:
            if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
                continue
            flops[dtype_key(dtype)] = _gemm_rate(dev, dtype, gemm_shape, repeats, warmup)
        torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name(dev)
    m, k, n = gemm_shape
    profile = HardwareProfile(
        name=slug(device_name).lower(),
        device_name=device_name,
        h2d_bytes_per_s=h2d,
        d2h_bytes_per_s=d2h,
        flops_per_s=flops,
        torch_version=torch.__version__,
        date=datetime.date.today().isoformat(),
        source="measured",
        mem_copy_bytes_per_s=mem_copy,
        mem_read_bytes_per_s=mem_read,
        notes=(f"CUDA events, median of {repeats} after {warmup} warm-up; pinned copies of "
               f"{[s // MiB for s in sizes]} MiB (best size kept); device copies of "
               f"{max(sizes) // MiB} MiB (a permuting copy; a 16-row GEMM over that many weight "
               f"bytes); GEMM {m}x{k}x{n}; "
               f"fp32 matmul precision {torch.get_float32_matmul_precision()!r}"),
    )
    if not host:
        return profile
    from .host_measure import measure_host, with_host_rates
    return with_host_rates(profile, measure_host())
