"""Store race: the D2H copy of new K, V, X runs after ``store_tokens`` returns; its sources must
not be overwritten before it ran, whatever runs the graph (inductor reuses dead buffers; a graph
may write a source in place).

Simulated streams with *deferred* side-stream copies (``DeferredApi``): a copy queued on a side
stream runs only when something waits for it (an event of that stream, or the whole stream), the
latest a GPU could run it. The graph under test is the rewritten one plus, right after each
layer's last reader of new K, V and the recompute inputs, a write of NaN into them: what inductor
does when it hands their memory to a later buffer. With the copy reading the sources themselves,
NaN lands in the store and decoding goes wrong (negative control); with the runtime-owned staging
copies (``CudaRuntime.store_tokens_staged``) it matches eager. The staging buffers are reused
by the next step: at ratio 0 nothing but their own wait orders that reuse (see below).
"""
from __future__ import annotations

import pytest
import torch

from helpers import decode_seeded, tiny_llama, worst_rel_err
from kvpr_compile.backend import kvpr_backend
from kvpr_compile.ops.nodes import args_of
from kvpr_compile.runtime import cuda_runtime
from kvpr_compile.runtime.lower import STORE, lower
from kvpr_compile.runtime.store import KVStore
from sim_streams import SimApi, SimEvent, SimStream

TOL = 1e-5


class DeferredApi(SimApi):
    """SimApi whose side-stream copies wait in a queue until something waits for them."""

    def __init__(self):
        super().__init__()
        self.queues: dict[str, list] = {}
        self.done: dict[str, int] = {}

    def enqueue(self, fn) -> None:
        if self.current is self.compute:
            fn()
            return
        self.queues.setdefault(self.current.name, []).append(fn)

    def flush(self, stream: SimStream, upto: int | None = None) -> None:
        queue = self.queues.get(stream.name, [])
        upto = len(queue) if upto is None else upto
        while self.done.get(stream.name, 0) < upto:
            i = self.done.get(stream.name, 0)
            self.done[stream.name] = i + 1
            queue[i]()

    def copy(self, dst, src) -> None:
        self.races.read(self.current, src, "copy source")
        self.races.write(self.current, dst, "copy destination")
        self.enqueue(lambda: dst.copy_(src))

    def new_stream(self, device):
        stream = super().new_stream(device)
        api = self
        base_wait_event, base_wait_stream = stream.wait_event, stream.wait_stream

        def wait_event(event):   # a side stream waits in its own queue
            base_wait_event(event)
            if event.stream is not None and event.stream is not stream:
                api.enqueue_on(stream, lambda: api.flush(event.stream, event.mark))

        def wait_stream(other):
            base_wait_stream(other)
            if other is not stream:
                api.enqueue_on(stream, lambda: api.flush(other))
        stream.wait_event, stream.wait_stream = wait_event, wait_stream
        return stream

    def enqueue_on(self, stream, fn) -> None:
        saved, self.current = self.current, stream
        try:
            self.enqueue(fn)
        finally:
            self.current = saved

    def new_event(self):
        return DeferredEvent(self)


class DeferredEvent(SimEvent):
    stream = None
    mark = 0

    def record(self, stream) -> None:
        super().record(stream)
        self.stream, self.mark = stream, len(self.api.queues.get(stream.name, []))


@pytest.fixture
def deferred(monkeypatch):
    api = DeferredApi()
    monkeypatch.setattr(cuda_runtime, "API", api)
    compute_wait_event, compute_wait_stream = api.compute.wait_event, api.compute.wait_stream

    def wait_event(event):   # the compute stream runs now: run what it waits for first
        compute_wait_event(event)
        if event.stream is not None and event.stream is not api.compute:
            api.flush(event.stream, event.mark)

    def wait_stream(other):
        compute_wait_stream(other)
        if other is not api.compute:
            api.flush(other)
    api.compute.wait_event, api.compute.wait_stream = wait_event, wait_stream

    def write_kv(self, layer, pos, k, v):
        n = k.shape[2]
        for dst, src in ((self.k[layer], k), (self.v[layer], v)):
            api.copy(dst[pos:pos + n], src.permute(2, 0, 1, 3))

    original_write_tokens = KVStore.write_tokens

    def write_tokens(self, layer, pos, records, links=()):
        if not records or api.current is api.compute:
            return original_write_tokens(self, layer, pos, records, links)
        layout = (tuple((r.shape[1:], r.dtype) for r in records), links)
        recs = self.records   # the store's own layout logic; only the copies are faked
        if layout != recs._layout[layer]:
            recs._arrange(layer, records, links)
            recs._layout[layer] = layout
        n = records[0].shape[0]
        for s, r in zip(self.tokens[layer], records):
            api.copy(s[pos:pos + n], r)
        if pos <= self.token_len[layer]:
            self.token_len[layer] = pos + n

    monkeypatch.setattr(KVStore, "write_kv", write_kv)
    monkeypatch.setattr(KVStore, "write_tokens", write_tokens)
    return api


def scribbling_backend(lowered: bool):
    """kvpr's rewrite, then NaN written into each layer's new K, V and X right after their last
    reader (the assemble, or a later node): inductor's reuse of dead buffers, made visible.
    (Side inputs such as RoPE's cos/sin are views of tensors later layers still read.)"""
    def backend(gm, example_inputs, **kwargs):
        kvpr_backend(gm, example_inputs, **kwargs)
        graph = gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        for store in [n for n in graph.nodes if n.target is STORE]:
            st = args_of(store)
            k_new, v_new, inputs = st.k, st.v, st.inputs
            for src in (k_new, v_new, *inputs[:1]):
                last = max(src.users, key=order.__getitem__)
                with graph.inserting_after(last):
                    graph.call_method("fill_", (src, float("nan")))
        graph.lint()
        gm.recompile()
        return lower(gm).forward if lowered else gm.forward
    return backend


@pytest.mark.parametrize("lowered", [False, True], ids=["custom-ops", "direct"])
def test_store_sources_overwritten_after_the_store_do_not_reach_the_cache(deferred, lowered):
    model = tiny_llama(layers=2)
    ref = decode_seeded(model, model.make_cache(2, 96), 6)
    compiled = torch.compile(model, backend=scribbling_backend(lowered), options={"ratio": 0.5})
    out = decode_seeded(model, model.make_cache(2, 96), 6, compiled)
    assert worst_rel_err(out[0], ref[0]) <= TOL and torch.equal(out[1], ref[1])
    assert deferred.races.found == []


@pytest.mark.parametrize("lowered", [False, True], ids=["custom-ops", "direct"])
def test_without_staging_the_overwrite_reaches_the_cache(deferred, monkeypatch, lowered):
    """Negative control: the D2H copy reading the sources themselves (the code before staging)."""
    rt = cuda_runtime.CudaRuntime

    def unstaged(self, store, layer, pos, k, v, records, links=()):
        return self.store_tokens(store, layer, pos, k, v, records, (k, v, *records), links)
    monkeypatch.setattr(rt, "store_tokens_staged", unstaged)
    model = tiny_llama(layers=2)
    ref = decode_seeded(model, model.make_cache(2, 96), 6)
    compiled = torch.compile(model, backend=scribbling_backend(lowered), options={"ratio": 0.5})
    out = decode_seeded(model, model.make_cache(2, 96), 6, compiled)
    assert not worst_rel_err(out[0], ref[0]) <= TOL


def test_deferred_copies_run_when_waited_for(deferred):
    """The model itself: a queued copy has not run until a wait on its stream."""
    api = deferred
    side = api.new_stream("cpu")
    src, dst = torch.ones(4), torch.zeros(4)
    with api.use(side):
        api.copy(dst, src)
        event = api.new_event()
        event.record(side)
    src.fill_(2.0)   # the source changes before the copy ran
    assert dst.sum() == 0
    api.compute.wait_event(event)
    assert torch.equal(dst, torch.full((4,), 2.0))


# ---- staging at ratio 0 -------------------------------------------------------------------------
# At ratio > 0 the compute stream waits for a layer's X before its store, and that load waited for
# the layer's previous store: the wait for X orders the staging buffers' reuse as a side effect.
# At ratio 0 no X is loaded, so only the staging's own wait for that store keeps the next step's
# staging copy from overwriting a buffer whose D2H copy has not run yet. (The lowered graph folds
# the wait for K,V[l:] into the assemble, after the store; the custom-op graph inductor gets
# waits for K,V before the store, which orders the reuse there too.)

def staged_backend(inner: str, ratios, loading_x: list):
    """kvpr's rewrite with per-layer ``ratios`` (a list, by layer), NaN written into the store
    sources after their last reader (so the lowered graph stages them too), then ``inner``.
    Appends to ``loading_x`` the layers each graph loads X for."""
    from kvpr_compile import stages
    from kvpr_compile.inner import compile_inner

    def forced_plan(c):   # the plan stage, then these ratios by layer
        stages.plan(c)
        c.ratios = {layer: ratios[layer] for layer in c.ratios}
        c.report.ratio_source = "forced per layer"

    def backend(gm, example_inputs, **kwargs):
        real = stages.STAGES
        stages.STAGES = tuple(forced_plan if s is stages.plan else s for s in real)
        try:
            scribbling_backend(True)(gm, example_inputs, options={"ratio": 0.5, "inner": "eager"})
        finally:
            stages.STAGES = real
        loading_x.append({args_of(n).layer for n in gm.graph.nodes
                          if n.target is torch.ops.kvpr.load_tokens.default})
        return compile_inner(gm, example_inputs, inner)
    return backend


RATIO_MIXES = {"all-0": [0.0, 0.0], "0-then-0.5": [0.0, 0.5], "0.5-then-0": [0.5, 0.0]}
FAST_INNER = {"eager"}   # piecewise and inductor compile C++ on the CPU: --run-slow


@pytest.mark.parametrize("inner", [
    p if p in FAST_INNER else pytest.param(p, marks=pytest.mark.slow)
    for p in ("eager", "piecewise", "inductor")])
@pytest.mark.parametrize("mix", list(RATIO_MIXES))
def test_staging_buffers_reused_at_ratio_0_wait_for_their_copy(deferred, inner, mix):
    """Layers at ratio 0 (all, or next to a layer at 0.5): the staging buffers of a layer are
    rewritten only after the previous step's D2H copy from them ran. Exact against eager, and
    the race checker finds nothing."""
    model = tiny_llama(layers=2)
    ref = decode_seeded(model, model.make_cache(2, 96), 6)
    loading_x = []
    compiled = torch.compile(model, backend=staged_backend(inner, RATIO_MIXES[mix], loading_x))
    out = decode_seeded(model, model.make_cache(2, 96), 6, compiled)
    assert loading_x[-1] == {i for i, r in enumerate(RATIO_MIXES[mix]) if r > 0}   # the decode step
    assert worst_rel_err(out[0], ref[0]) <= TOL and torch.equal(out[1], ref[1])
    assert deferred.races.found == []
