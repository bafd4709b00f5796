"""Sliding-window layers (Mistral's ``sliding_window``, Qwen2's ``use_sliding_window``, the local
layers of Gemma2/Gemma3/gpt-oss) load and recompute only their window: the past keys
``[past - w + 1, past)`` a query can see. Exact against transformers' own cache (its sliding
layers) with prompts longer than the window, prompts that reach it during decoding, left
padding and mixed local/global layers; the keys before the window are never read (poisoned with
NaN, the tokens stay exact); the traffic counter shows the window's bytes."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvpr_compile  # noqa: E402
import kvpr_compile.hf  # noqa: E402
from kvpr_compile.bench.limits import step_h2d_bytes  # noqa: E402
from kvpr_compile.hf import KVPRCache, cache_kwargs, sliding_windows  # noqa: E402
from kvpr_compile.ops.nodes import PREFETCH_NEXT  # noqa: E402
from kvpr_compile.runtime import traffic  # noqa: E402
from helpers import worst_rel_err  # noqa: E402

TOL = 1e-5
WINDOW = 8
NEW = 12
GQA = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=128)
CONFIGS = {   # arch -> (config keywords, the sliding layers)
    "mistral": (dict(GQA, num_hidden_layers=2, sliding_window=WINDOW), [0, 1]),
    "qwen2": (dict(GQA, num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                   max_window_layers=1), [1, 2]),
    "gemma2": (dict(GQA, num_hidden_layers=2, head_dim=16, sliding_window=WINDOW), [0]),
    "gemma3_text": (dict(GQA, num_hidden_layers=3, head_dim=16, sliding_window=WINDOW,
                         layer_types=["sliding_attention", "full_attention",
                                      "sliding_attention"]), [0, 2]),
    "gpt_oss": (dict(GQA, num_hidden_layers=2, head_dim=16, sliding_window=WINDOW,
                     num_local_experts=4, num_experts_per_tok=2), [0]),
}


def build(arch, attn_implementation=None, **overrides):
    kw, _ = CONFIGS[arch]
    cfg = transformers.AutoConfig.for_model(arch, **{**kw, **overrides})
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def prompt(n, batch=2):
    return torch.randint(1, 128, (batch, n), generator=torch.Generator().manual_seed(1))


def generate(model, ids, cache=None):
    """Greedy ``generate`` of NEW tokens with the logits; ``cache`` None: transformers' own
    cache (its sliding layers keep only the window): the reference."""
    kw = {} if cache is None else cache_kwargs(model, cache)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                              do_sample=False, output_logits=True, return_dict_in_generate=True,
                              **kw)


def windowed_layers(reports) -> set:
    """The layers whose report says they read only their window."""
    return {e.layer for r in reports for e in r.layers if "sliding window" in e.note}


@pytest.mark.quick
def test_the_cache_takes_transformers_windows_and_mask_sizes():
    """Per layer as transformers' DynamicCache builds it; mask sizes and the returned keys as its
    DynamicSlidingWindowLayer's, before and after the window fills."""
    for arch, (kw, sliding) in CONFIGS.items():
        cfg = transformers.AutoConfig.for_model(arch, **kw)
        windows = sliding_windows(cfg)
        assert [i for i, w in enumerate(windows) if w] == sliding, arch
        assert all(w == WINDOW for w in windows if w)
    cfg = transformers.AutoConfig.for_model("gemma2", **CONFIGS["gemma2"][0])
    ours = KVPRCache(cfg, 1, 64, warn_uncompiled=False)
    theirs = transformers.DynamicCache(config=cfg)
    assert ours.is_sliding == theirs.is_sliding == [True, False]
    for n in (5, 1, 1, 1, 4, 1):
        k = torch.randn(1, 2, n, 16)
        for layer in (0, 1):
            assert ours.get_mask_sizes(n, layer) == theirs.get_mask_sizes(n, layer)
            got, want = ours.update(k, k + 1, layer), theirs.update(k, k + 1, layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ratios 0 and 1 on a window by default: test_keys_before_the_window_are_never_read
@pytest.mark.parametrize("arch,ratio", [pytest.param("mistral", 0.0, marks=pytest.mark.slow),
                                        ("mistral", 0.5),
                                        pytest.param("mistral", 1.0, marks=pytest.mark.slow),
                                        pytest.param("gemma2", 0.0, marks=pytest.mark.slow),
                                        ("gemma2", 0.5),
                                        pytest.param("gemma2", 1.0, marks=pytest.mark.slow),
                                        ("gemma3_text", 0.5),
                                        pytest.param("qwen2", 0.5, marks=pytest.mark.slow),
                                        ("gpt_oss", 0.5)])
def test_prompt_longer_than_the_window_matches_eager(arch, ratio):
    """Prompt 24, window 8: the tokens and logits of transformers' own cache; the decode graphs
    read only the sliding layers' windows (the report says so), global layers the whole past."""
    model = build(arch)
    ids = prompt(24)
    ref = generate(model, ids)
    first = len(kvpr_compile.reports())
    kvpr_compile.hf.compile(model, ratio=ratio)
    out = generate(model, ids, KVPRCache(model.config, 2, 64))
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    mine = kvpr_compile.reports()[first:]
    assert windowed_layers(mine) == set(CONFIGS[arch][1])
    assert all(not r.skipped for r in mine)


@pytest.mark.slow   # an inductor compile: seconds on a CPU
def test_inductor_runs_the_windowed_graph():
    """Inductor's fake shapes of the window (cache_update's, the loads', the assemble's) agree
    with what the kernels return."""
    model = build("gemma2")
    ids = prompt(20)
    ref = generate(model, ids)
    kvpr_compile.hf.compile(model, ratio=0.5, inner="inductor")
    out = generate(model, ids, KVPRCache(model.config, 2, 64))
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streams_load_only_the_window():
    model = build("gemma2").cuda()
    ids = prompt(24).cuda()
    ref = generate(model, ids)
    kvpr_compile.hf.compile(model, ratio=0.5)
    cache = KVPRCache(model.config, 2, 64, device="cuda")
    with traffic.counting() as counted:
        out = generate(model, ids, cache)
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    whole = step_h2d_bytes([0.0, 0.0], 24 + NEW, batch=2, hidden=64, kv_hidden=32,
                           elem_bytes=4) * NEW
    assert 0 < counted.bytes < whole   # the window of layer 0, X and K,V: well under the past


@pytest.mark.parametrize("arch", ["mistral", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_prompt_shorter_than_the_window_reaches_it_while_decoding(arch):
    model = build(arch)
    ids = prompt(5)
    ref = generate(model, ids)
    kvpr_compile.hf.compile(model, ratio=0.5)
    out = generate(model, ids, KVPRCache(model.config, 2, 64))
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("ratio", [0.0, pytest.param(0.5, marks=pytest.mark.slow), 1.0])
def test_left_padding_with_a_window_shorter_than_the_prompt(ratio):
    """Row 0 left-padded by 3 of 12, window 4: the padding leaves the window while decoding;
    the reference is transformers' own cache."""
    model = build("gemma2", sliding_window=4)
    ids = prompt(12)
    mask = torch.ones_like(ids)
    mask[0, :3], ids[0, :3] = 0, 0

    def run(cache=None):
        kw = {} if cache is None else cache_kwargs(model, cache)
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True, **kw)

    ref = run()
    kvpr_compile.hf.compile(model, ratio=ratio)
    out = run(KVPRCache(model.config, 2, 64))
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)


def test_multi_token_calls_past_the_window_match_eager():
    """A 3-token call (a chat's next turn) at a past beyond the window, then decode steps: the
    logits of transformers' own cache, forward by forward."""
    model = build("gemma2")
    chunks = [prompt(20), prompt(3).flip(1), None, None, None]

    @torch.no_grad()
    def run(forward, cache):
        kw, outs = cache_kwargs(model, cache), []
        for chunk in chunks:
            ids = chunk if chunk is not None else outs[-1][:, -1:].argmax(-1)
            outs.append(forward(input_ids=ids, **kw, use_cache=True).logits)
        return outs

    ref = run(model.forward, transformers.DynamicCache(config=model.config))
    first = len(kvpr_compile.reports())
    kvpr_compile.hf.compile(model, ratio=0.5)
    out = run(model.forward, KVPRCache(model.config, 2, 64))
    assert worst_rel_err(out, ref) <= TOL
    notes = [e.note for r in kvpr_compile.reports()[first:] for e in r.layers if e.layer == 0]
    assert any("recomputes K,V[:l] of the past" in n and "sliding window" in n for n in notes)


def test_throughput_schedule_reads_the_window():
    model = build("mistral")
    ids = prompt(20, batch=4)
    ref = generate(model, ids)
    first = len(kvpr_compile.reports())
    kvpr_compile.hf.compile(model, dynamic=True, ratio=0.5, schedule="throughput",
                            micro_batches=2)
    out = generate(model, ids, KVPRCache(model.config, 4, 64))
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    mine = kvpr_compile.reports()[first:]
    assert all(r.schedule == "throughput" for r in mine)
    assert windowed_layers(mine) == {0, 1}


@torch.no_grad()
def _decode(model, ids, cache, steps, forward, poison_before=0, prefill=None):
    """Prefill (through ``prefill``, else ``forward``), poison the stored K/V of positions
    ``[0, poison_before)`` of the sliding layers with NaN, then ``steps`` greedy steps through
    ``forward``; the last-token logits of each step."""
    kw = cache_kwargs(model, cache)
    logits = (prefill or forward)(input_ids=ids, **kw, use_cache=True).logits[:, -1]
    for layer, w in enumerate(sliding_windows(model.config)):
        if w and poison_before:
            store = cache.offloaded
            store.k_cpu[layer][:poison_before] = float("nan")
            store.v_cpu[layer][:poison_before] = float("nan")
    outs = [logits]
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        logits = forward(input_ids=nxt, **kw, use_cache=True).logits[:, -1]
        outs.append(logits)
    return outs


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_keys_before_the_window_are_never_read(ratio):
    """K/V older than every later window (positions [0, 24 - 8 + 1)) poisoned with NaN after a
    prefill of 24: the compiled steps stay finite and exact (eager attention that reads them
    gives NaN even where the mask hides them: the masked scores still multiply V)."""
    model = build("mistral", attn_implementation="eager")
    ids = prompt(24)
    ref = _decode(model, ids, transformers.DynamicCache(config=model.config), 6, model.forward)
    kvpr_compile.hf.compile(model, ratio=ratio)
    out = _decode(model, ids, KVPRCache(model.config, 2, 64), 6, model.forward,
                  poison_before=24 - WINDOW + 1)
    assert worst_rel_err(out, ref) <= TOL


def test_a_cache_filled_uncompiled_recomputes_from_stored_kv_in_the_window():
    """An uncompiled prefill stores no X: the compiled steps' recomputed rows of the window
    come from the stored K,V at the window's own positions."""
    model = build("mistral")
    ids = prompt(24)
    eager = model.forward
    ref = _decode(model, ids, transformers.DynamicCache(config=model.config), 4, eager)
    kvpr_compile.hf.compile(model, ratio=1.0)
    out = _decode(model, ids, KVPRCache(model.config, 2, 64), 4, model.forward, prefill=eager)
    assert worst_rel_err(out, ref) <= TOL


def test_decode_steps_load_only_the_window():
    """Batch 1, prompt 24, window 8, both layers sliding, ratio 0: each decode step loads the
    window's 7 past positions of K,V per layer, whatever the past (the whole past before), and
    that is the bench's physical-limit bytes with the windows."""
    model = build("mistral", num_key_value_heads=1)
    ids = prompt(24, batch=1)
    first = len(kvpr_compile.reports())
    kvpr_compile.hf.compile(model, ratio=0.0)
    cache = KVPRCache(model.config, 1, 64)
    kw = cache_kwargs(model, cache)
    with torch.no_grad():
        logits = model(input_ids=ids, **kw, use_cache=True).logits[:, -1]
        per_step = []
        for _ in range(4):
            with traffic.counting() as counted:
                logits = model(input_ids=logits.argmax(-1, keepdim=True), **kw,
                               use_cache=True).logits[:, -1]
            per_step.append(dict(counted.by_kind))
    row = 2 * 1 * 16 * 4   # K and V of one position: batch 1, 1 KV head, head_dim 16, fp32
    assert per_step == [{"kv": 2 * (WINDOW - 1) * row}] * 4
    # the windowed graphs prefetch their next call's window (the runtime knows the window)
    graphs = [r.graph_module for r in kvpr_compile.reports()[first:] if windowed_layers([r])]
    assert graphs and all(any(n.target is PREFETCH_NEXT for n in g.graph.nodes) for g in graphs)
    assert step_h2d_bytes([0.0, 0.0], 27, batch=1, hidden=64, kv_hidden=16, elem_bytes=4,
                          windows=[WINDOW, WINDOW]) == 2 * (WINDOW - 1) * row


def test_race_free_on_simulated_streams(sim):
    """The CUDA runtime's loads and assemble (at the window's rows of a slot) on simulated
    streams: exact and race-free."""
    from helpers import sim_backend
    model = build("gemma2")
    ids = prompt(20)
    ref = generate(model, ids)
    api = sim()
    model.forward = torch.compile(model.forward, backend=sim_backend(), options={"ratio": 0.5})
    out = generate(model, ids, KVPRCache(model.config, 2, 64))
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    assert api.races.accesses > 100 and api.races.found == []


def test_in_place_assemble_at_the_windows_rows(sim, monkeypatch):
    """``assemble_in_place``: the window's loaded rows sit at their own rows of the slot, the
    recomputed and new ones are written around them, the result is a view from the window's
    first row."""
    from helpers import sim_backend
    from kvpr_compile import config
    from kvpr_compile.runtime.cuda_runtime import CudaRuntime
    model = build("mistral", num_hidden_layers=3)   # each layer meets another's slot
    ids = prompt(20)
    ref = generate(model, ids)
    sim()
    starts = []
    in_place = CudaRuntime._assemble_in_place

    def noted(self, layer, buffers, start, *args):
        starts.append(start)
        return in_place(self, layer, buffers, start, *args)

    monkeypatch.setattr(CudaRuntime, "_assemble_in_place", noted)
    with config.patch(assemble_in_place=True):
        model.forward = torch.compile(model.forward, backend=sim_backend(),
                                      options={"ratio": 0.5})
        out = generate(model, ids, KVPRCache(model.config, 2, 64))
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    assert starts and max(starts) == 20 + NEW - 2 - WINDOW + 1   # the last step's window


def test_a_budget_places_resident_rows_only_in_the_full_attention_layers():
    """Gemma3's layers 0 and 2 slide, layer 1 attends to everything: under a budget the LP puts
    every resident row into layer 1 (a window's past moves, so a sliding layer keeps nothing
    resident and rows planned there would go unused), and generate stays exact."""
    model = build("gemma3_text")
    ids = prompt(20)
    ref = generate(model, ids)
    row = 2 * 2 * 2 * 16 * 4   # one position's K,V of one layer: batch 2, 2 heads of 16, fp32
    positions = 20 + NEW
    budget = 3 * row * (positions + 1) + 2 * 2 * 64 * 4 * (positions + 1) + 3 * 12 * row
    first = len(kvpr_compile.reports())
    kvpr_compile.hf.compile(model, profile="h200-pcie5", gpu_budget_bytes=budget)
    out = generate(model, ids, KVPRCache(model.config, 2, positions))
    assert worst_rel_err(torch.stack(out.logits), torch.stack(ref.logits)) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    plans = [r.plan for r in kvpr_compile.reports()[first:] if r.plan is not None]
    assert plans and all(p.resident_tokens[0] == p.resident_tokens[2] == 0 for p in plans)
    assert all(p.resident_tokens[1] > 0 for p in plans), [p.resident_tokens for p in plans]


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_each_step_uses_the_prefetch_of_the_step_before(sim, arch):
    """A sliding first layer (Mistral: every layer; Gemma2: layer 0) still gets the cross-call
    prefetch: the runtime starts the next call's loads at that call's window (the store's
    windows), before and after the past reaches it, so on simulated streams every decode step
    is served by its predecessor's prefetch, exact and race-free."""
    from helpers import sim_backend
    from kvpr_compile.runtime import cuda_runtime
    model = build(arch)
    ids = prompt(4)   # the past reaches the window while decoding
    ref = generate(model, ids)
    api = sim()
    model.forward = torch.compile(model.forward, backend=sim_backend(), options={"ratio": 0.0})
    cache = KVPRCache(model.config, 2, 64)
    out = generate(model, ids, cache)
    assert worst_rel_err(torch.stack(out.logits), torch.stack(ref.logits)) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    assert api.races.found == []
    rt = cuda_runtime.runtime(cache.offloaded._store, "cpu")
    assert rt.next_call_used == NEW - 1 and rt.next_call_dropped == 0
