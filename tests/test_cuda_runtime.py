"""The CUDA runtime on a real GPU (skipped without one): exactness against eager in fp32/fp16/bf16,
the NaN-poison proof of recompute, that copies run on the side streams without blocking the host,
and a memory soak with flat device and pinned memory (2,000 steps; 10,000 with --run-slow).

Tolerances (max |compiled - eager| / max |eager| over logits, eager = reference on the same GPU):
fp32 1e-4, fp16 2e-2, bf16 6e-2. Logits are compared teacher-forced (both runs read the eager
tokens, so one near-tie cannot make the sequences diverge). Greedy tokens: fp32 free-running
runs must be identical; in fp16 and bf16 the batched recompute may round one ulp differently and
flip a near-tie, so tokens must agree wherever eager's top-2 logit margin exceeds the tolerance
(times the largest |logit|), and may differ only where it does not.

Without --run-slow every model runs once in fp16 at a mixed split, plus fp32 and bf16 spot checks
(benchmarks/gpu_check.sh's selection, sized for one GPU command); --run-slow runs the full
model x dtype x ratio matrix."""
from __future__ import annotations

import time

import pytest
import torch

import kvpr_compile
from custom_models import make_cache
from helpers import CUSTOM_MODELS, hoisting_backend, max_rel_err, worst_rel_err
from kvpr_compile.models import TinyLlamaConfig, build_tiny_llama
from kvpr_compile.runtime import cuda_runtime, direct

pytestmark = pytest.mark.cuda
DEV = "cuda"
kvpr = torch.ops.kvpr
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
STEPS = 12


def build(name, dtype, batch=2):
    model, _ = CUSTOM_MODELS[name]()
    cast = {torch.float32: model.float, torch.float16: model.half, torch.bfloat16: model.bfloat16}
    model = cast[dtype]().to(DEV)    # floating tensors only: complex RoPE tables stay complex
    if name.startswith("llama"):
        return model, lambda: model.make_cache(batch, 128, device=DEV)
    return model, lambda: make_cache(model, batch, 128, dtype=dtype, device=DEV)


def prompt(batch=2, n=7, seed=3):
    return torch.randint(0, 89, (batch, n), generator=torch.Generator().manual_seed(seed)).to(DEV)


@torch.no_grad()
def decode(model, cache, steps, forced=None, poison=False, ids=None):
    """Prefill (``ids``, default ``prompt()``), then `steps` greedy steps (inputs from `forced`
    when given): (prefill, logits, tokens)."""
    first = model(prompt() if ids is None else ids, cache)
    if poison:   # let the prefill's asynchronous stores land, then overwrite every stored K/V
        torch.cuda.synchronize()
        for k, v in zip(cache.k_cpu, cache.v_cpu):
            k.fill_(float("nan"))
            v.fill_(float("nan"))
    nxt, logits, tokens = first[:, -1].argmax(-1, keepdim=True), [], []
    for i in range(steps):
        if forced is not None:
            nxt = forced[:, i:i + 1]
        tokens.append(nxt)
        out = model(nxt, cache)[:, -1]
        logits.append(out)
        nxt = out.argmax(-1, keepdim=True)
    return first, logits, torch.cat(tokens, 1)


def compiled(model, ratio, inner="eager"):
    return torch.compile(model, backend=hoisting_backend([]),   # offloaded: nothing resident
                         options={"ratio": ratio, "inner": inner, "resident_ratio": 0.0})


def tokens_agree_except_near_ties(got_logits, want_logits, tol) -> None:
    """Argmax equal wherever eager's top-2 margin exceeds ``tol * max |logit|``."""
    for got, want in zip(got_logits, want_logits):
        top2 = want.float().topk(2, dim=-1).values
        sure = (top2[:, 0] - top2[:, 1]) > tol * want.float().abs().max()
        assert torch.equal(got.argmax(-1)[sure], want.argmax(-1)[sure])


def check_close(model, new_cache, fn, dtype, poison=False):
    tol = TOL[dtype]
    ref = decode(model, new_cache(), STEPS)
    forced = decode(fn, new_cache(), STEPS, forced=ref[2], poison=poison)
    assert max_rel_err(forced[0], ref[0]) <= tol
    assert worst_rel_err(forced[1], ref[1]) <= tol
    if dtype == torch.float32:
        free = decode(fn, new_cache(), STEPS, poison=poison)
        assert torch.equal(free[2], ref[2])
    else:
        tokens_agree_except_near_ties(forced[1], ref[1], tol)


def _matrix():
    """Every model in fp16 at a mixed split, fp32 and bf16 spot checks; the rest with --run-slow."""
    quick = {(n, torch.float16, 0.37) for n in CUSTOM_MODELS} | {
        ("llama-mha", torch.float32, 0.0), ("llama-mha", torch.float32, 1.0),
        ("llama-gqa", torch.bfloat16, 1.0), ("complex-rope", torch.bfloat16, 0.37)}
    return [pytest.param(n, d, r, marks=() if (n, d, r) in quick else pytest.mark.slow,
                         id=f"{n}-{str(d).removeprefix('torch.')}-{r}")
            for n in sorted(CUSTOM_MODELS) for d in (torch.float32, torch.float16, torch.bfloat16)
            for r in (0.0, 0.37, 1.0)]


@pytest.mark.parametrize("name,dtype,ratio", _matrix())
def test_compiled_matches_eager_on_cuda(name, dtype, ratio):
    model, new_cache = build(name, dtype)
    check_close(model, new_cache, compiled(model, ratio), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backend_by_name_on_cuda(dtype):
    model, new_cache = build("llama-gqa", dtype)
    fn = torch.compile(model, backend="kvpr", options={"ratio": 0.5, "resident_ratio": 0.0})
    check_close(model, new_cache, fn, dtype)


@pytest.mark.parametrize("name", ["llama-mha",
                                  pytest.param("complex-rope", marks=pytest.mark.slow)])
def test_inductor_inner_on_cuda(name):   # inductor's first CUDA compile takes a while
    model, new_cache = build(name, torch.float16)
    check_close(model, new_cache, compiled(model, 0.37, inner="inductor"), torch.float16)


@pytest.mark.parametrize("name", ["llama-gqa", "fused-qkv", "complex-rope"])
def test_recompute_is_real_poisoned_kv_on_cuda(name):
    model, new_cache = build(name, torch.float16)
    check_close(model, new_cache, compiled(model, 1.0), torch.float16, poison=True)
    torch._dynamo.reset()
    bad = decode(compiled(model, 0.0), new_cache(), 3, poison=True)
    assert torch.isnan(bad[1][0]).all()


@pytest.mark.parametrize("ratio,poison", [(0.37, False), (1.0, True)], ids=["0.37", "1.0-poisoned"])
def test_throughput_schedule_with_streamed_weights_on_cuda(ratio, poison):
    """Batch 3 in micro-batches [2, 1], column order, layer weights streamed from pinned memory
    through two device slots, per-micro-batch stores sharing one cache-slot pool."""
    from kvpr_compile.runtime.weight_stream import stream_weights
    model, new_cache = build("llama-mha", torch.float16, batch=3)
    ids = prompt(batch=3, n=6)   # n differs from the batch: Dynamo would share their symbol
    ref = decode(model, new_cache(), STEPS, ids=ids)
    stream_weights(model)
    fn = torch.compile(model, backend="kvpr", dynamic=True,
                       options={"schedule": "throughput", "micro_batches": 2, "ratio": ratio})
    got = decode(fn, new_cache(), STEPS, forced=ref[2], poison=poison, ids=ids)
    report = kvpr_compile.last_report()
    assert report.schedule == "throughput" and list(report.micro_batches) == [2, 1], str(report)
    assert max_rel_err(got[0], ref[0]) <= TOL[torch.float16]
    assert worst_rel_err(got[1], ref[1]) <= TOL[torch.float16]
    tokens_agree_except_near_ties(got[1], ref[1], TOL[torch.float16])


def test_eager_prefill_then_compiled_decode_on_cuda():
    """Positions written by the uncompiled path (no X): the assemble fallback reads stored K/V."""
    model, new_cache = build("llama-mha", torch.float16)
    ref = decode(model, new_cache(), STEPS)
    cache, fn = new_cache(), compiled(model, 1.0)
    with torch.no_grad():
        model(prompt(), cache)
        logits = [fn(ref[2][:, i:i + 1], cache)[:, -1] for i in range(STEPS)]
    assert worst_rel_err(logits, ref[1]) <= TOL[torch.float16]


def test_streams_slots_and_views():
    model, new_cache = build("llama-mha", torch.float16)
    cache = new_cache()
    decode(compiled(model, 0.5), cache, 3)
    rt = cuda_runtime.runtime(cache._store, DEV)
    current = torch.cuda.current_stream()
    assert rt.h2d != current and rt.d2h != current and rt.h2d != rt.d2h
    assert len(rt.slots.slots) == 2 and not rt.slots.held      # double buffered, all released
    assert all(k.is_pinned() and v.is_pinned() for k, v in zip(cache.k_cpu, cache.v_cpu))
    assert all(t.is_pinned() for layer in cache._store.tokens for t in layer)


def _big_cache(seq=16384):
    from kvpr_compile import OffloadedKVCache
    return OffloadedKVCache(num_layers=2, batch_size=4, max_seq_len=seq, num_kv_heads=8,
                            head_dim=128, dtype=torch.float16, device=DEV)


def test_load_is_asynchronous_and_wait_orders_compute():
    cache, n = _big_cache(), 16384                               # 2 x 128 MiB per layer
    for t in (*cache.k_cpu, *cache.v_cpu):
        t.copy_(torch.randn(t.shape).half())
    handle, shape = cache.handle, (4, 8, 128, torch.float16, torch.device(DEV))
    k, v = kvpr.load_kv(handle, 0, 0, n, *shape)                # warm-up: allocates the slot
    torch.cuda.synchronize()
    rt = cuda_runtime.runtime(cache._store, DEV)
    start = time.perf_counter()
    k, v = kvpr.load_kv(handle, 0, 0, n, *shape)                # reuses the slot
    host_s = time.perf_counter() - start
    assert not rt.h2d.query()                                    # still copying, on the side stream
    assert torch.cuda.current_stream().query()                   # the compute stream is idle
    kvpr.wait([k, v])
    tail = k[:, :, -64:].cpu()                                   # ordered after the copy by wait
    squares = (v.float() ** 2).sum()
    assert torch.equal(tail, cache.k_cpu[0][-64:].permute(1, 2, 0, 3))
    assert torch.allclose(squares.cpu(), (cache.v_cpu[0].float() ** 2).sum(), rtol=1e-3)
    assert host_s < 0.05


def test_store_is_asynchronous():
    cache, n = _big_cache(), 8192
    k, v = (torch.randn(4, 8, n, 128, dtype=torch.float16, device=DEV) for _ in range(2))
    x = torch.randn(4, n, 1024, dtype=torch.float16, device=DEV)
    kvpr.store_tokens(cache.handle, 1, 0, k[:, :, :1], v[:, :, :1], [x[:, :1]], [1])  # allocates
    torch.cuda.synchronize()                                                   # the X store
    direct.stream_store(cache._store, 1, 1, k, v, [x], [1])   # what eager graphs run: no staging
    rt = cuda_runtime.runtime(cache._store, DEV)
    assert not rt.d2h.query() and torch.cuda.current_stream().query()
    assert rt.in_flight                                     # sources held until the copy is done
    torch.cuda.synchronize()
    assert torch.equal(cache.k_cpu[1][1:n + 1], k.permute(2, 0, 1, 3).cpu())
    assert torch.equal(cache._store.tokens[1][0][1:n + 1, :, 0], x.transpose(0, 1).cpu())
    assert cache._store.token_len[1] == n + 1


def test_staged_store_survives_its_sources_being_overwritten():
    """The custom op (what inductor's code calls) copies the sources into runtime-owned buffers
    first: writing them right after the call, as inductor's buffer reuse does, cannot reach the
    store even though the D2H copy is still running."""
    cache, n = _big_cache(), 8192
    k, v = (torch.randn(4, 8, n, 128, dtype=torch.float16, device=DEV) for _ in range(2))
    x = torch.randn(4, n, 1024, dtype=torch.float16, device=DEV)
    kvpr.store_tokens(cache.handle, 1, 0, k[:, :, :1], v[:, :, :1], [x[:, :1]], [1])  # allocates
    torch.cuda.synchronize()
    want_k, want_x = k.clone(), x.clone()
    kvpr.store_tokens(cache.handle, 1, 1, k, v, [x], [1])
    k.fill_(float("nan"))
    x.fill_(float("nan"))
    torch.cuda.synchronize()
    assert torch.equal(cache.k_cpu[1][1:n + 1], want_k.permute(2, 0, 1, 3).cpu())
    assert torch.equal(cache._store.tokens[1][0][1:n + 1, :, 0], want_x.transpose(0, 1).cpu())


def _pinned_bytes() -> int:
    stats = torch.cuda.host_memory_stats()
    return max(stats.get("allocated_bytes.current", 0), stats.get("reserved_bytes.current", 0))


@pytest.mark.parametrize("steps", [2_000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_soak_memory_flat_over_many_decode_steps(steps):
    cfg = TinyLlamaConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=96, max_seq_len=64)
    model = build_tiny_llama(cfg, seed=5, dtype=torch.float16, device=DEV)
    cache = model.make_cache(2, 64, device=DEV)
    fn = compiled(model, 0.5)
    start = torch.randint(0, 97, (2, 4), device=DEV)
    nxt, marks = None, {}
    with torch.no_grad():
        for step in range(steps):
            if nxt is None or cache.seq_len(0) >= cache.max_seq_len - 1:   # rolling reset
                cache.reset()
                nxt = fn(start, cache)[:, -1:].argmax(-1)
            nxt = fn(nxt, cache)[:, -1:].argmax(-1)
            if step in (steps // 10, steps - 1):
                torch.cuda.synchronize()
                marks[step] = (torch.cuda.memory_allocated(), _pinned_bytes())
    rt = cuda_runtime.runtime(cache._store, DEV)
    # device: flat up to the few KiB of new-token tensors held for in-flight stores (a leak of
    # 512 B per step would add 0.9 MB over 1,800 steps, 4.6 MB over 9,000); pinned: flat
    first, last = marks[steps // 10], marks[steps - 1]
    assert last[0] <= first[0] + (256 << 10 if steps <= 2_000 else 1 << 20)
    assert 0 < last[1] == first[1]
    assert len(rt.slots.slots) == 2 and len(rt.in_flight) < 64


@pytest.mark.parametrize("name,dtype", [("llama-gqa", torch.float16), ("llama-mha", torch.float32),
                                        ("complex-rope", torch.float16)])
def test_cpu_attention_on_cuda(name, dtype):
    """Half of each layer's past attended by the CPU worker from the pinned store, merged on the
    device (runtime/cpu_attention.py), next to a recompute ratio."""
    model, new_cache = build(name, dtype)
    fn = torch.compile(model, backend=hoisting_backend([]),
                       options={"ratio": 0.25, "cpu_ratio": 0.5, "resident_ratio": 0.0})
    check_close(model, new_cache, fn, dtype)
    layers = kvpr_compile.last_report().layers
    assert all(e.cpu == 0.5 for e in layers)
    # an SDPA layer's device part is the GPU's fused kernel (its probe passed on this card)
    assert all("device part: fused kernel" in e.note for e in layers
               if name.startswith("llama") or "device part" in e.note), layers[0].note


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("heads,kv_heads,n,keys,mask", [
    (32, 8, 1, 1000, "left-padded"),   # Llama-3-like GQA decode, keys no multiple of 8
    (32, 8, 1, 1024, "keep"),          # the device part's own mask where the model has none
    (8, 8, 3, 77, "additive-per-head"),
])
def test_fused_device_kernel_matches_the_composite_on_cuda(dtype, heads, kv_heads, n, keys,
                                                           mask):
    """ops.fused_attention on the GPU (the memory-efficient kernel with its LSE) against the
    float32 composite on the same rounded inputs, at decode shapes."""
    from kvpr_compile.ops import fused_attention as fa
    from kvpr_compile.ops.device_kernel import device_kernel
    from kvpr_compile.ops.attention import partial_attention
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, heads, n, 128, generator=g).to(dtype).to(DEV)
    k, v = (torch.randn(4, kv_heads, keys, 128, generator=g).to(dtype).to(DEV) for _ in "kv")
    if mask == "left-padded":
        m = torch.ones(4, 1, n, keys, dtype=torch.bool)
        m[1, ..., :300] = False
        m[2] = False                      # a row with no key at all: lse -inf
    elif mask == "keep":
        m = torch.arange(keys) < keys - 256
    else:
        m = torch.randn(4, heads, n, keys, generator=g).to(dtype)
    m = m.to(DEV)
    mask_shape = tuple(m.shape)
    assert device_kernel(q, k, v, mask_shape) == ""
    out, lse = fa.fused_attention(q, k, v, m, 0.088)
    want_out, want_lse = partial_attention(q.float(), k.float(), v.float(), m, 0.088)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    live = torch.isfinite(want_lse)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 2e-4}[dtype]
    assert torch.isfinite(out[live]).all()
    assert (out - want_out)[live].abs().max() <= tol
    assert (lse - want_lse)[live].abs().max() <= 2e-4
