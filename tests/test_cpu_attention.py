"""CPU co-attention (options['cpu_ratio'], passes/cpu_attention.py, runtime/cpu_attention.py):
the CPU attends to the last floor(cpu_ratio * past) tokens of each layer's past where they lie,
the device to the rest, merged exactly by log-sum-exp. Exact against eager on the CPU path and
through the CUDA runtime on simulated streams (race-free), next to a recompute ratio and a
resident share; the loads shrink by the CPU share; refused words for bad options; a layer whose
attention cannot be split keeps cpu share 0 and says why."""
from __future__ import annotations

import pytest
import torch

import kvpr_compile
from helpers import (CUSTOM_MODELS, SEEDED_PROMPT, check_race_free, conversation, decode_seeded,
                     decode_steps,
                     hf_build, hf_generate, hf_left_padded, sim_backend, tiny_llama,
                     worst_rel_err)
from kvpr_compile.ops import attention
from kvpr_compile.ops.attention import merge_partials, partial_attention
from kvpr_compile.ops.split import cpu_start
from kvpr_compile.runtime import cpu_attention, traffic

TOL = 1e-5
STEPS = 8
CPU_SHARES = [0.0, 0.25, 0.5, 1.0]


def _compare(name, options, steps=STEPS):
    """``CUSTOM_MODELS[name]`` decoded uncompiled and compiled with ``options``."""
    model, new_cache = CUSTOM_MODELS[name]()
    prompt = torch.randint(0, 89, (2, 7), generator=torch.Generator().manual_seed(3))
    ref = decode_steps(model, prompt, new_cache(2), steps)
    compiled = torch.compile(model, backend="kvpr", options=options)
    return ref, decode_steps(compiled, prompt, new_cache(2), steps)


def _exact(ref, out):
    assert worst_rel_err(out[1], ref[1]) <= TOL
    assert worst_rel_err([out[0]], [ref[0]]) <= TOL
    assert torch.equal(out[2], ref[2])


def _split(cpu, ratio=0.0, resident=None):
    """Options with ``cpu``, a ratio and a resident share that fit in one past."""
    options = {"cpu_ratio": cpu, "ratio": min(ratio, 1.0 - cpu)}
    if resident is not None:
        options["resident_ratio"] = min(resident, 1.0 - cpu - options["ratio"])
    return options


def _decode_notes() -> list[str]:
    return [e.note for e in kvpr_compile.last_report().layers]


# -- the parts and the merge ---------------------------------------------------------------------

@pytest.mark.quick
def test_merge_of_two_key_ranges_is_softmax_over_their_union():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, generator=g)
    k, v = torch.randn(2, 2, 11, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)
    mask = torch.rand(2, 1, 3, 11, generator=g) > 0.3
    mask[..., 0] = True
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    for cut in (0, 4, 11):   # an empty part has lse -inf and weight 0
        a = partial_attention(q, k[:, :, :cut], v[:, :, :cut], mask[..., :cut], 0.125 ** 0.5)
        b = partial_attention(q, k[:, :, cut:], v[:, :, cut:], mask[..., cut:], 0.125 ** 0.5)
        assert worst_rel_err([merge_partials(*a, *b, q.dtype)], [ref]) <= TOL


@pytest.mark.quick
def test_merge_ignores_a_part_whose_keys_are_all_masked():
    """A part with every key masked (lse -inf) may hold NaN (SDPA's own result does): weight 0."""
    g = torch.Generator().manual_seed(1)
    o = torch.randn(1, 2, 1, 4, generator=g)
    lse = torch.randn(1, 2, 1, generator=g)
    nan, none = torch.full_like(o, float("nan")), torch.full_like(lse, float("-inf"))
    assert torch.equal(merge_partials(o, lse, nan, none, o.dtype), o)
    assert torch.equal(merge_partials(nan, none, o, lse, o.dtype), o)


@pytest.mark.quick
def test_cpu_range_is_the_past_tail_and_leaves_what_is_taken():
    assert [cpu_start(p, 1, 4, 0) for p in (0, 3, 4, 9)] == [0, 3, 3, 7]
    assert cpu_start(10, 1, 1, 4) == 4      # capped: [0, 4) is resident or recomputed
    assert cpu_start(10, 1, 2, 10) == 10    # a budget took the whole past: nothing left


# -- exact against eager -----------------------------------------------------------------------

# every decoder at 0.25; no CPU share and the whole rest on the CPU on the fused-QKV model
# by default, on the other two with --run-slow
@pytest.mark.parametrize("name,cpu", [
    (name, cpu) if cpu == 0.25 or (name == "fused-qkv" and cpu != 0.5)
    else pytest.param(name, cpu, marks=pytest.mark.slow)
    for name in ("fused-qkv", "llama-gqa", "complex-rope") for cpu in (0.0, 0.25, 0.5, 1.0)])
def test_custom_decoders_are_exact(name, cpu):
    """nanoGPT-style MHA with a bool mask through SDPA (fused-qkv), the built-in Llama with
    grouped-query heads (SDPA) and a gpt-fast-style decoder (GQA by repeat_interleave, explicit
    matmul -> masked_fill -> softmax -> matmul), each with a recompute ratio and a resident
    share."""
    ref, out = _compare(name, _split(cpu, ratio=0.25, resident=0.25))
    _exact(ref, out)
    if cpu:
        assert all("attended on the CPU" in note for note in _decode_notes())
    assert [e.cpu for e in kvpr_compile.last_report().layers] == [cpu] * 2


# 0.5 repeats 0.25; on simulated streams at 1.0 by default: test_simulated_streams_are_race_free
@pytest.mark.parametrize("path,cpu", [
    ("cpu", 0.25), pytest.param("cpu", 0.5, marks=pytest.mark.slow), ("cpu", 1.0),
    ("runtime-sim", 0.25), pytest.param("runtime-sim", 0.5, marks=pytest.mark.slow),
    pytest.param("runtime-sim", 1.0, marks=pytest.mark.slow)], indirect=["path"])
def test_exact_on_both_paths(path, cpu):
    """The synchronous CPU path and the CUDA runtime's logic on simulated streams."""
    model = tiny_llama(kv_heads=2)
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    compiled = torch.compile(model, backend="kvpr", options=_split(cpu, 0.25, 0.25))
    out = decode_seeded(model, model.make_cache(2, 96), STEPS, compiled)
    assert worst_rel_err(out[0], ref[0]) <= TOL
    assert torch.equal(out[1], ref[1])


def test_uncompiled_prefill_then_compiled_decode(path):
    """The prompt's K,V stored by the uncompiled cache (no X): the CPU attends to them as well
    (on simulated streams after the uncompiled write's event)."""
    model = tiny_llama(layers=2, kv_heads=2)
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.5, "cpu_ratio": 0.5})
    out = decode_seeded(model, model.make_cache(2, 96), STEPS, compiled, eager_prefill=True)
    assert worst_rel_err(out[0], ref[0]) <= TOL
    assert torch.equal(out[1], ref[1])


@pytest.mark.parametrize("tokens", [0, 8, 40])
def test_with_a_resident_budget(tokens):
    """A budget keeps up to ``tokens`` of every layer resident and the ratio recomputes its
    share of the rest; the CPU's range takes what neither does (nothing once all is resident)."""
    row = 2 * 2 * 4 * 16 * 4   # one position's K and V in one layer (batch 2, fp32)
    budget = 4 * row * 97 + 4 * tokens * row   # two K,V and X slots, one assembled K,V
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    compiled = torch.compile(model, backend="kvpr", options={
        "ratio": 0.25, "cpu_ratio": 0.5, "gpu_budget_bytes": budget})
    out = decode_seeded(model, model.make_cache(2, 96), STEPS, compiled)
    assert worst_rel_err(out[0], ref[0]) <= TOL
    assert torch.equal(out[1], ref[1])


def test_graphs_that_add_several_tokens_on_a_past(path):
    """Chunks of 3 and 5 tokens and a next turn on a past: the queries of every new token attend
    to the CPU's range, the causal mask among the new tokens stays on the device."""
    model = tiny_llama(layers=2, kv_heads=2)
    ref = conversation(model, model.make_cache(2, 96))
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.25, "cpu_ratio": 0.5})
    out = conversation(compiled, model.make_cache(2, 96))
    assert worst_rel_err(out, ref) <= TOL


@pytest.mark.parametrize("inner", ["inductor", pytest.param("piecewise", marks=pytest.mark.slow)])
def test_other_inner_compilers(inner):
    """The split under inductor (the whole graph) and piecewise (inductor between the steps):
    the device part and the merge are plain torch, the CPU part an opaque op."""
    ref, out = _compare("fused-qkv", {"ratio": 0.25, "cpu_ratio": 0.5, "inner": inner}, steps=3)
    _exact(ref, out)


def _generate_exactly(model, cpu):
    """``generate`` with the forward compiled at ``cpu`` (with recompute 0.25 and a resident
    share 0.25) against the uncompiled one: exact logits, identical tokens."""
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = hf_generate(model, ids)
    model.forward = torch.compile(model.forward, backend="kvpr",
                                  options=_split(cpu, ratio=0.25, resident=0.25))
    out = hf_generate(model, ids)
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)


# Llama at 1.0 through generate by default: test_hf_left_padding
@pytest.mark.parametrize("arch,cpu", [("llama", 0.25),
                                      pytest.param("llama", 1.0, marks=pytest.mark.slow),
                                      ("qwen2", 0.5),
                                      pytest.param("qwen2", 0.25, marks=pytest.mark.slow)])
def test_hf_models_through_generate(arch, cpu):
    """transformers' Llama (MHA) and Qwen2 (GQA, biased projections) through ``generate``."""
    model = hf_build(arch)
    _generate_exactly(model, cpu)
    assert all("attended on the CPU" in note for note in _decode_notes())


GQA = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=128, num_hidden_layers=2)
MORE = {   # name -> (model type, config words, attention implementation)
    "llama-eager": ("llama", GQA, "eager"),
    "gemma2-softcap": ("gemma2", dict(GQA, head_dim=16, attn_logit_softcapping=0.5), "eager"),
    "phi3": ("phi3", dict(GQA, pad_token_id=0), "sdpa"),
    "mistral-window": ("mistral", dict(GQA, sliding_window=5), "sdpa"),
}


def _more(name):
    import transformers
    arch, words, implementation = MORE[name]
    cfg = transformers.AutoConfig.for_model(arch, **words)
    cfg._attn_implementation = implementation
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


# HF's eager attention at 0.25 by default inside Gemma2's (softcapped, eager too), with a
# left-padded row in test_hf_left_padding; alone with --run-slow
@pytest.mark.parametrize("name,cpu", [
    (name, cpu) if cpu == 0.25 and name != "llama-eager"
    else pytest.param(name, cpu, marks=pytest.mark.slow)
    for name in sorted(MORE) for cpu in (0.25, 1.0)])
def test_more_hf_attentions(name, cpu):
    """HF's eager attention (matmul, scaling, the mask added, softmax in float32, dropout off,
    matmul), Gemma2's logit softcapping (tanh between the matmuls, repeated by the CPU part),
    Phi3 (fused QKV, SDPA) and Mistral with a sliding window of 5 keys (its mask's columns: at
    cpu 1 the window lies in the CPU's range)."""
    model = _more(name)
    _generate_exactly(model, cpu)
    notes = _decode_notes()
    assert notes and all("attended on the CPU" in note for note in notes), notes


def test_a_sliding_layers_cpu_share_is_of_its_window():
    """Mistral, window 5: each decode step reads the window's 4 past keys; at cpu 0.5 the CPU
    attends to floor(0.5 * 4) = 2 of them and 2 are loaded, per layer and step (the share of
    the whole past would leave nothing to load)."""
    model = _more("mistral-window")
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = hf_generate(model, ids)
    model.forward = torch.compile(model.forward, backend="kvpr", options=_split(0.5))
    with traffic.counting() as counted:
        out = hf_generate(model, ids)
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    row = 2 * 2 * 2 * 16 * 4    # K and V, batch 2, 2 KV heads of 16, fp32
    steps = out.sequences.shape[1] - ids.shape[1] - 1   # decode calls after the prefill
    assert counted.by_kind["kv"] == steps * 2 * 2 * row


@pytest.mark.parametrize("arch,cpu", [("llama", 1.0), ("qwen2", 0.5), ("llama-eager", 1.0),
                                      ("gemma2-softcap", 0.5)])
def test_hf_left_padding(arch, cpu):
    """A left-padded row: its mask's columns go with their keys to the CPU part (at 1.0 the
    padded keys are the CPU's), through SDPA's mask and through the eager attention's added
    mask."""
    model = _more(arch) if arch in MORE else hf_build(arch)
    ref, out = hf_left_padded(model, ratio=0.0 if cpu == 1.0 else 0.25, cpu_ratio=cpu)
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)


# -- what is read where --------------------------------------------------------------------------

@torch.no_grad()
def _loaded_kv(options, steps=4):
    model = tiny_llama(layers=2)
    compiled = torch.compile(model, backend="kvpr", options=options)
    cache = model.make_cache(2, 96)
    nxt = compiled(SEEDED_PROMPT, cache)[:, -1:].argmax(-1)
    with traffic.counting() as counted:
        for _ in range(steps):
            nxt = compiled(nxt, cache)[:, -1:].argmax(-1)
    return counted.by_kind["kv"]


@pytest.mark.quick
@pytest.mark.parametrize("cpu", [0.25, 0.5, 1.0])
def test_loaded_bytes_drop_by_the_cpu_share(cpu):
    row = 2 * 2 * 4 * 16 * 4   # K and V of one position and layer: batch 2, 4 heads, d 16, fp32
    pasts = range(6, 10)
    full = _loaded_kv({"ratio": 0.0})
    assert full == 2 * row * sum(pasts)
    want = 2 * row * sum(p - (p * int(cpu * 4)) // 4 for p in pasts)
    assert _loaded_kv({"ratio": 0.0, "cpu_ratio": cpu}) == want


@torch.no_grad()
def _decode_with_store_range(store_range, monkeypatch, options, steps=4):
    monkeypatch.setattr(cpu_attention, "store_range", store_range)
    model = tiny_llama(layers=2)
    ref = decode_seeded(model, model.make_cache(2, 96), steps)
    compiled = torch.compile(model, backend="kvpr", options=options)
    return ref, decode_seeded(model, model.make_cache(2, 96), steps, compiled)


def test_device_part_never_reads_the_cpu_range(monkeypatch):
    """Each CPU read gets clean rows while the store's rows of that range are NaN until the
    step ends (the CPU part runs before the layer's assemble on the synchronous path): a device
    part (load, assemble) that read them would show NaN."""
    read, restore = cpu_attention.store_range, []

    def poisoning(store, layer, start, end):
        k, v = (t.clone() for t in read(store, layer, start, end))
        for t in (store.k[layer], store.v[layer]):
            restore.append((t[start:end], t[start:end].clone()))
            t[start:end].fill_(float("nan"))
        return k, v

    model = tiny_llama(layers=2)
    ref = decode_seeded(model, model.make_cache(2, 96), 4)
    monkeypatch.setattr(cpu_attention, "store_range", poisoning)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.25, "cpu_ratio": 0.5})
    cache = model.make_cache(2, 96)
    logits = []
    with torch.no_grad():
        nxt = compiled(SEEDED_PROMPT, cache)[:, -1:].argmax(-1)
        for _ in range(4):
            out = compiled(nxt, cache)[:, -1]
            for rows, clean in reversed(restore):   # the step is over: the rows as they were
                rows.copy_(clean)
            assert restore, "the CPU part read nothing"
            restore.clear()
            logits.append(out)
            nxt = out.argmax(-1, keepdim=True)
    assert worst_rel_err(logits, ref[0]) <= TOL


def test_cpu_part_reads_the_cpu_range(monkeypatch):
    """Negative control: NaN handed to the CPU part shows in the logits."""
    read = cpu_attention.store_range

    def nan_rows(store, layer, start, end):
        return tuple(torch.full_like(t, float("nan")) for t in read(store, layer, start, end))

    ref, out = _decode_with_store_range(nan_rows, monkeypatch, {"cpu_ratio": 0.5})
    assert worst_rel_err(out[0], ref[0]) == float("inf")


# -- simulated streams: the query's D2H and the result's H2D -----------------------------------

def _logged(sim, monkeypatch):
    """``sim`` with the query logged as a compute output whose release is watched (the D2H
    copy reads it), and the worker's reads of the host query and the store's rows logged."""
    api = sim()
    start, attend = cpu_attention.CpuAttention.start, cpu_attention.host_partial_attention

    def logged_start(self, store, rt, layer, q, *rest):
        api.races.write(api.compute, q, "query")
        api.watch_release(q, "the query (a D2H source)")
        return start(self, store, rt, layer, q, *rest)

    def logged_attend(q, k, v, mask, scale, *scoring):
        for t in (q, k, v):
            api.races.read(api.current, t, "CPU attention input")
        return attend(q, k, v, mask, scale, *scoring)

    monkeypatch.setattr(cpu_attention.CpuAttention, "start", logged_start)
    monkeypatch.setattr(cpu_attention, "host_partial_attention", logged_attend)
    return api


def _sim_run(api, cpu=0.5, ratio=0.25):
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), 10)
    compiled = torch.compile(model, backend=sim_backend(), options={"ratio": ratio,
                                                                     "cpu_ratio": cpu})
    return ref, decode_seeded(model, model.make_cache(2, 96), 10, compiled)


@pytest.mark.parametrize("cpu", [0.25, 1.0])
def test_simulated_streams_are_race_free(sim, monkeypatch, cpu):
    api = _logged(sim, monkeypatch)
    ref, out = _sim_run(api, cpu, ratio=0.0 if cpu == 1.0 else 0.25)
    check_race_free(api, ref, out)
    assert any("CPU attention input" in e[5] for log in api.races.log.values() for e in log)


def test_simulated_streams_with_per_score_ops_are_race_free(sim, monkeypatch):
    """The gpt-fast-style decoder (matmul -> masked_fill -> softmax -> matmul): its mask's
    columns go to the host with the query."""
    api = _logged(sim, monkeypatch)
    model, new_cache = CUSTOM_MODELS["complex-rope"]()
    prompt = torch.randint(0, 89, (2, 7), generator=torch.Generator().manual_seed(3))
    ref = decode_steps(model, prompt, new_cache(2), 6)
    compiled = torch.compile(model, backend=sim_backend(), options={"ratio": 0.25,
                                                                     "cpu_ratio": 0.5})
    out = decode_steps(compiled, prompt, new_cache(2), 6)
    assert worst_rel_err(out[1], ref[1]) <= TOL and torch.equal(out[2], ref[2])
    assert api.races.accesses > 100 and api.races.found == []


class _NoStreams:
    """Streams and events that order nothing (the host does it all): enough to run the worker
    thread's logic on a CPU, where every copy is synchronous."""
    device_type = "cpu"

    class Stream:
        def wait_event(self, event):
            pass

    class Event:
        def record(self, stream):
            pass

        def synchronize(self):
            pass

        def query(self):
            return True

    def new_stream(self, device):
        return self.Stream()

    def new_event(self):
        return self.Event()

    def current_stream(self, device):
        return self.Stream()

    def use(self, stream):
        import contextlib
        return contextlib.nullcontext()

    def copy(self, dst, src):
        dst.copy_(src)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_worker_thread_attends_with_its_own_thread_count(monkeypatch, dtype):
    """The CUDA runtime's worker thread (as on a GPU, with streams that order nothing): its
    results equal the synchronous path's (bf16: by the fused host kernel), and its torch thread
    count is its own."""
    from types import SimpleNamespace
    monkeypatch.setattr(attention, "WORKER_THREADS", 3)   # not the main thread's count
    cache = tiny_llama(layers=2).make_cache(2, 96, dtype=dtype)
    store = cache._store
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        store.k[layer][:20].copy_(torch.randn(20, 2, 4, 16, generator=g))
        store.v[layer][:20].copy_(torch.randn(20, 2, 4, 16, generator=g))
    q = torch.randn(2, 4, 1, 16, generator=g).to(dtype)
    mask = torch.rand(2, 1, 1, 8, generator=g) > 0.2
    main_threads = torch.get_num_threads()
    worker = cpu_attention.CpuAttention(_NoStreams(), torch.device("cpu"), threaded=True)
    rt = SimpleNamespace(stored=[None, None], in_flight=[])
    jobs = [worker.start(store, rt, layer, q, 12, 20, mask, 0.25) for layer in (0, 1)]
    for layer, (out, lse) in enumerate(jobs):
        for t in (out, lse):
            assert cpu_attention.wait_for(t, _NoStreams.Stream())
        want = cpu_attention.attend(store, layer, q, 12, 20, mask, 0.25)
        assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    assert worker.pool.submit(torch.get_num_threads).result() == 3
    assert torch.get_num_threads() == main_threads
    assert len(rt.in_flight) == 4


@pytest.mark.parametrize("dropped", ["query D2H", "result H2D"])
def test_race_checker_catches_a_missing_wait(sim, monkeypatch, dropped):
    api = _logged(sim, monkeypatch)
    if dropped == "query D2H":   # the worker reads the host query without waiting for its copy
        from sim_streams import SimEvent

        class NoWait(SimEvent):
            def synchronize(self):
                pass
        new_event = api.new_event
        start = cpu_attention.CpuAttention.start

        def start_no_wait(self, *args):
            api.new_event = lambda: NoWait(api)
            try:
                return start(self, *args)
            finally:
                api.new_event = new_event
        monkeypatch.setattr(cpu_attention.CpuAttention, "start", start_no_wait)
    else:   # the merge reads the result without the compute stream waiting for its copy
        def no_device_wait(t, current):
            pending = cpu_attention._PENDING.pop(id(t), None)
            if pending is not None:
                pending[1].result()
            return pending is not None
        monkeypatch.setattr(cpu_attention, "wait_for", no_device_wait)
    _sim_run(api)
    assert api.races.found


# -- what is refused -------------------------------------------------------------------------------

@pytest.mark.quick
@pytest.mark.parametrize("options,words", [
    ({"cpu_ratio": 1.5}, r"options\['cpu_ratio'\] must be a number in \[0, 1\], got 1.5"),
    ({"cpu_ratio": -0.1}, r"got -0.1"),
    ({"cpu_ratio": True}, r"got True"),
    ({"cpu_ratio": "0.5"}, r"got '0.5'"),
    ({"cpu_ratio": float("nan")}, r"got nan"),
    ({"cpu_ratio": 0.5, "ratio": 0.5, "resident_ratio": 0.25},
     r"options\['ratio'\] \(0.5\) \+ options\['resident_ratio'\] \(0.25\) \+ "
     r"options\['cpu_ratio'\] \(0.5\) = 1.25 must not exceed 1"),
    ({"cpu_ratio": 0.75, "ratio": 0.5}, r"\(0.5\) \+ .*\(None\) \+ .*\(0.75\) = 1.25"),
    ({"cpu_ratio": 0.5, "schedule": "throughput"}, r"schedule='latency' only"),
])
def test_bad_cpu_ratio_words(options, words):
    from kvpr_compile.options import Options
    with pytest.raises(ValueError, match=words):
        Options.parse(options)


@pytest.mark.quick
def test_bad_cpu_ratio_refused_before_anything_is_written():
    model = tiny_llama(layers=2)
    cache = model.make_cache(2, 96)
    compiled = torch.compile(model, backend="kvpr", options={"cpu_ratio": 2})
    with pytest.raises(ValueError, match=r"cpu_ratio'\] must be a number in \[0, 1\], got 2"):
        compiled(SEEDED_PROMPT, cache)
    assert cache.seq_len(0) == 0


class SinkDecoder(torch.nn.Module):
    """One layer whose softmax also runs over a learned sink logit (gpt-oss style): the
    scores are concatenated with it, which the CPU part cannot repeat."""

    def __init__(self):
        super().__init__()
        self.heads, self.head_dim, self.num_kv_heads = 2, 8, 2
        self.emb = torch.nn.Embedding(61, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.sink = torch.nn.Parameter(torch.randn(1, 2, 1, 1))
        self.blocks = [None]
        self.out = torch.nn.Linear(16, 61)

    def forward(self, tokens, cache):
        b, n = tokens.shape
        q, k, v = (t.view(b, n, 2, 8).transpose(1, 2)
                   for t in self.qkv(self.emb(tokens)).split(16, -1))
        k, v = cache.update(0, k, v)
        scores = (q @ k.transpose(-2, -1)) * 8 ** -0.5
        scores = torch.cat([scores, self.sink.expand(b, 2, n, 1)], dim=-1)
        p = torch.softmax(scores, dim=-1)[..., :-1]
        return self.out((p @ v).transpose(1, 2).reshape(b, n, 16))


def test_attention_sinks_keep_cpu_share_zero():
    """A softmax over the scores and a sink logit: not split, exact, and the report says
    why."""
    import custom_models
    torch.manual_seed(0)
    model = SinkDecoder().eval()
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(3))
    ref = decode_steps(model, prompt, custom_models.make_cache(model, 2, 32), 4)
    compiled = torch.compile(model, backend="kvpr", options={"cpu_ratio": 0.5})
    out = decode_steps(compiled, prompt, custom_models.make_cache(model, 2, 32), 4)
    _exact(ref, out)
    notes = _decode_notes()
    assert notes and all("cpu share 0 (cpu_ratio 0.5 not applied): " in note and "cat" in note
                         for note in notes), notes
    assert [e.cpu for e in kvpr_compile.last_report().layers] == [0.0]


def test_cpu_ratio_zero_keeps_the_graph():
    """cpu_ratio 0 (the default) inserts nothing: the same graph as without the option."""
    model = tiny_llama(layers=2)
    codes = []
    for options in ({"ratio": 0.5}, {"ratio": 0.5, "cpu_ratio": 0.0}):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="kvpr", options=options)
        decode_seeded(model, model.make_cache(2, 96), 1, compiled)
        codes.append(kvpr_compile.last_report().graph_module.code)
    assert codes[0] == codes[1] and "cpu_attend" not in codes[0]
