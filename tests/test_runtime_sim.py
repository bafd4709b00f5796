"""The CUDA runtime's stream/event/slot logic, run on CPU with simulated streams (sim_streams.py).

Copies run synchronously, so values must match eager exactly; the race checker then proves the
ordering a real GPU would need: slot copies after the slot's last reader, reads after the copies,
loads after the stores of the same positions, stores after the compute that produced their data.
Negative controls drop one wait each and must be caught."""
from __future__ import annotations

import pytest
import torch

from helpers import (check_race_free, compiled_run, conversation, decode_seeded, nan_kv,
                     sim_backend, tiny_llama, worst_rel_err)
from kvpr_compile.runtime import cuda_runtime

TOL = 1e-5


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_layer_ahead_uses_two_slots_without_races(sim, ratio):
    api, cache, ref, out = compiled_run(sim, ratio)
    check_race_free(api, ref, out)
    rt = cuda_runtime.runtime(cache._store, "cpu")
    assert len(rt.slots.slots) == 2
    # only the next call's first loads (cross-call prefetch, test_next_call.py) hold a slot
    assert rt.slots.held == {0: rt.slots.next_call.slot}


def test_two_layers_ahead(sim):
    api, cache, ref, out = compiled_run(sim, 0.5, distance=2)
    check_race_free(api, ref, out)
    assert len(cuda_runtime.runtime(cache._store, "cpu").slots.slots) == 3


@pytest.mark.quick
def test_poisoned_kv_is_never_read_at_ratio_one(sim):
    api, cache, ref, out = compiled_run(sim, 1.0, poison=True)
    check_race_free(api, ref, out)


def test_chunks_on_a_poisoned_past_recompute_without_races(sim):
    """Graphs that add several tokens on a past (chunks of 3 and 5, a next turn) load X[:l] into
    the slots and recompute like decode steps, with the same waits and events."""
    model = tiny_llama(layers=2)
    ref = conversation(model, model.make_cache(2, 96))
    api = sim()
    compiled = torch.compile(model, backend=sim_backend(), options={"ratio": 1.0})
    out = conversation(compiled, model.make_cache(2, 96), poison=lambda c: nan_kv(c.k_cpu, c.v_cpu))
    assert worst_rel_err(out, ref) <= TOL
    assert api.races.accesses > 100 and api.races.found == []
    assert api.stream_waits[("compute", "side1")] == 0


def test_eager_prefill_then_compiled_decode_falls_back(sim):
    """cache_update (uncompiled) on the compute stream, then compiled loads on the copy stream
    and the assemble fallback (no stored X for the prompt)."""
    api, cache, ref, out = compiled_run(sim, 1.0, eager_prefill=True)
    check_race_free(api, ref, out)


def test_wait_maps_tensors_to_slots(sim):
    api = sim()
    cache = tiny_llama().make_cache(2, 96)
    handle = cache.handle
    k, v = torch.ops.kvpr.load_kv(handle, 1, 0, 5, 2, 4, 16, torch.float32, torch.device("cpu"))
    assert k.shape == (2, 4, 5, 16) and k.stride() == (64, 16, 2 * 64, 1)   # sequence-major slot
    torch.ops.kvpr.wait([k, v])
    assert api.stream_waits[("compute", "side1")] == 0
    torch.ops.kvpr.wait([k.clone()])                     # not a slot: waits for all copies
    assert api.stream_waits[("compute", "side1")] == 1
    torch.ops.kvpr.wait([k.clone(), v.clone()])          # once per call and copy stream
    assert api.stream_waits[("compute", "side1")] == 2


@pytest.mark.parametrize("dropped", ["free", "stored", "compute"])
def test_race_checker_catches_a_missing_wait(sim, monkeypatch, dropped):
    """Negative controls: without each wait the checker reports a race."""
    rt_cls = cuda_runtime.CudaRuntime
    if dropped == "free":      # copy into a slot before its previous reader is done
        fill = rt_cls._fill
        monkeypatch.setattr(rt_cls, "_fill", lambda self, layer, slot, after_free, *a, **kw:
                            fill(self, layer, slot, False, *a, **kw))
    elif dropped == "stored":  # load positions before their store has landed
        fill = rt_cls._fill

        def no_store_wait(self, layer, *a, **kw):
            saved, self.stored = self.stored, [None] * len(self.stored)
            try:
                fill(self, layer, *a, **kw)
            finally:
                self.stored = saved
        monkeypatch.setattr(rt_cls, "_fill", no_store_wait)
    else:                      # store copies data the compute stream may not have produced yet
        from sim_streams import SimStream
        monkeypatch.setattr(SimStream, "wait_stream", lambda self, other: None)
    api, _, _, _ = compiled_run(sim, 0.5, steps=4)
    assert api.races.found


def test_store_sources_released_before_their_event_is_a_race(sim, monkeypatch):
    """Negative control for asynchronous reads and frees: a store copy's sources dropped at once
    (instead of held in ``in_flight`` until the copy's event) may be reused while the D2H copy
    still reads them."""
    store_tokens = cuda_runtime.CudaRuntime.store_tokens

    def released_at_once(self, *args, **kwargs):
        store_tokens(self, *args, **kwargs)
        self.in_flight.clear()
    monkeypatch.setattr(cuda_runtime.CudaRuntime, "store_tokens", released_at_once)
    api, _, _, _ = compiled_run(sim, 0.5, steps=3)
    assert api.releases > 0
    assert any("release of a store copy's source" in r for r in api.races.found)


def test_stores_retired_after_their_event_release_sources_without_races(sim):
    """With events completing a few records later, ``in_flight`` is drained as copies finish:
    sources are released (and their memory reused) only once the host knows the copy is done."""
    api, cache, ref, out = compiled_run(sim, 0.5, complete_after=6)
    check_race_free(api, ref, out)
    assert api.releases > 20
    assert len(cuda_runtime.runtime(cache._store, "cpu").in_flight) < 8


def test_inductor_graphs_load_into_owned_tensors(sim):
    """inner="inductor": loads land in fresh tensors (inductor may recycle op outputs' memory,
    which slot views must never be); still exact and race-free, and no slot is used."""
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), 6)
    api = sim()
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.5, "inner": "inductor"})
    cache = model.make_cache(2, 96)
    out = decode_seeded(model, cache, 6, compiled)
    assert worst_rel_err(out[0], ref[0]) <= TOL and torch.equal(out[1], ref[1])
    assert api.races.found == [] and api.races.accesses > 100
    assert not cuda_runtime.runtime(cache._store, "cpu").slots.slots
    assert api.stream_waits[("compute", "side1")] > 0      # waits cover the copy stream


def _latest_copy(api, t) -> tuple:
    """(stream, tick) of the latest copy-stream write into ``t``'s storage."""
    key = t.untyped_storage().data_ptr()
    writes = [(when, s) for kind, _, _, s, when, _ in api.races.log[key]
              if kind == "write" and s is not api.compute]
    assert writes, "nothing was copied into this tensor"
    when, stream = max(writes, key=lambda w: w[0])
    return stream, when


def _covers(api, copy) -> bool:
    """Whether the compute stream is now ordered after ``copy`` (stream, tick)."""
    stream, when = copy
    return api.compute.clock.get(stream.name, 0) >= when


def test_recompute_waits_for_x_only(sim):
    """Row-by-row inside a layer: the wait before the recompute covers the copy of X, and not
    the copy of K,V[l:] (issued after it on the same stream); the wait before assemble covers
    K,V. Checked on the stream clocks, i.e. on what each event covers, not on event identity."""
    api = sim()
    cache = tiny_llama().make_cache(2, 96)
    cpu = torch.device("cpu")
    x_all = torch.randn(2, 9, 64)
    torch.ops.kvpr.store_tokens(cache.handle, 0, 0, *(torch.randn(2, 4, 9, 16),) * 2, [x_all], [1])
    x, = torch.ops.kvpr.load_tokens(cache.handle, 0, 4, [2, 1, 64], [3], [0], cpu)
    k, v = torch.ops.kvpr.load_kv(cache.handle, 0, 4, 9, 2, 4, 16, torch.float32, cpu)
    copies = {name: _latest_copy(api, t) for name, t in (("x", x), ("k", k), ("v", v))}
    assert not any(_covers(api, c) for c in copies.values())
    torch.ops.kvpr.wait([x])
    assert _covers(api, copies["x"])
    assert not _covers(api, copies["k"]) and not _covers(api, copies["v"])
    torch.ops.kvpr.wait([k, v])
    assert all(_covers(api, c) for c in copies.values())
    assert torch.equal(x[:, :, 0], x_all[:, :4].transpose(0, 1))


@pytest.mark.quick
def test_decode_recompute_overlaps_the_kv_copy(sim, monkeypatch):
    """In compiled decode steps (ratio 0.5, loads a layer ahead), every wait for a layer's X
    leaves that layer's K,V copy unwaited for (the recompute may overlap it), and every wait for
    K,V covers its copy. A rewrite or runtime that loses the overlap fails here."""
    from kvpr_compile.runtime.slots import slot_of
    seen = {"tokens": 0, "kv": 0}
    state = {}

    def checking_wait(tensors):
        state["wait"](tensors)
        api = state["api"]
        for t in tensors:
            if t.numel() == 0:   # prefill: nothing cached yet
                continue
            found = slot_of(t)
            assert found is not None, "decode loads land in slots"
            slot, part = found
            assert _covers(api, _latest_copy(api, t))
            if part == "tokens":
                assert not _covers(api, _latest_copy(api, slot.kv[0]))
                assert not _covers(api, _latest_copy(api, slot.kv[1]))
            seen[part] += 1

    real_sim = sim

    def sim_with_check(complete_after=None):
        api = real_sim(complete_after)
        state["api"], state["wait"] = api, cuda_runtime.wait
        monkeypatch.setattr(cuda_runtime, "wait", checking_wait)
        return api
    api, _, ref, out = compiled_run(sim_with_check, 0.5, steps=4)
    check_race_free(api, ref, out)
    assert seen["tokens"] >= 4 * 4 and seen["kv"] >= 2 * 4 * 4   # 4 steps x 4 layers


def test_copies_into_fresh_memory_wait_for_queued_compute_and_reused_slots_do_not(sim):
    """Newly allocated device memory may still be in use by work queued on the compute stream
    (the caching allocator hands back blocks freed there), so the first copy into a new slot,
    and every copy into an owned tensor, waits for the compute stream; a reused slot waits only
    for its free event, not for compute queued after it."""
    api = sim()
    cache = tiny_llama().make_cache(2, 96)
    rt = cuda_runtime.runtime(cache._store, "cpu")
    shape = (2, 4, 16, torch.float32, torch.device("cpu"))

    def compute_work() -> int:
        return api.compute.tick()

    queued = compute_work()
    torch.ops.kvpr.load_kv(cache.handle, 0, 0, 5, *shape)               # allocates the slot
    assert rt.h2d.clock.get("compute", 0) >= queued
    queued = compute_work()
    torch.ops.kvpr.load_kv(cache.handle, 1, 0, 5, *shape, owned=True)   # a fresh tensor
    assert rt.h2d.clock.get("compute", 0) >= queued
    rt.slots.give_back(0, api.compute)                                  # layer 0's reader done
    freed = api.compute.clock["compute"]
    later = compute_work()
    torch.ops.kvpr.load_kv(cache.handle, 0, 0, 5, *shape)               # the same slot again
    assert len(rt.slots.slots) == 1
    assert freed <= rt.h2d.clock["compute"] < later
