"""Yardsticks of benchmark protocol 2: what a decode step cannot beat, from measured rates.

All pure arithmetic over a case's dimensions and the rates of the run's one profile (no plan, no
cost model: the yardsticks must not move with the plan they judge). Per decode step, at the
median cached length ``past`` of the timed steps, over ``layers`` layers:

- ``kv_bytes``     full K,V: layers * 2 * b * past * h_kv * elem  (ratio 0's H2D bytes)
- ``kv_link_ms``   kv_bytes / measured H2D (ratio 0's own floor)
- ``hf_bound_ms``  HF's offloaded cache moves the full K,V in and the same back every step:
                   overlapped max(kv/H2D, kv/D2H), serial kv/H2D + kv/D2H
- ``link_ms(l)``   layers * (l * b*h*elem + (past - l) * 2*b*h_kv*elem) / H2D: recompute the
                   first l tokens from X, ship K,V for the rest (one l for every layer)
- ``device_ms(l)`` the measured resident step + layers * (recompute GEMMs 2*b*l*h*2*h_kv FLOP
                   at the measured GEMM rate + the recompute's memory work at the measured copy
                   rate: X read b*l*h, K,V written 2*b*l*h_kv, and RoPE on K read and written
                   2*b*l*h_kv, bytes times elem)
- ``t_star_ms``    min over l in [0, past] of max(link_ms(l), device_ms(l)); both are linear in
                   l, so the minimum is at an end or where they cross
- ``resident_bytes`` the weights a step reads + the full K,V, for the resident's own bound
- ``share_kv_bytes(s)`` a resident share s of every layer's past kept on the device (ratio 0):
                   layers * 2 * b * (past - floor(s * past)) * h_kv * elem, the rows not resident
- ``share_t_star_ms`` that placement's own bound: max(share_kv_bytes / H2D, the resident step)
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Dims:
    batch: int
    hidden: int
    kv_hidden: int
    layers: int
    elem_bytes: int
    rope: bool = True          # the recompute applies RoPE to K (Llama); OPT has none


@dataclass(frozen=True)
class Rates:
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    flops_per_s: float          # GEMM rate of the benchmark's dtype
    mem_copy_bytes_per_s: float  # bytes read + written per second (strided/elementwise passes)
    mem_read_bytes_per_s: float  # streaming reads (weights, K,V in attention)


def median_past(prompt: int, steps: int) -> int:
    """Cached tokens before the median timed step: step j (1..N) runs over prompt + j - 1."""
    return prompt + (steps - 1) // 2


def kv_bytes(d: Dims, past: int) -> int:
    return d.layers * 2 * d.batch * past * d.kv_hidden * d.elem_bytes


def kv_link_ms(d: Dims, past: int, r: Rates) -> float:
    return kv_bytes(d, past) / r.h2d_bytes_per_s * 1e3


def hf_bound_ms(d: Dims, past: int, r: Rates) -> dict:
    kv = kv_bytes(d, past)
    h2d, d2h = kv / r.h2d_bytes_per_s * 1e3, kv / r.d2h_bytes_per_s * 1e3
    return {"overlapped": max(h2d, d2h), "serial": h2d + d2h}


def link_ms(d: Dims, past: int, l: float, r: Rates) -> float:
    x_tok, kv_tok = d.batch * d.hidden * d.elem_bytes, 2 * d.batch * d.kv_hidden * d.elem_bytes
    return d.layers * (l * x_tok + (past - l) * kv_tok) / r.h2d_bytes_per_s * 1e3


def recompute_ms(d: Dims, l: float, r: Rates) -> float:
    """The device work of recomputing K,V for l tokens in every layer."""
    flops = 2 * d.batch * l * d.hidden * 2 * d.kv_hidden
    moved = d.batch * l * (d.hidden + 2 * d.kv_hidden + (2 * d.kv_hidden if d.rope else 0))
    per_layer = flops / r.flops_per_s + moved * d.elem_bytes / r.mem_copy_bytes_per_s
    return d.layers * per_layer * 1e3


def device_ms(d: Dims, past: int, l: float, r: Rates, resident_ms: float) -> float:
    return resident_ms + recompute_ms(d, min(l, past), r)


def t_star(d: Dims, past: int, r: Rates, resident_ms: float) -> tuple[float, int]:
    """(T* in ms, the l that reaches it)."""
    lo = (link_ms(d, past, 0, r), device_ms(d, past, 0, r, resident_ms))
    hi = (link_ms(d, past, past, r), device_ms(d, past, past, r, resident_ms))
    candidates = {0, past}
    link_slope, dev_slope = (hi[0] - lo[0]) / max(past, 1), (hi[1] - lo[1]) / max(past, 1)
    if link_slope != dev_slope:
        cross = (lo[1] - lo[0]) / (link_slope - dev_slope)
        if 0 <= cross <= past:
            candidates |= {math.floor(cross), math.ceil(cross)}
    best = min(candidates, key=lambda l: max(link_ms(d, past, l, r),
                                             device_ms(d, past, l, r, resident_ms)))
    return max(link_ms(d, past, best, r), device_ms(d, past, best, r, resident_ms)), best


def floor_ms(h2d_bytes: float, r: Rates) -> float:
    """An offloaded contender's own floor: the bytes it ships per step over the measured H2D."""
    return h2d_bytes / r.h2d_bytes_per_s * 1e3


def resident_bound_ms(weight_bytes: float, d: Dims, past: int, r: Rates) -> float:
    """Reading the weights and the full K,V once at the measured streaming-read rate."""
    return (weight_bytes + kv_bytes(d, past)) / r.mem_read_bytes_per_s * 1e3


def share_kv_bytes(d: Dims, past: int, share: float) -> int:
    """K,V bytes per step with ``share`` of every layer's past resident (the runtime's rule,
    r = floor(share * past) with the share as the rewrite's fraction)."""
    from ..ops.split import recompute_tokens   # the same floor of the same fraction
    return kv_bytes(d, past - recompute_tokens(share, past))


def share_t_star_ms(d: Dims, past: int, share: float, r: Rates, resident_ms: float) -> float:
    """What a step with that resident share cannot beat: its link time or the resident step."""
    return max(floor_ms(share_kv_bytes(d, past, share), r), resident_ms)
