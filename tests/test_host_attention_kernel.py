"""The CPU part's kernel on half-precision host K,V (``ops.attention.host_partial_attention``):
torch's fused CPU attention with the GQA group's heads as query rows. It must give what the
float32 composite gives (to the dtype's rounding of the probabilities), an exact -inf
log-sum-exp for a row whose mask allows no key, and an exact merge with a device part; it must
really be the fused kernel where it applies, and the composite elsewhere."""
from __future__ import annotations

import pytest
import torch

from kvpr_compile.ops import attention, fused_attention
from kvpr_compile.ops.attention import host_partial_attention, merge_partials, partial_attention

pytestmark = pytest.mark.quick

# the probabilities are rounded to the dtype before P V (as a GPU's fused kernel does)
OUT_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
LSE_TOL = 2e-4


def _inputs(dtype, heads, kv_heads, n, keys, mask, mask_heads, seed=0):
    """q (2, heads, n, 16) and K,V as views of token-major store rows (keys, 2, kv_heads, 16);
    row 0's first query allows no key."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, n, 16, generator=g).to(dtype)
    k, v = (torch.randn(keys, 2, kv_heads, 16, generator=g).to(dtype).permute(1, 2, 0, 3)
            for _ in range(2))
    m = None
    if mask != "none" and mask_heads == "2d":   # (n, keys), broadcast over rows and heads
        m = torch.rand(n, keys, generator=g) > 0.3
        m[-1] = n == 1                             # the last query allows no key (n > 1)
    elif mask != "none":
        m = torch.rand(2, mask_heads, n, keys, generator=g) > 0.3
        m[0, :, 0] = False
        if mask == "additive":
            m = torch.zeros(m.shape).masked_fill(~m, float("-inf"))
    return q, k, v, m


def _assert_matches_float32(got, q, k, v, m, dtype):
    out, lse = got
    ref_out, ref_lse = partial_attention(q.float(), k.float(), v.float(), m, 0.25)
    assert out.dtype == lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    live = torch.isfinite(ref_lse)
    assert torch.isfinite(lse[live]).all() and torch.isfinite(out[live]).all()
    assert (out - ref_out)[live].abs().max() <= OUT_TOL[dtype]
    assert (lse - ref_lse)[live].abs().max() <= LSE_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("mask,mask_heads", [("none", 1), ("bool", 1), ("bool", "all"),
                                             ("bool", "2d"), ("additive", 1),
                                             ("additive", "all")])
def test_fused_kernel_gives_the_float32_attention(monkeypatch, dtype, heads, kv_heads, n, mask,
                                                  mask_heads):
    calls = []
    fused = fused_attention.KERNELS["cpu"]
    monkeypatch.setitem(fused_attention.KERNELS, "cpu",
                        lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    q, k, v, m = _inputs(dtype, heads, kv_heads, n, 24, mask,
                         heads if mask_heads == "all" else mask_heads)
    _assert_matches_float32(host_partial_attention(q, k, v, m, 0.25), q, k, v, m, dtype)
    assert calls, "the fused kernel was not used"
    lse = host_partial_attention(q, k, v, m, 0.25)[1]
    if mask_heads == "2d":
        assert torch.isneginf(lse[..., -1]).all() == (n > 1) and torch.isfinite(lse[..., 0]).all()
    elif m is not None:   # row 0's first query allows no key
        assert torch.isneginf(lse[0, :, 0]).all() and torch.isfinite(lse[1]).all()


def test_merge_of_a_float32_device_part_and_a_fused_host_part():
    """Keys [0, 10) on the host (fused, fp16), [10, 24) on the device (float32 composite): the
    merge is the attention over all keys, also where the host part allows no key."""
    q, k, v, m = _inputs(torch.float16, 8, 2, 1, 24, "bool", 1, seed=1)
    m[1, :, :, :10] = False                    # row 1: the host part has no key at all
    host = host_partial_attention(q, k[:, :, :10], v[:, :, :10], m[..., :10], 0.25)
    assert torch.isneginf(host[1][1]).all()
    dev = partial_attention(q.float(), k[:, :, 10:].float(), v[:, :, 10:].float(), m[..., 10:],
                            0.25)
    merged = merge_partials(*host, *dev, torch.float32)
    full = partial_attention(q.float(), k.float(), v.float(), m, 0.25)[0]
    live = m.any(-1).expand(2, 8, 1)
    assert torch.isfinite(merged[live]).all()
    assert (merged - full)[live].abs().max() <= OUT_TOL[torch.float16]


@pytest.mark.parametrize("mask", ["none", "bool"])
def test_an_empty_key_range_has_no_weight(monkeypatch, mask):
    """No key at all (a CPU share of 0 positions): the composite's lse = -inf and out 0; the
    fused kernel is not called (it kills the process with a floating-point exception)."""
    def fused(*args, **kwargs):
        raise AssertionError("the fused kernel was handed an empty key range")
    monkeypatch.setitem(fused_attention.KERNELS, "cpu", fused)
    monkeypatch.setattr(attention, "_fused_state", [True])
    q = torch.randn(2, 4, 1, 16).half()
    k = torch.zeros(2, 2, 0, 16).half()
    m = torch.ones(2, 1, 1, 0, dtype=torch.bool) if mask == "bool" else None
    out, lse = host_partial_attention(q, k, k, m, 0.25)
    assert torch.isneginf(lse).all() and torch.equal(out, torch.zeros(2, 4, 1, 16))


def test_a_float32_mask_that_overflows_the_query_dtype_leaves_no_weight():
    """An fp16 query with an additive float32 mask at float32's minimum: in fp16 the masked
    entries are -inf, so a row masked everywhere has lse = -inf (weight 0 in the merge), where
    the float32 composite gives it a weight of e^(-3.4e38), also 0."""
    q, k, v, _ = _inputs(torch.float16, 8, 2, 1, 12, "none", 1)
    m = torch.zeros(2, 1, 1, 12)
    m[0] = torch.finfo(torch.float32).min
    out, lse = host_partial_attention(q, k, v, m, 0.25)
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()
    dev = partial_attention(q.float(), k.float(), v.float(), None, 0.25)
    merged = merge_partials(out, lse, *dev, torch.float32)
    assert (merged[0] - dev[0][0]).abs().max() <= 1e-6   # the host part weighs nothing


@pytest.mark.parametrize("case", ["float32", "per-score ops", "five-dim mask",
                                  "no kernel in this torch"])
def test_the_composite_runs_where_the_fused_kernel_does_not_apply(monkeypatch, case):
    def fused(*args, **kwargs):
        raise AssertionError("the fused kernel was called")
    if case == "no kernel in this torch":
        monkeypatch.setitem(fused_attention.KERNELS, "cpu", None)
        monkeypatch.setattr(attention, "_fused_state", [])   # probed again: absent
    else:
        monkeypatch.setitem(fused_attention.KERNELS, "cpu", fused)
        monkeypatch.setattr(attention, "_fused_state", [True])
    dtype = torch.float32 if case == "float32" else torch.float16
    q, k, v, m = _inputs(dtype, 8, 2, 1, 12, "bool", 1)
    if case == "five-dim mask":   # broadcasts against the scores, but not the fused layout
        m = m[None]
    scores_of = (lambda s: torch.tanh(s / 2) * 2) if case == "per-score ops" else None
    got = host_partial_attention(q, k, v, m, 0.25, scores_of)
    want = partial_attention(q, k, v, m, 0.25, scores_of)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_bf16_decoder_attends_half_its_past_with_the_fused_kernel(monkeypatch):
    """End to end in bf16 on the CPU path: the built-in Llama (GQA 4:2) at cpu_ratio 0.5
    against the same model uncompiled, to bf16's rounding, with the fused kernel doing the CPU
    part of every layer."""
    import kvpr_compile
    from helpers import decode_seeded, tiny_llama, worst_rel_err
    calls = []
    fused = fused_attention.KERNELS["cpu"]
    monkeypatch.setitem(fused_attention.KERNELS, "cpu",
                        lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    model = tiny_llama(layers=2, kv_heads=2).to(torch.bfloat16)
    ref = decode_seeded(model, model.make_cache(2, 96), 4)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.0, "cpu_ratio": 0.5})
    out = decode_seeded(model, model.make_cache(2, 96), 4, compiled)
    assert all(e.cpu == 0.5 for e in kvpr_compile.last_report().layers)
    assert worst_rel_err(out[0], ref[0]) <= 3e-2
    assert len(calls) >= 2 * 4   # every layer of every decode step
