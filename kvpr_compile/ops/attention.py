"""Attention over a subset of the keys, with its log-sum-exp, and the exact merge of two such
parts: what a layer whose past is partly attended on the CPU runs instead of one attention.

Softmax attention over the union of two disjoint key sets is the LSE-weighted combination of the
two partial results: with ``lse_i = logsumexp(scores_i)`` and ``o_i = softmax(scores_i) @ v_i``,
``out = (e^(lse_1 - m) o_1 + e^(lse_2 - m) o_2) / (e^(lse_1 - m) + e^(lse_2 - m))``,
``m = max(lse_1, lse_2)``. A part with no keys (or every key masked) has ``lse = -inf`` and
weight 0. ``partial_attention`` computes in float32 (whatever the inputs' dtype); the merge
casts back to the attention's dtype. Pure torch, so a compiler may trace it.

The CPU part (runtime/cpu_attention.py) calls ``host_partial_attention``: on half-precision
host K,V without per-score ops it is torch's fused CPU attention kernel, which reads K,V once
in their own dtype and accumulates in float32 (the float32 composite would first write a
float32 copy of the range, three times the memory traffic); the query heads of a GQA group
become query rows of their K,V head (no copy of K,V); rows whose mask, in q's dtype, allows no
key get ``lse = -inf`` (the kernel says 0; ops/fused_attention.py). An empty key range (the
kernel dies on one), anything else, and a torch without the kernel take ``partial_attention``.
The device part of an SDPA layer runs its device's fused kernel (``fused_attention``) where
passes/cpu_attention.py found that one applies, else ``partial_attention``.
"""
from __future__ import annotations

import os

import torch

from .fused_attention import DTYPES, KERNELS, fused_attention, mask_heads_fit

NEG_INF = float("-inf")
# The torch thread count the CPU worker attends with (None: half the cores, at least one).
WORKER_THREADS: int | None = None


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


def worker_threads() -> int:
    """``WORKER_THREADS``, else half the cores: what the CPU worker attends with
    (runtime/cpu_attention.py) and ``kvpr profile --host`` measures at by default, so the plan's
    host rate is the worker's."""
    return WORKER_THREADS if WORKER_THREADS is not None else max(1, (os.cpu_count() or 2) // 2)


def rows_as_heads(k_rows: torch.Tensor, v_rows: torch.Tensor):
    """Token-major store rows (n, b, kv_heads, d) as the (b, kv_heads, n, d) views attention
    reads (no copy)."""
    return k_rows.permute(1, 2, 0, 3), v_rows.permute(1, 2, 0, 3)


def host_partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float,
                           scores_of=None, extras=()):
    """``partial_attention``'s result (float32 ``out``, ``lse``) for host tensors, by the fused
    kernel where it applies (module docstring)."""
    if (scores_of is not None or extras or q.dtype not in DTYPES["cpu"] or q.device.type != "cpu"
            or not (k.dtype == v.dtype == q.dtype) or k.shape[2] == 0 or q.shape[2] == 0
            or not _fused_available()):   # (the kernel dies on an empty key range)
        return partial_attention(q, k, v, mask, scale, scores_of, extras)
    if mask is not None and not mask_heads_fit(mask.shape, q.shape[1]):
        return partial_attention(q, k, v, mask, scale, scores_of, extras)
    return fused_attention(q, k, v, mask, scale)


_fused_state: list = []   # [bool] once probed


def _fused_available() -> bool:
    """Whether this torch's fused CPU kernel takes the call as used here (probed once)."""
    if not _fused_state:
        ok = KERNELS["cpu"] is not None
        if ok:
            try:
                t = torch.zeros(1, 1, 2, 8, dtype=torch.bfloat16)
                out, lse = KERNELS["cpu"](t, t, t, 0.0, False, attn_mask=t[..., :2, :2],
                                          scale=1.0)
                ok = out.shape == t.shape and lse.shape == (1, 1, 2)
            except (RuntimeError, TypeError):
                ok = False
        _fused_state.append(ok)
    return _fused_state[0]


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
