"""The throughput schedule's execution (schedule="throughput"): micro-batches in column order,
exact against the uncompiled model with the same cache type; the stored K/V really replaced by
recompute; one store per micro-batch; weight hooks once per layer per step; bad input refused
before the cache is touched; graphs the column order cannot run keep the latency schedule."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import kvpr_compile
from custom_models import FusedQKVModel, make_cache
from helpers import (batch_prompt, decode_steps, hf_build, hf_generate, throughput_compile,
                     throughput_llama, worst_rel_err)

TOL = 1e-5
STEPS = 2


def _check(model, cache_of, batch, m, ratio=1.0, poison=False):
    prompt = batch_prompt(batch)
    want_pre, want, want_tokens = decode_steps(model, prompt, cache_of(model, batch), STEPS)
    compiled = throughput_compile(model, micro_batches=m, ratio=ratio)
    cache = cache_of(model, batch)
    got_pre, got, got_tokens = decode_steps(compiled, prompt, cache, STEPS, poison=poison)
    report = kvpr_compile.last_report()
    assert report.schedule == "throughput", str(report)
    assert sum(report.micro_batches) == batch and len(report.micro_batches) == m
    assert max(report.micro_batches) - min(report.micro_batches) <= 1
    assert worst_rel_err([got_pre, *got], [want_pre, *want]) <= TOL
    assert torch.equal(got_tokens, want_tokens)
    return cache


@pytest.mark.slow   # the default run covers [5, 2] (poison test) and [2, 1, 1, 1] (HF Llama)
@pytest.mark.parametrize("batch,m", [(4, 1), (4, 4), (7, 4)])
def test_custom_llama_matches_eager(batch, m):
    _check(throughput_llama(), lambda model, b: model.make_cache(b), batch, m)


@pytest.mark.parametrize("arch,m", [pytest.param("opt", 2, marks=pytest.mark.slow), ("llama", 4)])
def test_hf_generate_matches_eager(arch, m):
    """HF OPT and Llama (MHA) through generate(), set up by compile_throughput: batch 5 as
    [3, 2] and as [2, 1, 1, 1]."""
    pytest.importorskip("transformers")
    model = hf_build(arch)
    ids = torch.randint(1, 128, (5, 7), generator=torch.Generator().manual_seed(1))
    want = hf_generate(model, ids)
    stream = arch == "opt"   # OPT (slow run): its decoder layers' weights streamed too
    setup = kvpr_compile.compile_throughput(model, 5, m, stream=stream, ratio=1.0)
    assert setup.step is model.forward and setup.placement == ("streamed" if stream else "resident")
    got = hf_generate(model, ids)
    report = kvpr_compile.last_report()
    assert report.schedule == "throughput" and len(report.micro_batches) == m
    assert report.weights.startswith("streamed" if stream else "resident")
    assert worst_rel_err(got.logits, want.logits) <= TOL
    assert torch.equal(got.sequences, want.sequences)


@pytest.mark.slow
def test_gpt2_size_nodes_fall_back_exactly():
    """GPT-2 under dynamic=True reshapes to a torch.Size built in the graph: those sites stay
    plain cache reads (a warning), and generate() is still exact (it crashed before)."""
    pytest.importorskip("transformers")
    model = hf_build("gpt2")
    ids = torch.randint(1, 128, (5, 7), generator=torch.Generator().manual_seed(1))
    want = hf_generate(model, ids)
    kvpr_compile.compile_throughput(model, 5, 2, ratio=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = hf_generate(model, ids)
    assert any("size computed in the graph" in str(w.message) for w in caught)
    assert worst_rel_err(got.logits, want.logits) <= TOL
    assert torch.equal(got.sequences, want.sequences)


@pytest.mark.parametrize("m", [1, 2])
def test_fused_qkv_decoder_matches_eager(m):
    torch.manual_seed(0)
    _check(FusedQKVModel(layers=2).eval(), lambda model, b: make_cache(model, b), 5, m)


@pytest.mark.quick
def test_poisoned_stored_kv_still_matches_eager():
    """Batch 5 as [3, 2]. After the prefill every stored K,V is NaN (written through k_cpu,
    which merges the micro-batch stores back): at ratio 1 the decode steps recompute all past K,V
    from stored X, so the result is still exact, although the micro-batch stores they read (one
    per micro-batch, sequence-major over its own rows) hold the NaN."""
    cache = _check(throughput_llama(), lambda model, b: model.make_cache(b), 5, 2, poison=True)
    parts = cache._store.parts
    assert [p.batch_size for p in parts] == [3, 2]
    assert all(p.k[0].is_contiguous() and p.k[0].shape[1] == p.batch_size for p in parts)
    assert all(torch.isnan(p.k[layer][:6]).all() and torch.isnan(p.v[layer][:6]).all()
               for p in parts for layer in range(2))


def test_cache_stays_meaningful_to_uncompiled_code():
    """A cache filled by the compiled throughput prefill, continued uncompiled: the same
    logits as an uncompiled run all along (k_cpu / eager reads see the parts' contents)."""
    model, batch = throughput_llama(), 5
    prompt = batch_prompt(batch)
    ref_cache = model.make_cache(batch)
    with torch.no_grad():
        model(prompt, ref_cache)
        want = model(prompt[:, :1], ref_cache)
        cache = model.make_cache(batch)
        throughput_compile(model, micro_batches=2, ratio=1.0)(prompt, cache)
        got = model(prompt[:, :1], cache)
    assert worst_rel_err([got], [want]) <= TOL
    assert cache._store.parts is None   # made whole for the uncompiled access


def test_planned_split_and_gqa_plans_no_recompute():
    """micro_batches=None and no ratio: the throughput planner picks both; grouped-query
    attention gets ratio 0 everywhere (weights still streamed), and the result is exact."""
    ref = throughput_llama(layers=3, kv_heads=1)
    model = copy.deepcopy(ref)
    prompt = batch_prompt(4)
    want_pre, want, want_tokens = decode_steps(ref, prompt, ref.make_cache(4), STEPS)
    compiled = kvpr_compile.compile_throughput(model, 4, stream=True, profile="h200-pcie5").step
    got_pre, got, got_tokens = decode_steps(compiled, prompt, model.make_cache(4), STEPS)
    report = kvpr_compile.last_report()
    assert report.schedule == "throughput" and report.plan is not None
    assert report.weights.startswith("streamed")
    assert report.micro_batches == report.plan.micro_batches
    assert all(r == 0.0 for r in report.plan.ratios) and all(e.ratio == 0 for e in report.layers)
    assert worst_rel_err([got_pre, *got], [want_pre, *want]) <= TOL
    assert torch.equal(got_tokens, want_tokens)


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("m", [0, -2, True, 2.0, "2"])
def test_bad_micro_batches_are_named(m):
    from kvpr_compile.options import parse_options
    with pytest.raises(ValueError, match="micro_batches.*" + repr(m).replace(".", r"\.")):
        parse_options({"schedule": "throughput", "micro_batches": m})


def test_bad_schedule_and_latency_only_options_are_named():
    from kvpr_compile.options import parse_options
    with pytest.raises(ValueError, match="'sideways'"):
        parse_options({"schedule": "sideways"})
    with pytest.raises(ValueError, match="micro_batches.*throughput"):
        parse_options({"micro_batches": 2})


def test_more_micro_batches_than_rows_raises_before_writing():
    model = throughput_llama()
    compiled = throughput_compile(model, micro_batches=6, ratio=1.0)
    cache = model.make_cache(5)
    before = [t.clone() for t in cache.k_cpu]
    with pytest.raises(ValueError, match=r"micro_batches'\]=6 is larger than the batch \(5 rows\)"):
        compiled(batch_prompt(5), cache)
    assert cache.seq_len(0) == 0 and cache._store.parts is None
    assert all(torch.equal(a, b) for a, b in zip(cache.k_cpu, before))


def test_budget_below_two_layers_and_a_micro_batch_is_named():
    model = throughput_llama()
    compiled = throughput_compile(model, micro_batches=2, ratio=1.0, gpu_budget_bytes=1000)
    cache = model.make_cache(5)
    with pytest.raises(ValueError, match=r"gpu_budget_bytes'\]=1000 is below the throughput "
                                         r"working set \d+ bytes for micro-batches \[3, 2\]"):
        compiled(batch_prompt(5), cache)
    assert cache.seq_len(0) == 0 and cache._store.parts is None


def test_static_batch_keeps_the_latency_schedule_with_one_warning():
    model = throughput_llama()
    prompt = batch_prompt(4)
    compiled = torch.compile(model, backend="kvpr",
                             options={"schedule": "throughput", "micro_batches": 2, "ratio": 1.0})
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want_pre = model(prompt, model.make_cache(4))
        got_pre = compiled(prompt, model.make_cache(4))
    assert any("static" in str(w.message) and "latency" in str(w.message) for w in caught)
    assert kvpr_compile.last_report().schedule == "latency"
    assert worst_rel_err([got_pre], [want_pre]) <= TOL


class RowMixer(torch.nn.Module):
    """A decoder whose layer adds the batch mean: rows depend on each other."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = FusedQKVModel(layers=2).eval()
        self.blocks, self.heads, self.head_dim = self.inner.blocks, 4, 12
        self.num_kv_heads = 4

    def forward(self, tokens, cache):
        logits = self.inner(tokens, cache)
        return logits + logits.mean(0, keepdim=True).sum() * 0 + logits.mean(0, keepdim=True)


def test_ops_mixing_rows_keep_the_latency_schedule():
    model = RowMixer()
    prompt = batch_prompt(4)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want_pre = model(prompt, make_cache(model, 4))
        compiled = throughput_compile(model, micro_batches=2, ratio=1.0)
        got_pre = compiled(prompt, make_cache(model, 4))
    assert any("batch" in str(w.message) and "latency" in str(w.message) for w in caught)
    assert kvpr_compile.last_report().schedule == "latency"
    assert worst_rel_err([got_pre], [want_pre]) <= TOL


# ---- weight slots on simulated streams --------------------------------------------------------
def _log_weight_reads(runner, stream, api, release_per_micro_batch=False):
    """Every micro-batch's run of a segment reads the slots of the layers the segment makes
    ready (logged on the compute stream). ``release_per_micro_batch``: the negative control,
    a runner that releases a layer's slot after each micro-batch instead of after the last."""
    for seg in runner.segments:
        layers = [args[1] for _, args in seg.before]
        after, module = list(seg.after), seg.module

        def run(*args, module=module, layers=layers, after=after):
            for layer in layers:
                for buf in stream.slots[layer % stream.num_slots].buffers.values():
                    api.races.read(api.current, buf, f"weights of layer {layer}")
            out = module(*args)
            if release_per_micro_batch:
                for _, (handle, layer) in after:
                    stream.release(layer)
            return out
        seg.module = run
        if release_per_micro_batch:
            seg.after = []


def test_streamed_weights_in_column_order_on_simulated_streams(sim_api):
    """Set up by compile_throughput (the benchmark's entry) with the weights streamed, batch 5 as
    [3, 2], the cache steps and the weight copies on simulated streams: exact against the
    resident model; each layer's weights_ready / weights_release once per step, not once per
    micro-batch; no slot read before its copy landed or refilled while a later micro-batch still
    reads it. Negative control on the same compiled steps: releasing after every micro-batch is a
    race."""
    ref = throughput_llama(layers=4)
    model = copy.deepcopy(ref)
    with pytest.raises(ValueError, match="micro_batches=6 is larger than the batch"):
        kvpr_compile.compile_throughput(model, 5, 6)
    setup = kvpr_compile.compile_throughput(model, 5, 2, stream=True, ratio=1.0)
    stream, compiled = setup.weights, setup.step
    assert setup.placement == "streamed" and stream.api is sim_api
    calls = []
    ready, release = stream.ready, stream.release
    stream.ready = lambda layer: (calls.append(("ready", layer)), ready(layer))[1]
    stream.release = lambda layer: (calls.append(("release", layer)), release(layer))[1]
    prompt = batch_prompt(5)
    want_pre, want, _ = decode_steps(ref, prompt, ref.make_cache(5), STEPS)
    cache = model.make_cache(5)
    got_pre, got, _ = decode_steps(compiled, prompt, cache, STEPS)
    assert worst_rel_err([got_pre, *got], [want_pre, *want]) <= TOL
    report = kvpr_compile.last_report()
    assert report.weights.startswith("streamed") and report.micro_batches == [3, 2]
    # one GraphModule per layer segment (plus the embedding's), shared by the micro-batches
    assert len(report.runner.segments) == 5 and report.runner.cut_rule == "weights_ready"
    steps = 1 + STEPS
    assert len(calls) == 2 * 4 * steps
    for layer in range(4):   # per step: ready then release, once each
        assert calls.count(("ready", layer)) == steps and calls.count(("release", layer)) == steps
    assert calls[:8] == [(kind, j) for j in range(4) for kind in ("ready", "release")]
    assert stream.on_demand == 0
    token = prompt[:, :1].contiguous()   # laid out as the decode steps' tokens: no recompile
    with torch.no_grad():
        _log_weight_reads(report.runner, stream, sim_api)
        compiled(token, cache)
        assert sim_api.races.accesses > 20 and sim_api.races.found == []
        _log_weight_reads(report.runner, stream, sim_api, release_per_micro_batch=True)
        compiled(token, cache)
    assert kvpr_compile.last_report() is report   # the logged runner is the one that ran
    assert any("weights of layer" in r or "copy destination" in r for r in sim_api.races.found)


def test_an_inner_the_segments_do_not_use_is_named_once():
    from kvpr_compile import report as report_mod
    report_mod._WARNED.clear()
    model, prompt = throughput_llama(), batch_prompt(3)
    want = decode_steps(model, prompt, model.make_cache(3), STEPS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = throughput_compile(model, micro_batches=2, ratio=0.5, inner="piecewise")
        got = decode_steps(compiled, prompt, model.make_cache(3), STEPS)
    assert worst_rel_err(got[1], want[1]) <= TOL and torch.equal(got[2], want[2])
    named = [w for w in caught if "inner='piecewise' not used" in str(w.message)]
    assert len(named) == 1 and kvpr_compile.last_report().schedule == "throughput"
