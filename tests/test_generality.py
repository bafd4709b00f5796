"""Attention code as written in popular minimal codebases (tests/generality_models.py): each
pattern recomputes (report shows the forced ratio), matches eager at ratios 0 / 0.37 / 1.0, and
at 1.0 still matches with every stored K/V poisoned with NaN after the prefill (so K,V really
come from stored X). Tolerance: max relative error of logits <= 1e-5 (fp32), same greedy tokens."""
from __future__ import annotations

import pytest
import torch

import kvpr_compile
from helpers import decode_steps as decode, max_rel_err, worst_rel_err
from generality_models import PatternModel, make_cache

TOL = 1e-5
STEPS = 5

PATTERNS = {
    "table-int-slice": dict(rope="table-int"),          # Meta reference llama
    "in-graph-rope-low-rank": dict(rope="in-graph"),     # cos/sin (n, d) against K (b, h, n, d)
    "unbind-stack-rope": dict(rope="unbind"),            # llama2.c
    "normalize-qk-norm": dict(rope="in-graph", knorm="normalize"),
    "rmsnorm-k": dict(rope="position-ids", knorm="rms"),
    "layernorm-k": dict(rope="table-int", knorm="ln"),
    "lora-kv": dict(rope="in-graph", lora=True),
    "lora-unbind": dict(rope="unbind", lora=True, kv_heads=4),
}


def _model(kw):
    torch.manual_seed(0)
    return PatternModel(**{"layers": 1, **kw}).eval()   # one layer: compile time is the cost


def _run(kw, ratio, poison=False, position_ids=None, batch=2, prompt_len=7):
    model = _model(kw)
    prompt = torch.randint(0, 83, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    ref = decode(model, prompt, make_cache(model, batch), STEPS, position_ids=position_ids)
    cache = make_cache(model, batch)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": ratio})
    out = decode(compiled, prompt, cache, STEPS, poison=poison, position_ids=position_ids)
    return ref, out, cache


def _decode_reports(since):
    reports = [r for r in kvpr_compile.reports()[since:]
               if r.layers and not any("multi-token" in e.note for e in r.layers)]
    assert reports
    return reports


@pytest.mark.parametrize("ratio", [pytest.param(0.0, marks=pytest.mark.slow), 0.37,
                                   pytest.param(1.0, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_recomputes_exactly(name, ratio):
    """Ratio 1.0 runs by default in the poisoned test below (exact against eager too)."""
    ref, out, _ = _run(PATTERNS[name], ratio)
    assert max_rel_err(out[0], ref[0]) <= TOL
    assert worst_rel_err(out[1], ref[1]) <= TOL
    assert torch.equal(out[2], ref[2])
    report = kvpr_compile.last_report()
    assert not report.skipped, report.skipped
    assert report.ratios == {0: pytest.approx(ratio, abs=1e-3)}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_poisoned_kv_full_recompute(name):
    ref, out, cache = _run(PATTERNS[name], 1.0, poison=True)
    assert worst_rel_err(out[1], ref[1]) <= TOL and torch.equal(out[2], ref[2])
    assert kvpr_compile.last_report().ratios == {0: 1.0}
    assert cache._store.token_len == [7 + STEPS] and cache._store.dropped_tokens == 0


@pytest.mark.parametrize("ratio", [0.37, 1.0])
def test_position_ids_in_decode_only_recompute(ratio):
    """Prefill without position_ids (cos/sin of batch 1), decode with (B, 1) ones (batch B):
    the stored records widen to the batch once and every step recomputes."""
    before = len(kvpr_compile.reports())
    ref, out, cache = _run(dict(rope="position-ids"), ratio, poison=ratio == 1.0,
                           position_ids="decode")
    assert worst_rel_err(out[1], ref[1]) <= TOL and torch.equal(out[2], ref[2])
    assert cache._store.dropped_tokens == 0 and cache._store.token_len == [7 + STEPS]
    assert all(r.ratios[0] == pytest.approx(ratio) for r in _decode_reports(before))


def test_position_ids_in_prefill_only_recompute_when_the_rows_agree():
    """Prefill with (B, n) position_ids (B equal rows of cos/sin), decode without (one row):
    the store narrows its records to one row once, and every step recomputes (poisoned K/V)."""
    before = len(kvpr_compile.reports())
    ref, out, cache = _run(dict(rope="position-ids"), 1.0, poison=True, position_ids="prefill")
    assert worst_rel_err(out[1], ref[1]) <= TOL and torch.equal(out[2], ref[2])
    assert cache._store.dropped_tokens == 0 and cache._store.token_len == [7 + STEPS]
    assert all(r.ratios[0] == 1.0 for r in _decode_reports(before))


def test_position_ids_in_prefill_only_with_rows_that_differ_fall_back_exactly():
    """Row 1's prefill positions are shifted (as with left padding), decode steps pass none:
    one row of cos/sin cannot stand for both, so the stored K,V are used (exact, one warning)."""
    kvpr_compile.report._WARNED.clear()
    model = _model(dict(rope="position-ids"))
    prompt = torch.randint(0, 83, (2, 7), generator=torch.Generator().manual_seed(1))
    shifted = torch.stack([torch.arange(7), (torch.arange(7) - 2).clamp_min(0)])

    @torch.no_grad()
    def run(m, cache):
        outs = [m(prompt, cache, position_ids=shifted)[:, -1]]
        for _ in range(STEPS):
            outs.append(m(outs[-1].argmax(-1, keepdim=True), cache)[:, -1])
        return outs

    ref = run(model, make_cache(model, 2))
    cache = make_cache(model, 2)
    with pytest.warns(UserWarning, match="do not fit this graph"):
        out = run(torch.compile(model, backend="kvpr", options={"ratio": 1.0}), cache)
    assert worst_rel_err(out, ref) <= TOL
    assert cache._store.dropped_tokens > 0


def test_position_ids_everywhere_recompute_under_poison():
    ref, out, cache = _run(dict(rope="position-ids"), 1.0, poison=True, position_ids="both")
    assert worst_rel_err(out[1], ref[1]) <= TOL and torch.equal(out[2], ref[2])
    assert cache._store.dropped_tokens == 0


def test_poison_reaches_a_graph_that_does_not_recompute():
    """The poison test above can fail: at ratio 0 the same poisoned K/V reach the logits."""
    _, out, _ = _run(PATTERNS["table-int-slice"], 0.0, poison=True)
    assert torch.isnan(out[1][0]).all()


def test_hf_llama_prefill_without_position_ids_then_decode_with_them():
    """The generation loop of the issue: prefill without position_ids, decode steps with (B, 1)
    ones, stored K/V poisoned after the prefill: every step still recomputes exactly."""
    import transformers

    from kvpr_compile.hf import KVPRCache, cache_kwargs
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=4, num_hidden_layers=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def run(forward, poison):
        cache, logits = KVPRCache(cfg, 2, 32), []
        out = forward(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits
        if poison:
            for k, v in zip(cache.offloaded.k_cpu, cache.offloaded.v_cpu):
                k.fill_(float("nan"))
                v.fill_(float("nan"))
        nxt = out[:, -1:].argmax(-1)
        for step in range(4):
            out = forward(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True,
                          position_ids=torch.full((2, 1), 7 + step)).logits[:, -1]
            logits.append(out)
            nxt = out.argmax(-1, keepdim=True)
        return logits, cache.offloaded._store

    ref, _ = run(model.forward, False)
    out, store = run(torch.compile(model.forward, backend="kvpr", options={"ratio": 1.0}), True)
    assert worst_rel_err(out, ref) <= TOL
    assert store.token_len == [11, 11] and store.dropped_tokens == 0
