"""The throughput schedule's cache slots on simulated streams: the micro-batch parts of a cache
share their whole store's slot pool, and (layer j, micro-batch k+1)'s loads are issued while
(j, k) computes, so the device holds two (layer, micro-batch) slots whatever the number of
micro-batches (the planner's working set), with no slot refilled before its last reader's free
event. Exact against eager (poisoned stored K/V at ratio 1.0); negative controls: parts with a
pool each hold more slots, and a copy that skips the free event is a race."""
from __future__ import annotations

import pytest
import torch

from helpers import (batch_prompt, decode_steps, throughput_compile, throughput_llama,
                     worst_rel_err)
from kvpr_compile import config
from kvpr_compile.runtime import cuda_runtime
from kvpr_compile.runtime.slots import Slot, SlotPool

TOL = 1e-5
STEPS = 2
LAYERS = 3


def _run(sim, monkeypatch, batch, m, ratio, poison=False):
    """Eager, then the compiled throughput steps on simulated streams, logging every slot take,
    free and buffer allocation: (api, cache, log of ("take" | "free" | "alloc", key or buffer
    kind, slot, slots held), result, reference)."""
    model = throughput_llama(layers=LAYERS)
    prompt = batch_prompt(batch)
    want = decode_steps(model, prompt, model.make_cache(batch), STEPS)
    api = sim()
    log = []
    take, give_back = SlotPool.take, SlotPool.give_back   # give_back: the sim fixture's logger

    def logged_take(self, key, part, stream):
        slot, after_free = take(self, key, part, stream)
        log.append(("take", key, id(slot), len(self.held)))
        return slot, after_free

    def logged_give_back(self, key, stream):
        if key in self.held:
            log.append(("free", key, id(self.held[key]), len(self.held)))
        give_back(self, key, stream)
    def allocating(method):
        def logged(self, *args):
            buffers, fresh = method(self, *args)
            if fresh:
                log.append(("alloc", method.__name__, id(self), 0))
            return buffers, fresh
        return logged
    monkeypatch.setattr(Slot, "kv_buffers", allocating(Slot.kv_buffers))
    monkeypatch.setattr(Slot, "token_buffers", allocating(Slot.token_buffers))
    monkeypatch.setattr(SlotPool, "take", logged_take)
    monkeypatch.setattr(SlotPool, "give_back", logged_give_back)
    cache = model.make_cache(batch)
    with torch.no_grad():
        compiled = throughput_compile(model, micro_batches=m, ratio=ratio)
        got = decode_steps(compiled, prompt, cache, STEPS, poison=poison)
    return api, cache, log, got, want


def _first(log, kind, key, after=0) -> int:
    return next(i for i in range(after, len(log)) if log[i][0] == kind and log[i][1] == key)


@pytest.mark.parametrize("batch,m,ratio", [
    (5, 2, 0.5), (7, 3, 1.0),
    pytest.param(7, 3, 0.5, marks=pytest.mark.slow),
    pytest.param(5, 2, 1.0, marks=pytest.mark.slow)])
def test_micro_batches_share_two_slots_loaded_one_ahead(sim, monkeypatch, batch, m, ratio):
    """Batch 5 as [3, 2], 7 as [3, 2, 2]; at ratio 1.0 the stored K/V is poisoned after the
    prefill. Exact; race-free; two distinct slots over the whole run, never more than two held;
    in each step (j, k+1)'s first load is taken before (j, k)'s slot is freed, and (j+1, 0)'s
    before (j, m-1)'s; the last step allocates no slot memory (a smaller micro-batch views the
    block a larger one allocated)."""
    api, cache, log, got, want = _run(sim, monkeypatch, batch, m, ratio, poison=ratio == 1.0)
    assert worst_rel_err([got[0], *got[1]], [want[0], *want[1]]) <= TOL
    assert torch.equal(got[2], want[2])
    assert api.races.accesses > 100 and api.races.found == []
    store = cache._store
    assert [p.batch_size for p in store.parts] == ([3, 2] if m == 2 else [3, 2, 2])
    pool = cuda_runtime.runtime(store, "cpu").slots
    assert all(cuda_runtime.runtime(p, "cpu").slots is pool for p in store.parts)
    assert len(pool.slots) == 2 and not pool.held
    assert len({slot for _, _, slot, _ in log}) == 2
    assert max(held for kind, _, _, held in log if kind == "take") <= 2
    assert api.stream_waits[("compute", cuda_runtime.runtime(store, "cpu").h2d.name)] == 0
    steps, held = [], False   # each step's first load: (0, 0) taken while not held
    for i, (kind, key, _, _) in enumerate(log):
        if key == (0, 0) and kind in ("take", "free"):
            if kind == "take" and not held:
                steps.append(i)
            held = kind == "take"
    assert len(steps) == 1 + STEPS
    assert not [entry for entry in log[steps[-1]:] if entry[0] == "alloc"]
    for start in steps[1:]:   # decode steps
        for layer in range(LAYERS):
            for k in range(m):
                after = (k + 1, layer) if k + 1 < m else (0, layer + 1)
                if after[1] < LAYERS:
                    taken = _first(log, "take", after, start)
                    assert taken < _first(log, "free", (k, layer), start)


def test_parts_with_a_pool_each_hold_a_slot_per_micro_batch(sim, monkeypatch):
    """Negative control for the slot count: the parts' own pools (the runtime before sharing)
    hold more than two micro-batch slots at three micro-batches."""
    with config.patch(shared_slots=False):
        api, cache, log, got, want = _run(sim, monkeypatch, 7, 3, 0.5)
    assert worst_rel_err([got[0], *got[1]], [want[0], *want[1]]) <= TOL
    assert len({slot for _, _, slot, _ in log}) > 2


def test_a_slot_refilled_without_its_free_event_is_a_race(sim, monkeypatch):
    """Negative control for the ordering: the copy into a slot another micro-batch's assemble
    just freed, without waiting on its free event, is caught by the race checker."""
    fill = cuda_runtime.CudaRuntime._fill
    monkeypatch.setattr(cuda_runtime.CudaRuntime, "_fill", lambda self, layer, slot, after_free,
                        *a, **kw: fill(self, layer, slot, False, *a, **kw))
    api, *_ = _run(sim, monkeypatch, 5, 2, 0.5)
    assert any("copy destination" in r and "slot (recompute/assemble)" in r
               for r in api.races.found)
