"""Cross-call prefetch (``config.prefetch_next_call``, runtime/next_call.py): the first
layer's loads of the next call are issued after this call's last assemble, on simulated streams.

Decode steps are exact against eager and race-free, and the prefetched loads are really used
(every decode step's first-layer loads, counted by the runtime). A prefetch the next call must
not use is dropped, with results still equal to eager: the store's K/V rewritten between calls
(same ranges, other values), a reset and another prompt of the same length written uncompiled,
and graphs of another ratio asking other ranges."""
from __future__ import annotations

import pytest
import torch

from helpers import (check_race_free, compiled_run, decode_seeded, hf_llama, sim_backend,
                     tiny_llama, worst_rel_err)
from kvpr_compile import config
from kvpr_compile.runtime import cuda_runtime

TOL = 1e-5
STEPS = 3


def runtime_of(cache):
    return cuda_runtime.runtime(cache._store, "cpu")


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_every_decode_step_uses_the_loads_prefetched_by_the_call_before(sim, ratio):
    """Each step's prefetch serves the next step's first layer: X and K,V[l:] (K,V only at
    ratio 0); exact, race-free, no slot beyond the two. The prefill recomputes nothing (an empty
    past), so it prefetches K,V only: used by the first step at ratio 0, dropped otherwise."""
    model = tiny_llama(layers=2)
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    api = sim()
    compiled = torch.compile(model, backend=sim_backend(), options={"ratio": ratio})
    cache = model.make_cache(2, 96)
    check_race_free(api, ref, decode_seeded(model, cache, STEPS, compiled))
    rt = runtime_of(cache)
    if ratio == 0.0:
        assert rt.next_call_used == STEPS and rt.next_call_dropped == 0
    else:
        assert rt.next_call_used == 2 * (STEPS - 1) and rt.next_call_dropped == 1
    assert len(rt.slots.slots) == 2


@pytest.mark.slow
@config.patch(prefetch_next_call=False)
def test_off_loads_at_the_start_of_each_call(sim):
    api, cache, ref, out = compiled_run(sim, 0.5, steps=3)
    check_race_free(api, ref, out)
    rt = runtime_of(cache)
    assert rt.next_call_used == 0 and rt.slots.next_call is None and not rt.slots.held


def _rewrite_layer0(cache, past: int) -> None:
    """Other (finite) values for layer 0's stored K,V[:past], the same in every run."""
    g = torch.Generator().manual_seed(5)
    for t in (cache.k_cpu[0], cache.v_cpu[0]):
        t[:past] = torch.randn(t[:past].shape, generator=g)


@torch.no_grad()
def _steps(run, cache, nxt, steps):
    logits = []
    for _ in range(steps):
        out = run(nxt, cache)[:, -1]
        logits.append(out)
        nxt = out.argmax(-1, keepdim=True)
    return logits, nxt


def test_store_rewritten_between_calls_is_loaded_again(sim):
    """Ratio 0 (layer 0 reads its stored K,V): between two steps layer 0's K,V are rewritten
    through ``k_cpu``; the next step asks the prefetched ranges, but the store changed: the
    prefetch is dropped and the step reads the new values, like eager."""
    model = tiny_llama(layers=2)
    results = []
    for compiled in (False, True):
        api = sim() if compiled else None
        run = torch.compile(model, backend=sim_backend(),
                            options={"ratio": 0.0}) if compiled else model
        cache = model.make_cache(2, 96)
        ref_logits, tokens = decode_seeded(model, cache, 2, run if compiled else None)
        _rewrite_layer0(cache, cache.seq_len(0))
        logits, _ = _steps(run, cache, ref_logits[-1].argmax(-1, keepdim=True), 3)
        results.append(logits)
    assert worst_rel_err(results[1], results[0]) <= TOL
    assert api.races.found == []
    rt = runtime_of(cache)
    assert rt.next_call_dropped == 1 and rt.next_call_used == 2 + 2   # all but the rewritten one


def test_reset_and_a_same_length_prompt_written_uncompiled_drop_the_prefetch(sim):
    """After compiled steps the cache is reset and another prompt, as long as the cached one,
    is prefilled by the uncompiled model: the next compiled step asks exactly the ranges that
    were prefetched, from a store that now holds other tokens."""
    model = tiny_llama(layers=2)
    other = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(23))
    results = []
    for compiled in (False, True):
        api = sim() if compiled else None
        run = torch.compile(model, backend=sim_backend(),
                            options={"ratio": 0.5}) if compiled else model
        cache = model.make_cache(2, 96)
        decode_seeded(model, cache, 2, run if compiled else None)   # 6 + 2 tokens
        cache.reset()
        with torch.no_grad():
            nxt = model(other, cache)[:, -1].argmax(-1, keepdim=True)
        results.append(_steps(run, cache, nxt, 3)[0])
    assert worst_rel_err(results[1], results[0]) <= TOL
    assert api.races.found == []
    rt = runtime_of(cache)
    # dropped: the prefill's (K,V only) and the one pending when the uncompiled prefill wrote
    assert rt.next_call_dropped == 2 and rt.next_call_used == 2 * (1 + 2)


def test_graphs_of_another_ratio_drop_the_prefetch(sim):
    """Steps alternate between graphs compiled at ratios 0.5 and 0: each prefetch asks for the
    ranges of the graph that issued it, the next call asks others; exact and race-free (the
    dropped copies are waited for before their slot is reused)."""
    model = tiny_llama(layers=2)
    cache_ref = model.make_cache(2, 96)
    with torch.no_grad():
        nxt = model(torch.arange(1, 13).view(2, 6), cache_ref)[:, -1].argmax(-1, keepdim=True)
    ref, _ = _steps(model, cache_ref, nxt, 4)
    api = sim()
    half, zero = (torch.compile(model, backend=sim_backend(), options={"ratio": r})
                  for r in (0.5, 0.0))
    cache = model.make_cache(2, 96)
    out = []
    with torch.no_grad():
        nxt = half(torch.arange(1, 13).view(2, 6), cache)[:, -1].argmax(-1, keepdim=True)
        for step in range(4):
            logits = (zero if step % 2 == 0 else half)(nxt, cache)[:, -1]
            out.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
    assert worst_rel_err(out, ref) <= TOL
    assert api.races.accesses > 100 and api.races.found == []
    rt = runtime_of(cache)
    # the prefill's K,V-only prefetch fits the ratio-0 step; every other one is dropped
    assert rt.next_call_used == 1 and rt.next_call_dropped == 3


def test_hf_llama_generate_uses_the_prefetch(sim):
    """A tiny HF Llama generating through KVPRCache with backend="kvpr": every step after the
    first compiled decode graph uses the prefetched loads; tokens and logits equal eager."""
    pytest.importorskip("transformers")
    from kvpr_compile.hf import KVPRCache, cache_kwargs
    model = hf_llama()
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))

    def generate():
        cache = KVPRCache(model.config, ids.shape[0], 64)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 **cache_kwargs(model, cache))
        return out, cache
    ref, _ = generate()
    api = sim()
    model.forward = torch.compile(model.forward, backend="kvpr", options={"ratio": 0.5})
    out, cache = generate()
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    assert api.races.accesses > 100 and api.races.found == []
    rt = cuda_runtime.runtime(cache.offloaded._store, "cpu")
    assert rt.next_call_used >= 2 * 2   # X and K,V of layer 0 in (at least) steps 2..3


def test_piecewise_inner_keeps_the_prefetch_step(sim):
    """``inner="piecewise"`` runs the lowered graph split at the kvpr steps: the prefetch step,
    which returns nothing, must still run there (a piece with no output is not dropped)."""
    model = tiny_llama(layers=2)
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    api = sim()
    compiled = torch.compile(model, backend=sim_backend(),
                             options={"ratio": 1.0, "inner": "piecewise"})
    cache = model.make_cache(2, 96)
    check_race_free(api, ref, decode_seeded(model, cache, STEPS, compiled))
    assert runtime_of(cache).next_call_used == 2 * (STEPS - 1)
