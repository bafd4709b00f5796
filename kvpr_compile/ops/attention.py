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


_SCORES: list = []   # the per-score programs of matmul -> softmax -> matmul attentions


def register_scores(fn) -> int:
    """Keep ``fn(scores, *extras)`` (a layer's per-score ops: scale, softcapping, masks) for
    ``partial_attention``; returns the index an op argument names it by."""
    _SCORES.append(fn)
    return len(_SCORES) - 1


def scores_fn(index: int):
    """The per-score program registered as ``index`` (None for -1)."""
    return None if index < 0 else _SCORES[index]


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float,
                      scores_of=None, extras=()):
    """``(out, lse)`` of ``q`` (b, H, n, d) over keys ``k``, ``v`` (b, Hk, c, d), in float32:
    ``out`` (b, H, n, dv), ``lse`` (b, H, n). Query head h reads key head h // (H / Hk), as
    ``repeat_interleave`` and SDPA's ``enable_gqa`` do (no copy of K,V). ``mask``: None, a bool
    mask (True: attend) or an additive float mask broadcastable to (b, H, n, c). ``scores_of``:
    None, or the layer's per-score ops ``scores_of(scores, *extras)`` applied after the scale,
    before the mask."""
    b, heads, n, d = q.shape
    kv_heads, c = k.shape[1], k.shape[2]
    rep = heads // kv_heads
    qf = q.float().reshape(b, kv_heads, rep * n, d)
    scores = (qf @ k.float().transpose(-2, -1)).reshape(b, heads, n, c) * scale
    if scores_of is not None:
        scores = scores_of(scores, *extras).float()
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
    part1 = torch.where(w1 > 0, w1 * o1, 0.0)   # a part with no key may hold NaN: weight 0
    part2 = torch.where(w2 > 0, w2 * o2, 0.0)
    return ((part1 + part2) / (w1 + w2)).to(dtype)


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


def scores_without(scores, start, end):
    """Scores (..., S) with key columns [start, end) at -inf (the device part of a
    matmul -> softmax -> matmul attention), and their float32 log-sum-exp."""
    pos = torch.arange(scores.shape[-1], device=scores.device)
    kept = scores.masked_fill((pos >= start) & (pos < end), NEG_INF)
    return kept, torch.logsumexp(kept.float(), dim=-1)


def mask_range(mask, start, end):
    """``mask``'s key columns [start, end); a mask broadcast over the keys or None as it is."""
    if mask is None or mask.shape[-1] == 1:
        return mask
    return mask[..., start:end]
