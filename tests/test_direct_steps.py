"""The graph the backend runs calls the kvpr steps directly (runtime/lower.py, runtime/direct.py):
no kvpr:: custom op is left in it, one store+assemble call per layer, no wait on CPU; results
equal eager (<= 1e-5, identical tokens), also with the stored K/V poisoned at ratio 1 (so the
recompute really is what feeds attention) and on simulated streams (race-free)."""
from __future__ import annotations

import pytest
import torch

from helpers import check_race_free, decode_seeded, tiny_llama, worst_rel_err
from kvpr_compile.backend import kvpr_backend
from kvpr_compile.runtime import cuda_runtime, direct
from kvpr_compile.runtime.lower import KVPR_OPS, lower

TOL = 1e-5
LAYERS = 4


def lowering_backend(lowered: list):
    def backend(gm, example_inputs, **kwargs):
        kvpr_backend(gm, example_inputs, **kwargs)
        lowered.append(lower(gm))
        return lowered[-1].forward
    return backend


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_lowered_graph_is_exact_and_has_no_custom_ops(ratio):
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), 8)
    lowered = []
    compiled = torch.compile(model, backend=lowering_backend(lowered), options={"ratio": ratio})
    out = decode_seeded(model, model.make_cache(2, 96), 8, compiled, poison=ratio == 1.0)
    assert worst_rel_err(out[0], ref[0]) <= TOL and torch.equal(out[1], ref[1])
    decode_graph = lowered[-1]
    calls = targets(decode_graph)
    assert not KVPR_OPS & set(calls)
    assert calls.count(direct.cpu_store_assemble) == LAYERS
    assert calls.count(direct.cpu_load_kv) == LAYERS
    assert calls.count(direct.cpu_load_tokens) == (LAYERS if ratio > 0 else 0)
    assert calls.count(direct.resolve) == 1


@pytest.mark.quick
def test_default_backend_runs_the_lowered_graph(monkeypatch):
    """backend="kvpr" (inner eager) never calls a kvpr:: op once compiled."""
    model = tiny_llama()
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.5})
    cache = model.make_cache(2, 96)
    prompt = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        compiled(prompt, cache)
        compiled(prompt[:, :1], cache)
        compiled(prompt[:, 1:2], cache)   # compiled and warm
        calls = []
        real = torch._ops.OpOverload.__call__

        def spy(self, *args, **kwargs):
            if self.namespace == "kvpr":
                calls.append(self.name())
            return real(self, *args, **kwargs)
        monkeypatch.setattr(torch._ops.OpOverload, "__call__", spy)
        compiled(prompt[:, 2:3], cache)
    assert calls == []


def test_resolve_finds_the_store_without_reading_the_handle():
    model = tiny_llama()
    cache = model.make_cache(2, 96)
    assert direct.resolve(cache.handle) is cache._store
    assert direct.resolve(cache.handle.clone()) is cache._store   # another tensor: by its uid


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_lowered_graph_on_simulated_streams(sim, ratio):
    """Direct calls on the CUDA runtime's logic: exact, race-free, one wait per layer (X)."""
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), 8)
    api = sim()
    lowered = []
    compiled = torch.compile(model, backend=lowering_backend(lowered), options={"ratio": ratio})
    cache = model.make_cache(2, 96)
    out = decode_seeded(model, cache, 8, compiled, poison=ratio == 1.0)
    check_race_free(api, ref, out)
    calls = targets(lowered[-1])
    assert calls.count(direct.stream_store_assemble) == LAYERS
    assert calls.count(direct.stream_wait) == (LAYERS if ratio > 0 else 0)
    assert calls.count(direct.stream_prefetch_next) == 1   # the next call's first loads
    rt = cuda_runtime.runtime(cache._store, "cpu")
    assert len(rt.slots.slots) == 2 and rt.slots.held == {0: rt.slots.next_call.slot}
