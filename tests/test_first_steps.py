"""First steps are the product's too: everything a new cache needs in memory -- its stores (host
memory: K, V, X and side inputs) and its device slots -- is made by the end of its first decode
step, so a user's steady state starts with the second one. Counted on simulated streams (the CUDA
runtime's logic on CPU) through the store's one allocation function (runtime/host_memory.py) and
the slots' buffer calls, for the cases that make stores late: records of batch 1 in the prefill
widened to the batch (RoPE tables), B equal rows narrowed to one (position_ids in the prefill
only), and the throughput schedule's micro-batch parts. Each run is also exact against eager."""
from __future__ import annotations

import pytest
import torch
from generality_models import PatternModel, make_cache
from helpers import (batch_prompt, decode_steps, hf_llama, throughput_llama, tiny_llama,
                     worst_rel_err)

from kvpr_compile.runtime import host_memory
from kvpr_compile.runtime.slots import Slot

STEPS = 4
TOL = 1e-5


def _counting(monkeypatch) -> dict:
    counts = {"store": 0, "slots": 0}
    alloc = host_memory.alloc

    def counted_alloc(*args, **kwargs):
        counts["store"] += 1
        return alloc(*args, **kwargs)
    monkeypatch.setattr(host_memory, "alloc", counted_alloc)

    def counted(method):
        def buffers(self, *args):
            out, fresh = method(self, *args)
            counts["slots"] += fresh
            return out, fresh
        return buffers
    monkeypatch.setattr(Slot, "kv_buffers", counted(Slot.kv_buffers))
    monkeypatch.setattr(Slot, "token_buffers", counted(Slot.token_buffers))
    return counts


def _per_call(counts, model):
    """Wraps ``model``: each call appends the allocations it made, (store, slots)."""
    made = []

    def call(*args, **kwargs):
        before = dict(counts)
        out = model(*args, **kwargs)
        made.append((counts["store"] - before["store"], counts["slots"] - before["slots"]))
        return out
    return call, made


CASES = {
    "tiny-llama": lambda: (tiny_llama(), lambda m, b: m.make_cache(b, 96), {"ratio": 0.5}, None),
    "position-ids-in-prefill-only": lambda: (
        _pattern(), lambda m, b: make_cache(m, b), {"ratio": 1.0}, "prefill"),
    "throughput-micro-batches": lambda: (
        throughput_llama(layers=2), lambda m, b: m.make_cache(b), {"schedule": "throughput",
                                                        "micro_batches": 2, "ratio": 0.5}, None),
}


def _pattern():
    torch.manual_seed(0)
    return PatternModel(layers=2, rope="position-ids").eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_allocation_after_the_first_decode_step(sim_api, monkeypatch, case):
    model, cache_of, options, position_ids = CASES[case]()
    prompt = batch_prompt(4, vocab=80)   # in every model's vocabulary
    want = decode_steps(model, prompt, cache_of(model, 4), STEPS, position_ids=position_ids)
    counts = _counting(monkeypatch)
    cache = cache_of(model, 4)   # its K/V buffers: made with the cache, before any call
    assert counts["store"] > 0
    dynamic = {"dynamic": True} if options.get("schedule") == "throughput" else {}
    call, made = _per_call(counts, torch.compile(model, backend="kvpr", options=options, **dynamic))
    with torch.no_grad():
        got = decode_steps(call, prompt, cache, STEPS, position_ids=position_ids)
    assert worst_rel_err(got[1], want[1]) <= TOL and torch.equal(got[2], want[2])
    assert len(made) == 1 + STEPS
    assert made[0][0] > 0                      # the prefill stores X (and side inputs)
    assert made[2:] == [(0, 0)] * (STEPS - 1), made   # nothing after the first decode step


def test_hf_llama_allocates_nothing_after_the_first_decode_step(sim_api, monkeypatch):
    from kvpr_compile.hf import KVPRCache, cache_kwargs
    model = hf_llama()
    prompt = batch_prompt(2, vocab=128)

    def run(step, cache):
        kw = cache_kwargs(model, cache)
        with torch.no_grad():
            logits = [step(prompt, **kw, use_cache=True).logits[:, -1]]
            for _ in range(STEPS):
                nxt = logits[-1].argmax(-1, keepdim=True)
                logits.append(step(nxt, **kw, use_cache=True).logits[:, -1])
        return logits

    def make():
        return KVPRCache(model.config, batch_size=2, max_seq_len=32, dtype=torch.float32,
                         device="cpu")

    want = run(model, make())
    counts = _counting(monkeypatch)
    call, made = _per_call(counts, torch.compile(model, backend="kvpr", options={"ratio": 0.5}))
    got = run(call, make())
    assert worst_rel_err(got, want) <= TOL
    assert made[0][0] > 0 and made[2:] == [(0, 0)] * (STEPS - 1), made


@pytest.mark.parametrize("copies_done", [True, False])
def test_a_collected_runtime_waits_only_for_its_own_unfinished_copies(sim_api, monkeypatch,
                                                                     copies_done):
    """A cache dropped long after its last step (its copies done) is collected without the host
    waiting for anything: its streams come from torch's pool and may carry another cache's
    copies by then. Dropped with copies in flight, the host waits for those copies' events,
    never for whole streams."""
    import gc
    import weakref

    from sim_streams import SimEvent, SimStream

    from kvpr_compile.runtime import cuda_runtime
    gc.collect()   # runtimes that earlier tests left in reference cycles
    waits = []   # only this test's streams and events (sim): earlier runtimes may be collected too
    monkeypatch.setattr(SimStream, "synchronize",
                        lambda self: self.api is sim_api and waits.append("stream"))
    monkeypatch.setattr(SimEvent, "synchronize",
                        lambda self: self.api is sim_api and waits.append("event"))
    model = tiny_llama()
    cache = model.make_cache(2, 96)
    with torch.no_grad():
        decode_steps(torch.compile(model, backend="kvpr", options={"ratio": 0.5}),
                     batch_prompt(2, vocab=80), cache, 2)
    collected = weakref.ref(cuda_runtime.runtime(cache._store, "cpu"))
    if copies_done:
        sim_api.complete_after = 0   # the device caught up: every recorded event is done
    del cache
    gc.collect()
    assert collected() is None
    assert waits == [] if copies_done else waits and set(waits) == {"event"}
