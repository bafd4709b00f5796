"""The cost model's CPU co-attention terms: what attending u of a layer's past tokens on the host
costs, and what it saves the link and the GPU (cost_model.py's docstring has the task graph).

Per layer, with v_cpu the host's attention rate (bytes of K+V attended per second, measured by
host_measure.py or given), batch b, n new tokens, p bytes per element:
    C(u) = 2*b*u*h_kv*p / v_cpu                        the host reads K,V[u] where they lie
    F    = max(2*b*n*h^2 / v_gpu, h^2*p / v_read)      the Q projection (the query must exist)
           + b*n*h*p / v_d2h + b*n*h*p / v_h2d          the query out, the partial output back
           + round trip                                 a small D2H + H2D with host waits
    saved per position on the GPU: its assemble (2*2*b*h_kv*p / v_copy) and its attention
           (max(4*b*n*h / v_gpu, 2*b*h_kv*p / v_read), cost_model's rest term per position)
    post_merge = the GEMM part of rest * (h^2 + mlp) / P   merge, O projection and MLP: the
           layer's work that waits for the host's result (weights: Q, K, V before it)
The log-sum-exp that comes back with the output (4 bytes per head and token) is left out.
"""
from __future__ import annotations

import dataclasses
import math

from . import cost_model as cm


def check_rate(value, what: str = "cpu_attention_bytes_per_s") -> float | None:
    """``value`` as a float (None stays None); ValueError naming ``what`` unless it is a finite
    number >= 0 (0: the host attends nothing)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number of bytes of K,V the host attends per second "
                         f"(>= 0, or None for none), got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0 (bytes of K,V attended per "
                         f"second), got {value!r}")
    return float(value)


def check_round_trip(value) -> float | None:
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"cpu_round_trip_s must be a finite number of seconds >= 0 (or None), "
                         f"got {value!r}")
    return float(value)


def with_cpu_terms(c: cm.LayerCoefficients, profile, *, batch_size: int, hidden_size: int,
                   kv_hidden_size: int, dtype, cpu_attention_bytes_per_s: float,
                   round_trip_s: float, new_tokens: int = 1, mlp_params: int | None = None
                   ) -> cm.LayerCoefficients:
    """``c`` with the terms above for a host attending at ``cpu_attention_bytes_per_s`` (> 0)."""
    p = cm.bytes_per_element(dtype)
    b, h, n = batch_size, hidden_size, new_tokens
    v_gpu, v_read = profile.flops(dtype), profile.mem_read_bytes_per_s
    # the Q projection is part of rest, which the bare model (n = 0) leaves out
    q_proj = max(2 * b * n * h * h / v_gpu, h * h * p / v_read) if n > 0 else 0.0
    vectors = b * n * h * p
    fixed = (q_proj + vectors / profile.d2h_bytes_per_s + vectors / profile.h2d_bytes_per_s
             + round_trip_s)
    saved = 0.0
    post = 0.0
    if n > 0:
        kvb = cm.kv_bytes_per_token(b, kv_hidden_size, p)
        saved = (2 * kvb / profile.mem_copy_bytes_per_s
                 + max(4 * b * n * h / v_gpu, kvb / v_read))
        params = cm.layer_params(h, kv_hidden_size, mlp_params)
        after = params - h * h - 2 * h * kv_hidden_size        # O projection and MLP
        gemms = max(2 * b * n * params / v_gpu, params * p / v_read)
        post = gemms * after / params
    return dataclasses.replace(
        c, cpu_s_per_token=c.kv_bytes_per_token / cpu_attention_bytes_per_s, cpu_fixed_s=fixed,
        post_merge_s=post, gpu_kv_s_per_token=saved)
