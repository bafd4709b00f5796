"""One compiled model for every batch size, prompt length and cache capacity.

The cache's geometry is checked inside the kvpr ops at run time, never read while Dynamo traces,
so no guard ties a graph to a cache's batch size or max_seq_len. After warm-up (Dynamo's first
static graph, then dynamic prefill and decode graphs for batch 1 and for batch >= 2: Dynamo
always specializes a size of 1) new shapes and new caches compile nothing. Every step runs the
rewritten graph: with the stored K/V poisoned after prefill, ratio 1.0 must still match eager.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import kvpr_compile
from kvpr_compile import report as report_mod
from kvpr_compile.models import TinyLlamaConfig, build_tiny_llama
from helpers import hf_llama, max_rel_err, worst_rel_err

TOL = 1e-5
STEPS = 3
WARM_UP = [(1, 5), (2, 7), (1, 9)]
SHAPES = [(3, 4), (4, 6), (2, 12), (5, 3), (3, 8), (1, 16), (2, 5), (6, 7), (1, 3), (4, 11)]
MAX_GRAPHS = 5   # static first prefill; dynamic prefill + decode for batch 1 and for batch >= 2


@pytest.fixture(autouse=True)
def fresh_warnings():
    report_mod._WARNED.clear()


def _model():
    cfg = TinyLlamaConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=48, max_seq_len=64)
    return build_tiny_llama(cfg, seed=1)


def _prompt(batch, length):
    seed = batch * 100 + length
    return torch.randint(0, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _decode(model, prompt, cache, steps=STEPS, poison=False):
    logits = [model(prompt, cache)[:, -1]]
    if poison:
        for t in cache.k_cpu + cache.v_cpu:
            t.fill_(float("nan"))
    for _ in range(steps):
        logits.append(model(logits[-1].argmax(-1, keepdim=True), cache)[:, -1])
    return logits


def _limit_warnings(caught):
    return [w for w in caught if "stopped compiling" in str(w.message)]


def test_one_compiled_model_serves_every_shape_and_cache_without_recompiling():
    model = _model()
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 1.0})
    first = len(kvpr_compile.reports())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (batch, length) in enumerate(WARM_UP + SHAPES):
            if i == len(WARM_UP):
                warmed = len(kvpr_compile.reports())
            prompt = _prompt(batch, length)
            capacity = length + STEPS + i % 3          # every cache its own max_seq_len
            ref = _decode(model, prompt, model.make_cache(batch, capacity))
            out = _decode(compiled, prompt, model.make_cache(batch, capacity), poison=True)
            assert max_rel_err(out[0], ref[0]) <= TOL, (batch, length)
            assert worst_rel_err(out[1:], ref[1:]) <= TOL, (batch, length)   # NaN K/V never read
    graphs = kvpr_compile.reports()[first:]
    assert len(kvpr_compile.reports()) == warmed, "a new shape or cache recompiled"
    assert len(graphs) <= MAX_GRAPHS
    assert all(not r.skipped and r.ratios == {0: 1.0, 1: 1.0} for r in graphs
               if not any(e.note.startswith("multi-token") for e in r.layers))
    assert not _limit_warnings(caught)


def test_decode_keeps_one_graph_for_every_position():
    model = _model()
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.5})
    first = len(kvpr_compile.reports())
    prompt = _prompt(2, 5)
    ref = _decode(model, prompt, model.make_cache(2, 48), steps=40)
    out = _decode(compiled, prompt, model.make_cache(2, 48), steps=40)
    assert worst_rel_err(out, ref) <= TOL
    assert len(kvpr_compile.reports()) - first == 2   # prefill, decode


def test_recompile_limit_is_reported_once_in_words():
    model = _model()
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 1.0})
    with torch._dynamo.config.patch(recompile_limit=2), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch, length in [(1, 5), (2, 7), (3, 4), (1, 9)]:   # needs more than 2 graphs
            prompt = _prompt(batch, length)
            ref = _decode(model, prompt, model.make_cache(batch, 32), steps=1)
            out = _decode(compiled, prompt, model.make_cache(batch, 32), steps=1)
            assert worst_rel_err(out, ref) <= TOL     # the uncompiled fallback is still exact
    told = _limit_warnings(caught)
    assert len(told) == 1
    text = str(told[0].message)
    assert "UNCOMPILED" in text and "recompile_limit" in text and "forward" in text


def _snapshot(cache):
    store = cache._store
    # stored X rows past token_len are never-written memory: compare the valid rows only
    tensors = cache.k_cpu + cache.v_cpu + [t[:store.token_len[i]]
                                           for i, layer in enumerate(store.tokens) for t in layer]
    return ([t.clone() for t in tensors], [cache.seq_len(i) for i in range(cache.num_layers)],
            list(store.token_len), store.handle.clone())


def _intact(cache, before):
    after = _snapshot(cache)
    return (after[1:3] == before[1:3] and torch.equal(after[3], before[3])
            and len(after[0]) == len(before[0])
            and all(torch.equal(a, b) for a, b in zip(after[0], before[0])))


def _cache(model, batch=2, max_seq_len=16, **kw):
    cfg = model.cfg
    args = dict(num_layers=cfg.num_layers, batch_size=batch, max_seq_len=max_seq_len,
                num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    args.update(kw)
    return kvpr_compile.OffloadedKVCache(**args)


BAD_CACHES = {   # (cache arguments, prompt batch, error, message)
    "too short": (dict(max_seq_len=4), 2, ValueError, r"more exceed max_seq_len=[46]"),
    "fewer kv heads": (dict(num_kv_heads=1), 2, ValueError, "num_kv_heads=1"),
    "other head_dim": (dict(head_dim=4), 2, ValueError, "head_dim=4"),
    "batch larger than the cache's": (dict(batch=2), 3, ValueError, "batch=2"),
    "batch smaller than the cache's": (dict(batch=3), 2, ValueError, "batch=3"),
    "other dtype": (dict(dtype=torch.float64), 2, TypeError,
                    "dtype torch.float32, cache holds torch.float64"),
    "other device": (dict(device="meta"), 2, ValueError, "is on cpu, cache computes on meta"),
}




def test_bad_caches_are_clear_errors_under_compilation_and_stay_intact():
    """Every bad cache raises from the kvpr ops at run time, before any write, at prefill and at
    a decode step; no graph is compiled for any of them (no guard looks at the cache)."""
    model = _model()
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.5})
    for batch, length in [(2, 5), (3, 6)]:   # dynamic prefill and decode graphs for batch >= 2
        _decode(compiled, _prompt(batch, length), model.make_cache(batch, 16), steps=2)
    graphs = len(kvpr_compile.reports())
    for case, (kwargs, batch, err, match) in sorted(BAD_CACHES.items()):
        steps = [("prefill", _cache(model, **kwargs), 5)]
        if "batch" in case or case == "too short":   # also fail at a step after a good prefill
            short = {"max_seq_len": 6} if case == "too short" else {}
            cache = _cache(model, **{**kwargs, **short})
            with torch.no_grad():
                compiled(_prompt(cache.batch_size, 6), cache)
            steps.append(("decode", cache, 1))
        for phase, cache, n in steps:
            before = _snapshot(cache)
            with pytest.raises(err, match=match), torch.no_grad():
                compiled(_prompt(batch, n), cache)
            assert _intact(cache, before), (case, phase)
    assert len(kvpr_compile.reports()) == graphs   # checked at run time, not by a guard
    # A cache with fewer layers than the model: a clear error naming the layer. As uncompiled,
    # the layers before the missing one have been written by then (nothing knows the model's
    # layer count before it asks for the missing layer).
    with pytest.raises(IndexError, match="layer 1 out of range"), torch.no_grad():
        compiled(_prompt(2, 5), _cache(model, num_layers=1))


def test_hf_generate_serves_every_shape_without_recompiling():
    """Through ``generate()``: each (batch, prompt) with its own KVPRCache sized prompt + new;
    the stored K/V are poisoned right after prefill (by a logits processor, which runs between
    the prefill and the first decode forward), so ratio 1.0 only matches if every step ran the
    rewritten graph."""
    transformers = pytest.importorskip("transformers")
    from kvpr_compile.hf import KVPRCache, cache_kwargs

    model = hf_llama(hidden=32, kv_heads=2, vocab=97)
    new = 3

    class PoisonAfterPrefill(transformers.LogitsProcessor):
        def __init__(self, cache):
            self.cache, self.done = cache, False

        def __call__(self, input_ids, scores):
            if not self.done:
                for t in self.cache.offloaded.k_cpu + self.cache.offloaded.v_cpu:
                    t.fill_(float("nan"))
                self.done = True
            return scores

    def run(batch, length, poison):
        seed = batch * 31 + length
        ids = torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
        cache = KVPRCache(model.config, batch, length + new)
        procs = transformers.LogitsProcessorList([PoisonAfterPrefill(cache)] if poison else [])
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  do_sample=False, output_logits=True, return_dict_in_generate=True,
                                  **cache_kwargs(model, cache), logits_processor=procs)

    shapes = WARM_UP + SHAPES[:7]   # ten combinations
    refs = [run(b, n, poison=False) for b, n in shapes]
    model.forward = torch.compile(model.forward, backend="kvpr", options={"ratio": 1.0})
    first = len(kvpr_compile.reports())
    for i, ((b, n), ref) in enumerate(zip(shapes, refs)):
        if i == len(WARM_UP):
            warmed = len(kvpr_compile.reports())
        out = run(b, n, poison=True)
        assert worst_rel_err(out.logits, ref.logits) <= TOL, (b, n)
        assert torch.equal(out.sequences, ref.sequences)
    assert len(kvpr_compile.reports()) == warmed and warmed - first <= MAX_GRAPHS
