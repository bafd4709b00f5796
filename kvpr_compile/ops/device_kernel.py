"""Whether the device part of a split attention may run its device's fused kernel
(ops/fused_attention.py), decided before a graph is rewritten from the attention's example
inputs: the device has a kernel for their dtype, q, K and V share it, the mask's head dim is 1 or
the query's heads, and a probe, run once per (device, dtype, head dims, GQA group), finds the
kernel giving the float32 composite's result on that device (GQA, two query tokens, a key count
that is no multiple of 8, a bool mask with a row allowing no key). A torch or a GPU whose kernel
refuses the call, returns NaN or disagrees keeps the composite, with one warning naming why.
"""
from __future__ import annotations

import warnings

import torch

from .attention import partial_attention
from .fused_attention import DTYPES, KERNELS, fused_attention, mask_heads_fit

_PROBED: dict = {}   # (device, dtype, d, dv, group) -> reason it does not apply, "" if it does
_PROBE_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 1e-3),
              torch.bfloat16: (3e-2, 1e-3)}   # (out, lse) against the float32 composite


def device_kernel(q, k, v, mask_shape) -> str:
    """"" where the device part of an attention with these example inputs may run
    ``fused_attention``, else why not. ``mask_shape``: the device part's mask's shape, or
    None."""
    device = q.device.type
    if KERNELS.get(device) is None:
        return f"no fused attention kernel for {device} in this torch"
    if q.dtype not in DTYPES[device]:
        return f"no fused attention kernel for {q.dtype} on {device}"
    if not (k.dtype == v.dtype == q.dtype):
        return f"K,V in {k.dtype}, the query in {q.dtype}"
    if mask_shape is not None and not mask_heads_fit(mask_shape, int(q.shape[1])):
        return "the mask's head dim is neither 1 nor the query's heads"
    key = (str(q.device), q.dtype, int(q.shape[-1]), int(v.shape[-1]),
           int(q.shape[1]) // int(k.shape[1]))
    if key not in _PROBED:
        _PROBED[key] = _probe(*key)
        if _PROBED[key]:
            warnings.warn(f"kvpr: the device part of split attention keeps the float32 "
                          f"composite on {key[0]} ({key[1]}, head dim {key[2]}): "
                          f"{_PROBED[key]}", stacklevel=2)
    return _PROBED[key]


def _probe(device: str, dtype, d: int, dv: int, group: int) -> str:
    """"" if the kernel gives the composite's result on this device, else what went wrong:
    GQA, two query tokens, a key count that is no multiple of 8, a bool mask with a dead row."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2 * group, 2, d, generator=g)
    k = torch.randn(1, 2, 13, d, generator=g)
    v = torch.randn(1, 2, 13, dv, generator=g)
    mask = torch.rand(1, 1, 2, 13, generator=g) > 0.3
    mask[..., 0, :] = False
    q, k, v = (t.to(dtype) for t in (q, k, v))   # both sides read the same rounded inputs
    want_out, want_lse = partial_attention(q.float(), k.float(), v.float(), mask, 0.3)
    args = [t.to(device) for t in (q, k, v)]
    try:
        with torch.no_grad():
            out, lse = fused_attention(*args, mask.to(device), 0.3)
        out, lse = out.cpu(), lse.cpu()
    except (RuntimeError, TypeError, NotImplementedError, ValueError) as e:
        return f"the kernel refused the call ({type(e).__name__}: {str(e)[:120]})"
    out_tol, lse_tol = _PROBE_TOL[dtype]
    live = torch.isfinite(want_lse)
    if not torch.equal(torch.isneginf(lse), torch.isneginf(want_lse)):
        return "the kernel's rows without a key disagree with the composite"
    if not (torch.isfinite(out[live]).all() and torch.isfinite(lse[live]).all()):
        return "the kernel returned NaN or inf"
    scale_out = float(want_out[live].abs().max())
    if float((out - want_out)[live].abs().max()) > out_tol * max(scale_out, 1.0) \
            or float((lse - want_lse)[live].abs().max()) > lse_tol:
        return "the kernel's result disagrees with the composite"
    return ""
