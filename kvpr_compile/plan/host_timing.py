"""Timing the host's part of a split attention, on the CPU (a GPU only for the round trip): what
`kvpr profile --host` (host_measure.py) and the benchmark's host rates (bench/host_rates.py)
both measure.

- ``attention_rate``: one decode query per sequence attending to host-resident K,V: scores =
  q K^T / sqrt(d) (GQA: the query heads of a group share one K,V head), L = logsumexp(scores),
  p = exp(scores - L), out = p V; both the output and L come back (the merge needs L). Reported
  as GB/s of K,V attended (K,V bytes / time) at one dtype and thread count
  (``torch.set_num_threads``), for one of two kernels:
  ``"runtime"``, the function the CPU worker runs (``ops.attention.host_partial_attention``)
  on the views of token-major store rows it reads (``runtime.cpu_attention``): the rate a plan
  may count on; ``"native"``, ``attend`` below in the store's dtype on head-major
  contiguous K,V: what this host's matmuls give at best, for comparison.
- ``round_trip``: a small device tensor to pinned host memory and back, the host waiting for each
  copy (what a CPU-attention step pays per layer for its query and result); CUDA only, else
  recorded as absent with the reason.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from ..ops.attention import host_partial_attention, rows_as_heads

KERNELS = ("runtime", "native")
QUICK_SHAPES = ({"name": "toy MHA", "batch": 2, "heads": 4, "kv_heads": 4, "head_dim": 16,
                 "past": 64},
                {"name": "toy GQA", "batch": 2, "heads": 4, "kv_heads": 2, "head_dim": 16,
                 "past": 64})


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (b, h, 1, d), k and v (b, h_kv, s, d) -> (out (b, h, 1, d), logsumexp (b, h, 1))."""
    b, h, _, d = q.shape
    h_kv = k.shape[1]
    g = h // h_kv
    qg = q.reshape(b, h_kv, g, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(d))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    p = torch.exp(scores - lse).to(v.dtype)
    out = torch.matmul(p, v)                                     # (b, h_kv, g, d)
    return out.reshape(b, h, 1, d), lse.reshape(b, h, 1)


def median_seconds(fn, repeats: int, budget_s: float) -> float:
    """Median seconds of ``fn()`` after one warm call, over at most ``repeats`` calls and
    ``budget_s`` seconds."""
    fn()
    times, spent = [], 0.0
    while len(times) < repeats and (spent < budget_s or not times):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return statistics.median(times)


def decode_tensors(shape: dict, dtype: str) -> tuple[torch.Tensor, ...]:
    """q (b, h, 1, d) and host-resident K, V rows (past, b, h_kv, d) of one decode step, laid
    out token-major as the store holds them."""
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    b, h, h_kv, d, s = (shape[k] for k in ("batch", "heads", "kv_heads", "head_dim", "past"))
    return tuple(torch.randn(*dims, generator=gen, dtype=dt)
                 for dims in ((b, h, 1, d), (s, b, h_kv, d), (s, b, h_kv, d)))


def kernel_call(kernel: str, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor):
    """A no-argument call of ``kernel`` (module docstring) over these store rows."""
    k, v = rows_as_heads(k_rows, v_rows)
    if kernel == "runtime":
        scale = 1.0 / math.sqrt(q.shape[-1])
        return lambda: host_partial_attention(q, k, v, None, scale)
    if kernel == "native":
        k, v = k.contiguous(), v.contiguous()
        return lambda: attend(q, k, v)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def attention_rate(shape: dict, dtype: str, threads: int, repeats: int = 5,
                   budget_s: float = 1.0, tensors=None, kernel: str = "runtime") -> dict:
    q, k, v = tensors if tensors is not None else decode_tensors(shape, dtype)
    call = kernel_call(kernel, q, k, v)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sec = median_seconds(call, repeats, budget_s)
    finally:
        torch.set_num_threads(before)
    kv = (k.numel() + v.numel()) * k.element_size()
    return {"shape": shape["name"], "dtype": dtype, "threads": threads, "kernel": kernel,
            "kv_bytes": kv, "ms": sec * 1e3, "gb_per_s": kv / sec / 1e9}


def round_trip(nbytes: int = 4096, repeats: int = 50) -> dict:
    if not torch.cuda.is_available():
        return {"absent": "needs CUDA (a device-to-host and host-to-device copy)"}
    dev = torch.zeros(nbytes // 2, dtype=torch.float16, device="cuda")
    host = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
    back = torch.empty_like(dev)

    def once():
        host.copy_(dev, non_blocking=True)
        torch.cuda.current_stream().synchronize()               # the host waits for the query
        back.copy_(host, non_blocking=True)
        torch.cuda.current_stream().synchronize()               # and for the result's landing
    times = []
    once()
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append((time.perf_counter() - t0) * 1e6)
    return {"bytes": nbytes, "median_us": statistics.median(times), "min_us": min(times),
            "repeats": repeats}
