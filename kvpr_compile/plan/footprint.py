"""What a plan asks of memory, in `kvpr plan`'s words: the host (CPU) bytes of the offloaded
cache, K and V for every layer plus X where a layer keeps it (ratio > 0: passes/rewrite.py
stores no X at ratio 0), and the device bytes of the latency schedule (the resident weights,
the pipeline's working set, resident prefixes)."""
from __future__ import annotations

from ..ops.split import ratio_fraction
from . import cost_model as cm



def sized(n: float) -> str:
    """Bytes, three significant digits: 4.03 GB, 12.3 MB, 512 B."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def x_layers(ratios) -> int:
    """Layers that keep X in the store: those the rewrite bakes a ratio above 0 into."""
    return sum(1 for r in ratios if ratio_fraction(r) > 0)


def host_bytes(ratios, *, batch: int, seq_len: int, hidden: int, kv_hidden: int,
               dtype) -> tuple[int, int]:
    """(K,V bytes, X bytes) the CPU store holds for ``seq_len`` cached tokens per sequence."""
    p = cm.bytes_per_element(dtype)
    kv = len(ratios) * cm.kv_bytes_per_token(batch, kv_hidden, p) * seq_len
    x = x_layers(ratios) * cm.x_bytes_per_token(batch, hidden, p) * seq_len
    return kv, x


def host_line(ratios, *, batch: int, seq_len: int, hidden: int, kv_hidden: int, dtype,
              weights: int = 0) -> str:
    """One line: K+V, X (and weights streamed from CPU memory, if any), sized."""
    kv, x = host_bytes(ratios, batch=batch, seq_len=seq_len, hidden=hidden,
                       kv_hidden=kv_hidden, dtype=dtype)
    kept = x_layers(ratios)
    x_text = (f"X {sized(x)} ({kept} of {len(ratios)} layers keep X)" if kept
              else "no X (every layer at ratio 0)")
    w_text = f" + weights {sized(weights)} (streamed)" if weights else ""
    return (f"host memory (CPU store) at batch {batch}, {seq_len} tokens: K,V {sized(kv)} + "
            f"{x_text}{w_text} = {sized(kv + x + weights)}"
            + (", plus side inputs such as RoPE cos/sin" if kept else ""))


def device_line(plan, mlp_params: int | None = None) -> str:
    """The latency schedule's device bytes: weights (resident), the working set (two K,V slots
    of s+1 positions and one assembled K,V, two X slots of the largest l), resident prefixes."""
    c = plan.coefficients
    p = cm.bytes_per_element(plan.dtype)
    weights = plan.num_layers * cm.layer_params(plan.hidden_size, plan.kv_hidden_size,
                                                mlp_params) * p
    resident = sum(plan.resident_tokens) * c.kv_bytes_per_token
    text = (f"device memory: weights {sized(weights)} ({plan.num_layers} layers, resident) "
            f"+ working set {sized(plan.working_set_bytes)} (two K,V slots and an "
            f"assembled K,V of {plan.seq_len + 1} positions, two X slots of "
            f"{max(plan.recompute_tokens)} tokens)")
    if resident:
        text += f" + resident K,V {sized(resident)} ({sum(plan.resident_tokens)} tokens)"
    return text + f" = {sized(weights + plan.working_set_bytes + resident)}"


def why_not_closed_form(plan) -> str:
    """One line: why the LP's split is not the paper's closed form (R = K, GEMMs only): the
    terms the cost model adds, and the steady state they give."""
    c, ms = plan.coefficients, 1e3
    middle = plan.resident_tokens[plan.num_layers // 2] if plan.resident_tokens else 0
    steady = cm.balanced_recompute_tokens(c, middle, overlap=plan.overlap) / plan.seq_len
    if c.x_s_per_token >= c.kv_s_per_token:
        return ("why: X is no smaller than K+V per token here (h >= 2*h_kv), so shipping X "
                "never pays: the LP and the closed form both recompute nothing")
    if plan.overlap == "row":
        return (f"why the split differs from the closed form: R also counts the elementwise "
                f"pass (the second number), and layers after the first balance R = K + D, the "
                f"append D {c.store_s * ms:.3f} ms sharing the link: steady state l/s = "
                f"{steady:.3f}")
    return (f"why the split differs from the closed form: with stream overlap a layer's "
            f"recompute runs beside the next layer's loads, so the LP balances the link "
            f"(A + K + D) against the GPU (R + M + rest: recompute with its elementwise pass, "
            f"assemble {c.assemble_s * ms:.3f} ms, weight reads and attention "
            f"{c.rest_s * ms:.3f} ms per layer), not R against K: steady state l/s = "
            f"{steady:.3f}; the last layers recompute less (no later loads to overlap)")
