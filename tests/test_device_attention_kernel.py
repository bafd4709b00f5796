"""The device part of a split attention by a fused kernel (``ops.fused_attention``): the CUDA
kernel's conventions met by the wrapper (checked here against a stand-in that enforces them and
computes in float32; tests/test_cuda_runtime.py runs the real kernel on a GPU), the choice made
before the rewrite (``ops.device_kernel``: dtypes, mask heads, a probe that can refuse), and a
decoder whose device part runs the fused kernel in its graph or, where the probe refused, the
float32 composite, exact to its dtype either way."""
from __future__ import annotations

import warnings

import pytest
import torch

import kvpr_compile
from helpers import decode_seeded, tiny_llama, worst_rel_err
from kvpr_compile.ops import device_kernel as dk
from kvpr_compile.ops import fused_attention as fa
from kvpr_compile.ops.attention import partial_attention

pytestmark = pytest.mark.quick
SCALE = 0.3


def stand_in_efficient_attention(q, k, v, bias, compute_lse, dropout_p, is_causal, *, scale):
    """What the CUDA kernel takes and gives: equal heads (no GQA), a dense last dim, a bias of
    the full (b, heads, rows, keys) shape in q's dtype whose strides are 0 or aligned to 8, and
    an LSE padded to a multiple of 32 rows (padding garbage); out laid out (b, rows, heads, d)."""
    b, heads, rows, _ = q.shape
    keys = k.shape[2]
    assert compute_lse and dropout_p == 0.0 and is_causal is False
    assert k.shape[1] == v.shape[1] == heads and k.shape[2] == v.shape[2]
    assert q.dtype == k.dtype == v.dtype
    assert all(t.stride(-1) == 1 for t in (q, k, v))
    if bias is not None:
        assert tuple(bias.shape) == (b, heads, rows, keys) and bias.dtype == q.dtype
        assert bias.stride(-1) == 1
        assert all(s == 0 or s % 8 == 0 for s in bias.stride()[:-1]), bias.stride()
    out, lse = partial_attention(q.float(), k.float(), v.float(), bias, scale)
    padded = torch.full((b, heads, -(-rows // 32) * 32), 123.0)
    padded[..., :rows] = torch.where(torch.isneginf(lse), 0.0, lse)   # as the CPU kernel says
    out = out.to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    return out, padded, torch.empty(()), torch.empty(())


def _inputs(dtype, heads, kv_heads, n, keys, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, n, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, kv_heads, keys, 16, generator=g).to(dtype) for _ in range(2))
    if mask == "none":
        return q, k, v, None
    if mask == "keep":   # the device part's own mask when the model has none: (keys,)
        m = torch.arange(keys) % 5 != 3
        return q, k, v, m
    m = torch.rand(2, heads if mask.endswith("per-head") else 1, n, keys, generator=g) > 0.3
    m[0, :, 0] = False   # row 0's first query allows no key
    if mask.startswith("additive"):
        m = torch.zeros(m.shape).masked_fill(~m, float("-inf")).to(dtype)
    return q, k, v, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("n,keys", [(1, 13), (3, 40)])
@pytest.mark.parametrize("mask", ["none", "keep", "bool", "bool-per-head", "additive"])
def test_the_cuda_wrapper_meets_the_kernels_conventions(monkeypatch, dtype, heads, kv_heads, n,
                                                        keys, mask):
    monkeypatch.setitem(fa.KERNELS, "cuda", stand_in_efficient_attention)
    q, k, v, m = _inputs(dtype, heads, kv_heads, n, keys, mask)
    out, lse = fa.grouped_call(q, k, v, m, SCALE, fa._cuda_kernel)
    want_out, want_lse = partial_attention(q.float(), k.float(), v.float(), m, SCALE)
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    live = torch.isfinite(want_lse)
    tol = 1e-6 if dtype == torch.float32 else 2e-3   # fp16: the stand-in rounds out to fp16
    assert torch.isfinite(out[live]).all()
    assert (out - want_out)[live].abs().max() <= tol
    assert (lse - want_lse)[live].abs().max() <= 1e-5


def test_the_choice_before_the_rewrite_names_why_not():
    bf16 = torch.zeros(1, 4, 1, 16, dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, 5, 16, dtype=torch.bfloat16)
    assert dk.device_kernel(bf16, kv, kv, None) == ""
    assert dk.device_kernel(bf16, kv, kv, (1, 1, 1, 5)) == ""
    assert "float32 on cpu" in dk.device_kernel(bf16.float(), kv.float(), kv.float(), None)
    assert "K,V in torch.float16" in dk.device_kernel(bf16, kv.half(), kv.half(), None)
    assert "head dim" in dk.device_kernel(bf16, kv, kv, (1, 2, 1, 5))
    assert "head dim" in dk.device_kernel(bf16, kv, kv, (1, 1, 1, 1, 5))
    meta = torch.zeros(1, 4, 1, 16, device="meta")
    assert "no fused attention kernel for meta" in dk.device_kernel(meta, meta, meta, None)


@pytest.mark.parametrize("fault", ["raises", "wrong lse", "nan"])
def test_a_probe_that_fails_keeps_the_composite_and_warns_once(monkeypatch, fault):
    monkeypatch.setattr(dk, "_PROBED", {})
    real = fa.KERNELS["cpu"]

    def faulty(q, k, v, *args, **kwargs):
        if fault == "raises":
            raise RuntimeError("no kernel image for this device")
        out, lse = real(q, k, v, *args, **kwargs)
        return (out, lse + 0.5) if fault == "wrong lse" else (out * float("nan"), lse)
    monkeypatch.setitem(fa.KERNELS, "cpu", faulty)
    q = torch.zeros(1, 4, 1, 16, dtype=torch.float16)
    kv = torch.zeros(1, 2, 5, 16, dtype=torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = dk.device_kernel(q, kv, kv, None)
        assert dk.device_kernel(q, kv, kv, None) == first   # probed once
    words = {"raises": "refused the call (RuntimeError: no kernel image",
             "wrong lse": "disagrees with the composite",
             "nan": "returned NaN or inf"}[fault]
    assert words in first
    assert [str(w.message) for w in caught if "kvpr:" in str(w.message)] == \
        [f"kvpr: the device part of split attention keeps the float32 composite on cpu "
         f"(torch.float16, head dim 16): {first}"]


def _device_parts(report):
    return [n.target for n in report.graph_module.graph.nodes
            if n.target in (fa.fused_attention, partial_attention)]


@pytest.mark.parametrize("probe", ["passes", "refuses"])
def test_a_bf16_decoders_device_part_runs_the_kernel_the_probe_allows(monkeypatch, probe):
    """The built-in Llama (GQA 4:2) in bf16 at cpu_ratio 0.5: every layer's device part is the
    fused kernel in the rewritten graph (or, where the probe refused, the composite, and the
    note says why), and the decode matches the uncompiled model to bf16's rounding with
    identical greedy tokens."""
    monkeypatch.setattr(dk, "_PROBED", {})
    if probe == "refuses":
        monkeypatch.setattr(dk, "_probe", lambda *key: "the kernel refused the call (test)")
    model = tiny_llama(layers=2, kv_heads=2).to(torch.bfloat16)
    ref = decode_seeded(model, model.make_cache(2, 96), 4)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.0, "cpu_ratio": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = decode_seeded(model, model.make_cache(2, 96), 4, compiled)
    report = kvpr_compile.last_report()
    want = fa.fused_attention if probe == "passes" else partial_attention
    assert _device_parts(report) == [want, want]
    words = "device part: fused kernel" if probe == "passes" else \
        "device part: float32 composite, the kernel refused the call (test)"
    assert all(words in e.note and e.cpu == 0.5 for e in report.layers)
    assert worst_rel_err(out[0], ref[0]) <= 3e-2
    assert torch.equal(out[1], ref[1])
