"""Attention over a subset of the keys, with its log-sum-exp, and the exact merge of two such
parts: what a layer whose past is partly attended on the CPU runs instead of one attention.

Softmax attention over the union of two disjoint key sets is the LSE-weighted combination of the
two partial results: with ``lse_i = logsumexp(scores_i)`` and ``o_i = softmax(scores_i) @ v_i``,
``out = (e^(lse_1 - m) o_1 + e^(lse_2 - m) o_2) / (e^(lse_1 - m) + e^(lse_2 - m))``,
``m = max(lse_1, lse_2)``. A part with no keys (or every key masked) has ``lse = -inf`` and
weight 0. Both parts are computed in float32 (whatever the inputs' dtype); the merge casts back
to the attention's dtype. Pure torch, so a compiler may trace it; the CPU part runs the same
function on the store's K,V (runtime/cpu_attention.py).
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float):
    """``(out, lse)`` of ``q`` (b, H, n, d) over keys ``k``, ``v`` (b, Hk, c, d), in float32:
    ``out`` (b, H, n, dv), ``lse`` (b, H, n). Query head h reads key head h // (H / Hk), as
    ``repeat_interleave`` and SDPA's ``enable_gqa`` do (no copy of K,V). ``mask``: None, a bool
    mask (True: attend) or an additive float mask broadcastable to (b, H, n, c)."""
    b, heads, n, d = q.shape
    kv_heads, c = k.shape[1], k.shape[2]
    rep = heads // kv_heads
    qf = q.float().reshape(b, kv_heads, rep * n, d)
    scores = (qf @ k.float().transpose(-2, -1)).reshape(b, heads, n, c) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, NEG_INF)
        else:
            scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.unsqueeze(-1))
    p = torch.where(torch.isneginf(lse).unsqueeze(-1), 0.0, p)   # no key: no NaN
    out = (p.reshape(b, kv_heads, rep * n, c) @ v.float()).reshape(b, heads, n, v.shape[-1])
    return out, lse


def merge_partials(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """The attention over both parts' keys (module docstring), cast to ``dtype``."""
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isneginf(m), 0.0, m)
    w1 = torch.exp(lse1 - m).unsqueeze(-1)
    w2 = torch.exp(lse2 - m).unsqueeze(-1)
    return ((w1 * o1 + w2 * o2) / (w1 + w2)).to(dtype)


def mask_out(mask, key: torch.Tensor, start, end):
    """The device part's mask: ``mask`` (None, bool or additive) with key columns [start, end)
    masked out, for the keys of ``key`` (..., S, d); those rows hold zeros (the CPU attends to
    the real ones)."""
    pos = torch.arange(key.shape[-2], device=key.device)
    keep = (pos < start) | (pos >= end)
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return torch.where(keep, mask, NEG_INF)


def mask_range(mask, start, end):
    """``mask``'s key columns [start, end); a mask broadcast over the keys or None as it is."""
    if mask is None or mask.shape[-1] == 1:
        return mask
    return mask[..., start:end]
