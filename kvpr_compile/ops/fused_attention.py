"""Torch's fused attention kernels that also return their log-sum-exp, in the convention of
``partial_attention`` (ops/attention.py): float32 ``out`` (b, H, n, dv) and ``lse`` (b, H, n),
``-inf`` for a row whose mask allows no key.

Why: the float32 composite writes a float32 copy of K,V and materialises the scores, three
times the memory traffic of a kernel that reads K,V once in their own dtype. Both parts of a
split attention use a kernel where one applies: the CPU worker on the host's K,V, the device
part on the assembled K,V.

Kernels, by the query's device:

- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (fp16, bf16). It accumulates in
  float32 and rounds the probabilities to the dtype before P V, as a GPU's fused kernel does.
- CUDA: ``aten._scaled_dot_product_efficient_attention`` with ``compute_log_sumexp`` (fp16,
  bf16, fp32): the kernel public SDPA runs for an arbitrary mask. Its LSE rows are padded to a
  multiple of 32; its bias must be dense in the last dim with its other strides aligned to 8
  elements (public SDPA pads a mask the same way) and expanded to (b, heads, rows, keys).

Common to both: a GQA group's query heads become query rows of their K,V head (K,V are not
repeated), the mask laid out to match as (head, token) and made additive in q's dtype; a row
whose mask, as the kernel saw it (a float32 minimum is -inf in fp16), allows no key gets
``lse = -inf`` (the CPU kernel says 0, which a merge would weigh as e^0).

Whether a layer's device part takes the kernel is decided before the rewrite (ops/device_kernel.py).
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")

KERNELS = {"cpu": getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None),
           "cuda": getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)}
DTYPES = {"cpu": (torch.float16, torch.bfloat16),
          "cuda": (torch.float16, torch.bfloat16, torch.float32)}
_BIAS_ALIGN = 8   # elements: the CUDA kernel's alignment of a bias's strides


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float):
    """``partial_attention``'s ``(out, lse)`` by the fused kernel of ``q``'s device. The caller
    checked that it applies (``device_kernel``, or the host's own checks): same dtype for q, K,
    V, at least one key, a mask whose head dim is 1 or the query's heads."""
    return grouped_call(q, k, v, mask, scale, _RUNNERS[q.device.type])


def grouped_call(q, k, v, mask, scale: float, runner):
    """``fused_attention`` with the kernel call ``runner(q_grouped, k, v, bias, scale)`` ->
    (out, lse) of the grouped rows (module docstring)."""
    b, heads, n, d = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    rows = heads // kv_heads * n
    bias = grouped_mask(mask, b, heads, kv_heads, n, keys, q.dtype)
    qg = q.reshape(b, kv_heads, rows, d)   # a group's heads as query rows
    out, lse = runner(qg, k, v, bias, scale)
    out = out.float().reshape(b, heads, n, v.shape[-1])
    lse = lse.float().reshape(b, heads, n)
    if bias is not None:   # a row with no key: lse -inf, whatever the kernel said
        dead = ~(bias > NEG_INF).any(-1)   # as the kernel saw it (in q's dtype)
        lse = lse.masked_fill(dead.expand(b, kv_heads, rows).reshape(b, heads, n), NEG_INF)
    return out, lse


def _cuda_kernel(qg, k, v, bias, scale):
    """The CUDA kernel's (out, lse) with its conventions undone (module docstring)."""
    rows, keys = qg.shape[2], k.shape[2]
    if bias is not None:   # dense last dim, rows aligned: pad, then view the keys back
        bias = torch.nn.functional.pad(bias, (0, (-keys) % _BIAS_ALIGN))[..., :keys]
        bias = bias.expand(qg.shape[0], k.shape[1], rows, keys)
    out, lse = KERNELS["cuda"](qg, _dense(k), _dense(v), bias, True, 0.0, False,
                               scale=scale)[:2]
    return out, lse[..., :rows]


def _cpu_kernel(qg, k, v, bias, scale):
    return KERNELS["cpu"](qg, k, v, 0.0, False, attn_mask=bias, scale=scale)[:2]


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


_RUNNERS = {"cpu": _cpu_kernel, "cuda": _cuda_kernel}


def grouped_mask(mask, b: int, heads: int, kv_heads: int, n: int, keys: int, dtype):
    """``mask`` (None, bool or additive, broadcastable to (b, heads, n, keys), with a head dim
    of 1 or ``heads``: ``mask_heads_fit``) for query rows laid out per K,V head as
    (group head, token): additive, in ``dtype``."""
    if mask is None:
        return None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))   # broadcast's leading 1s
    group = heads // kv_heads
    if mask.dtype == torch.bool:
        mask = torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, NEG_INF)
    m = mask.to(dtype).expand(b, mask.shape[1], n, keys)
    if mask.shape[1] == 1:
        return m.unsqueeze(2).expand(b, 1, group, n, keys).reshape(b, 1, group * n, keys)
    return m.reshape(b, kv_heads, group * n, keys)


def mask_heads_fit(mask_shape, heads: int) -> bool:
    """Whether a mask of this shape can be laid out per K,V head (``grouped_mask``): at most 4
    dims, a head dim of 1 or ``heads``."""
    if len(mask_shape) > 4:
        return False
    shape = (1,) * (4 - len(mask_shape)) + tuple(mask_shape)
    return shape[1] in (1, heads)
