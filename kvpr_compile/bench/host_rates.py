"""Host-side rates the placement work needs, measured on the CPU (a GPU only for the round trip),
for the benchmark; the timing of the host's attention and of the round trip is
plan/host_timing.py's (shared with `kvpr profile --host`).

- ``attention_rate``: one decode query per sequence attending to host-resident K,V (see
  plan/host_timing.py), as GB/s of K,V attended, per dtype, thread count
  (``torch.set_num_threads``: 1, 2, 4, ... up to every core) and kernel: the CPU worker's own
  (``runtime``, what a plan counts on) and the host's native-dtype matmuls on contiguous K,V
  (``native``, what the host gives at best); the gap is what a better CPU kernel could win.
- ``memory_bandwidth``: a large host tensor copied (bytes read + written per second) and summed
  (bytes read per second) with every thread.
- ``round_trip``: a small device tensor to pinned host memory and back, the host waiting for each
  copy (what a CPU-attention step pays per layer for its query and result); CUDA only, else
  recorded as absent with the reason.

    python -m benchmarks.host_rates --json PATH [--quick]
"""
from __future__ import annotations

import os
import time

import torch

from ..plan.host_timing import (KERNELS, QUICK_SHAPES, attend, attention_rate, decode_tensors,
                                median_seconds, round_trip)

__all__ = ["DECODE_SHAPES", "DTYPES", "KERNELS", "QUICK_SHAPES", "attend", "attention_rate",
           "decode_tensors", "measure", "memory_bandwidth", "round_trip", "thread_counts"]

DECODE_SHAPES = ({"name": "llama-7b b16 p1024", "batch": 16, "heads": 32, "kv_heads": 32,
                  "head_dim": 128, "past": 1024},
                 {"name": "llama-3-8b b16 p1024", "batch": 16, "heads": 32, "kv_heads": 8,
                  "head_dim": 128, "past": 1024})
DTYPES = ("float16", "bfloat16")


def thread_counts(cores: int | None = None) -> list[int]:
    cores = cores or os.cpu_count() or 1
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return counts + [cores]


def memory_bandwidth(mib: int = 256, repeats: int = 5) -> dict:
    src = torch.ones(mib << 18, dtype=torch.float32)            # mib MiB
    dst = torch.empty_like(src)
    size = src.numel() * src.element_size()
    copy = median_seconds(lambda: dst.copy_(src), repeats, 2.0)
    read = median_seconds(lambda: src.sum(), repeats, 2.0)
    return {"bytes": size, "threads": torch.get_num_threads(),
            "copy_gb_per_s": 2 * size / copy / 1e9, "read_gb_per_s": size / read / 1e9}


def measure(quick: bool = False, cores: int | None = None, max_s: float = 40.0) -> dict:
    """Every rate; attention measurements past ``max_s`` seconds are recorded as absent."""
    shapes = QUICK_SHAPES if quick else DECODE_SHAPES
    counts = thread_counts(cores) if not quick else thread_counts(min(2, os.cpu_count() or 1))
    attention, started = [], time.perf_counter()
    for shape in shapes:
        for dtype in DTYPES:
            tensors = decode_tensors(shape, dtype)       # built once, attended per thread count
            for n in counts:
                for kernel in KERNELS:
                    if attention and time.perf_counter() - started > max_s:
                        attention.append({"shape": shape["name"], "dtype": dtype, "threads": n,
                                          "kernel": kernel,
                                          "absent": f"past the {max_s:.0f} s budget"})
                        continue
                    attention.append(attention_rate(shape, dtype, n, repeats=2 if quick else 5,
                                                    tensors=tensors, kernel=kernel))
            del tensors
    return {"cores": os.cpu_count(), "torch": torch.__version__, "attention": attention,
            "memory": memory_bandwidth(mib=8 if quick else 256, repeats=2 if quick else 5),
            "round_trip": round_trip(repeats=5 if quick else 50)}
