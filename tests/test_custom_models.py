"""Compiled vs eager on decoders that are not from transformers: the built-in Llama, a fused-QKV
nanoGPT-style model and a gpt-fast-style model with complex RoPE and explicit attention.
Tolerance: max relative error of logits <= 1e-5 (fp32), greedy tokens identical."""
from __future__ import annotations

import operator

import pytest
import torch

import kvpr_compile
from helpers import CUSTOM_MODELS, compare_custom, decode_steps, max_rel_err, worst_rel_err
from kvpr_compile.ops.nodes import args_of

TOL = 1e-5
STEPS = 16


# every model at 0.37; ratios 0 and 1 on the built-in Llama (MHA) by default (the others at 1,
# poisoned, and at 0: test_recompute_is_real_poisoned_kv), on every model with --run-slow
@pytest.mark.parametrize("name,ratio", [
    (name, ratio) if ratio == 0.37 or name == "llama-mha"
    else pytest.param(name, ratio, marks=pytest.mark.slow)
    for name in sorted(CUSTOM_MODELS) for ratio in (0.0, 0.37, 1.0)])
def test_compiled_matches_eager(name, ratio):
    ref, out = compare_custom(name, ratio, "eager")
    assert max_rel_err(out[0], ref[0]) <= TOL                 # prefill
    assert worst_rel_err(out[1], ref[1]) <= TOL               # 16 decode steps
    assert torch.equal(out[2], ref[2])                        # greedy tokens
    report = kvpr_compile.last_report()
    assert sorted(report.ratios) == [0, 1] and not report.skipped
    assert all(r == pytest.approx(ratio, abs=1e-3) for r in report.ratios.values())


# inductor compiles C++ on a CPU: the fused-QKV model by default, complex RoPE with --run-slow
@pytest.mark.parametrize("name", ["fused-qkv",
                                  pytest.param("complex-rope", marks=pytest.mark.slow)])
def test_compiled_matches_eager_inductor(name):
    ref, out = compare_custom(name, 0.37, "inductor")
    assert max_rel_err(out[0], ref[0]) <= TOL
    assert worst_rel_err(out[1], ref[1]) <= TOL
    assert torch.equal(out[2], ref[2])
    assert kvpr_compile.last_report().ratios == {0: pytest.approx(0.37), 1: pytest.approx(0.37)}


@pytest.mark.parametrize("name", ["llama-gqa", "complex-rope", "fused-qkv"])
def test_recompute_is_real_poisoned_kv(name):
    """NaN in every stored K/V after prefill: ratio 1.0 rebuilds K,V from stored X and still
    matches the clean eager run; ratio 0 (which reads the stored K/V) must not."""
    model, new_cache = CUSTOM_MODELS[name]()
    prompt = torch.randint(0, 89, (2, 9), generator=torch.Generator().manual_seed(4))
    ref = decode_steps(model, prompt, new_cache(2), 6)
    full = torch.compile(model, backend="kvpr", options={"ratio": 1.0})
    out = decode_steps(full, prompt, new_cache(2), 6, poison=True)
    assert worst_rel_err(out[1], ref[1]) <= TOL and torch.equal(out[2], ref[2])
    torch._dynamo.reset()
    none = torch.compile(model, backend="kvpr", options={"ratio": 0.0})
    bad = decode_steps(none, prompt, new_cache(2), 6, poison=True)
    assert torch.isnan(bad[1][0]).all()


def test_decode_loop_compiles_at_most_three_graphs():
    model, new_cache = CUSTOM_MODELS["llama-gqa"]()
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.5})
    before = len(kvpr_compile.reports())
    prompt = torch.randint(0, 89, (2, 5), generator=torch.Generator().manual_seed(5))
    decode_steps(compiled, prompt, new_cache(2), 64)
    assert len(kvpr_compile.reports()) - before <= 3


def test_ratio_is_annotated_on_the_graph():
    model, new_cache = CUSTOM_MODELS["llama-mha"]()
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.25})
    decode_steps(compiled, torch.zeros(1, 4, dtype=torch.long), new_cache(1), 3)
    report = kvpr_compile.last_report()
    nodes = [n for n in report.graph_module.graph.nodes if "kvpr_ratio" in n.meta.get("custom", {})]
    ops = {n.target for n in nodes if n.op == "call_function"}
    assert {torch.ops.kvpr.load_kv.default, torch.ops.kvpr.load_tokens.default,
            torch.ops.kvpr.store_tokens.default, torch.ops.kvpr.assemble.default} <= ops
    assert all(n.meta["custom"]["kvpr_ratio"] == 0.25 for n in nodes)
    assert {n.meta["custom"]["kvpr_layer"] for n in nodes} == {0, 1}
    nodes = report.graph_module.graph.nodes
    assert not any(n.target == torch.ops.kvpr.cache_update.default for n in nodes)
    text = str(report)
    assert "layer" in text and "0.250" in text


def test_cache_filled_uncompiled_then_compiled_decode_falls_back_to_stored_kv():
    """X is only stored by compiled graphs: an eager prefill leaves nothing to recompute from,
    and the compiled decode must then load those positions instead (still exact)."""
    model, new_cache = CUSTOM_MODELS["llama-mha"]()
    prompt = torch.randint(0, 89, (2, 6), generator=torch.Generator().manual_seed(6))
    ref = decode_steps(model, prompt, new_cache(2), 5)
    cache = new_cache(2)
    with torch.no_grad():
        prefill = model(prompt, cache)                        # uncompiled
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 1.0})
    nxt, logits = prefill[:, -1].argmax(-1, keepdim=True), []
    with torch.no_grad():
        for _ in range(5):
            out = compiled(nxt, cache)[:, -1]
            logits.append(out)
            nxt = out.argmax(-1, keepdim=True)
    assert worst_rel_err(logits, ref[1]) <= TOL


def test_scheduler_ratios_reach_the_graph_and_the_report(monkeypatch):
    """Without a forced ratio the scheduler picks per-layer ratios from the profile (GQA 2:1 here
    would be 0, MHA on the H200 preset recomputes), and the report prints its per-layer plan."""
    monkeypatch.delenv("KVPR_PROFILE", raising=False)
    model, new_cache = CUSTOM_MODELS["llama-mha"]()
    compiled = torch.compile(model, backend="kvpr",
                             options={"profile": "h200-pcie5", "overlap": "row"})
    prompt = torch.randint(0, 89, (2, 5), generator=torch.Generator().manual_seed(7))
    ref = decode_steps(model, prompt, new_cache(2), 4)
    out = decode_steps(compiled, prompt, new_cache(2), 4)
    assert worst_rel_err(out[1], ref[1]) <= TOL
    report = kvpr_compile.last_report()
    assert report.plan is not None and "h200-pcie5" in report.ratio_source
    ratios = [report.ratios[i] for i in sorted(report.ratios)]
    assert ratios == pytest.approx(report.plan.ratios, abs=1e-3)
    assert 0 < min(report.plan.ratios) < 1          # the row schedule's interior optimum
    text = str(report)
    assert "predicted step" in text and "full-KV" in text


@pytest.mark.parametrize("name,prompt_len", [("llama-mha", 16), ("complex-rope", 8)])
def test_prompt_as_long_as_a_feature_dim_still_stores_x(name, prompt_len):
    """RoPE tables then have two dims of the token count; the token axis is traced from the
    cache's K instead, so the prefill still stores X and later steps recompute it."""
    model, new_cache = CUSTOM_MODELS[name]()
    prompt = torch.randint(0, 89, (2, prompt_len), generator=torch.Generator().manual_seed(8))
    ref = decode_steps(model, prompt, new_cache(2), 4)
    cache = new_cache(2)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 1.0})
    out = decode_steps(compiled, prompt, cache, 4)
    assert worst_rel_err(out[1], ref[1]) <= TOL and torch.equal(out[2], ref[2])
    assert all(not r.skipped for r in kvpr_compile.reports()[-2:])
    assert cache._store.token_len == [prompt_len + 4] * 2     # X stored from the prefill on


def test_ratio_zero_layers_keep_no_x():
    """A layer planned at ratio 0 never reads X, so none is shipped or kept (for GQA 4:1, X
    would take twice the memory of the K/V cache itself)."""
    model, new_cache = CUSTOM_MODELS["llama-gqa"]()
    prompt = torch.randint(0, 89, (2, 5), generator=torch.Generator().manual_seed(9))
    ref = decode_steps(model, prompt, new_cache(2), 4)
    cache = new_cache(2)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.0})
    out = decode_steps(compiled, prompt, cache, 4)
    assert worst_rel_err(out[1], ref[1]) <= TOL and torch.equal(out[2], ref[2])
    assert cache._store.tokens == [[], []] and cache._store.token_len == [0, 0]


def test_batch_size_change_reuses_a_dynamic_graph_and_keeps_layer_ahead_loads():
    """A second batch size makes Dynamo's batch dim symbolic; the loads' sizes then come from
    graph inputs (not raw symbols), stay exact, and can still be issued a layer ahead."""
    model, new_cache = CUSTOM_MODELS["llama-gqa"]()
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.5})
    for batch, plen in [(2, 7), (3, 7), (4, 9)]:
        prompt = torch.randint(0, 89, (batch, plen), generator=torch.Generator().manual_seed(batch))
        ref = decode_steps(model, prompt, new_cache(batch), 4)
        out = decode_steps(compiled, prompt, new_cache(batch), 4)
        assert worst_rel_err(out[1], ref[1]) <= TOL and torch.equal(out[2], ref[2])
    graph = kvpr_compile.last_report().graph_module.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    kvpr = torch.ops.kvpr
    load1 = [n for n in graph.nodes if n.target == kvpr.load_kv.default and args_of(n).layer == 1]
    asm0 = [n for n in graph.nodes if n.target == kvpr.assemble.default and args_of(n).layer == 0]
    assert load1 and asm0 and order[load1[0]] < order[asm0[0]]
    load = args_of(load1[0])
    assert any(isinstance(a, torch.fx.Node) for a in (load.batch, load.heads, load.head_dim))


def test_fused_qkv_recomputes_only_the_kv_columns():
    model, new_cache = CUSTOM_MODELS["fused-qkv"]()
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 1.0})
    decode_steps(compiled, torch.zeros(2, 5, dtype=torch.long), new_cache(2), 3)
    report = kvpr_compile.last_report()
    assert all("K/V columns only" in e.note for e in report.layers)
    recompute = [n for n in report.graph_module.graph.nodes
                 if n.meta.get("custom", {}).get("kvpr_role") == "recompute"
                 and n.target is torch._C._nn.linear]
    weights = [n.args[1] for n in recompute]
    # the weight is sliced to rows [dim, 3*dim) of c_attn (K and V), not all of q|k|v
    assert weights and all(w.target is operator.getitem and w.args[1] == (slice(48, 144),)
                           for w in weights)


@pytest.mark.quick
def test_rows_past_the_stored_x_never_leak_into_results():
    """Compiled prefill, then uncompiled steps (no X for them), then compiled steps at ratio 1.0:
    the X rows past the stored prefix hold whatever memory held (NaN here); the recompute still
    runs over them and assemble must replace every such row by the stored K/V."""
    model, new_cache = CUSTOM_MODELS["llama-mha"]()
    prompt = torch.randint(0, 89, (2, 6), generator=torch.Generator().manual_seed(10))
    ref = decode_steps(model, prompt, new_cache(2), 6)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 1.0})
    cache = new_cache(2)
    with torch.no_grad():
        logits = [compiled(prompt, cache)[:, -1]]
        store = cache._store
        for layer in range(2):
            for rows in store.tokens[layer]:
                rows[store.token_len[layer]:] = float("nan")
        for step in range(6):
            run = model if step < 2 else compiled
            logits.append(run(ref[2][:, step:step + 1], cache)[:, -1])
    assert store.token_len == [6, 6]
    assert worst_rel_err(logits[1:], ref[1]) <= TOL
