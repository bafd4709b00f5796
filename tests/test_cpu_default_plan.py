"""The default plan on a CPU device: no link to save, so ratio 0 unless a ratio is forced or a
profile named; and the report names no X for a layer at ratio 0 (none is kept)."""
from __future__ import annotations

import pytest
import torch

import kvpr_compile
from helpers import decode_seeded, tiny_llama, worst_rel_err
from kvpr_compile.report import CPU_NO_LINK, NO_X, decode_graph_report
from kvpr_compile.runtime import traffic

STEPS = 3
LAYERS, BATCH, HIDDEN, PROMPT = 2, 2, 64, 6   # helpers.tiny_llama and SEEDED_PROMPT (MHA)


def _run(options):
    """Eager and compiled decode of the seeded tiny Llama: (errors, tokens equal, traffic of
    the decode steps, the decode graph's report)."""
    model = tiny_llama(layers=LAYERS)
    ref = decode_seeded(model, model.make_cache(BATCH, 96), STEPS)
    compiled = torch.compile(model, backend="kvpr", options=options)
    first = len(kvpr_compile.reports())
    with traffic.counting() as counted:
        out = decode_seeded(model, model.make_cache(BATCH, 96), STEPS, compiled)
    rep = decode_graph_report(kvpr_compile.reports()[first:])
    return worst_rel_err(out[0], ref[0]), torch.equal(out[1], ref[1]), counted, rep


def test_cpu_default_plans_ratio_zero_and_says_why(monkeypatch):
    monkeypatch.delenv("KVPR_PROFILE", raising=False)
    err, same, counted, rep = _run({})
    assert err <= 1e-5 and same
    assert rep.ratio_source == CPU_NO_LINK and "options['ratio']" in str(rep)
    assert rep.plan is None and all(e.ratio == 0 and e.requested == 0 for e in rep.layers)
    # full K,V of every past position each step, no X: pasts 6, 7, 8 (fp32, MHA: h_kv = h)
    full_kv = sum(LAYERS * 2 * BATCH * past * HIDDEN * 4 for past in range(PROMPT, PROMPT + STEPS))
    assert counted.by_kind["tokens"] == 0 and counted.by_kind["kv"] == full_kv


@pytest.mark.parametrize("how", ["option", "env"])
def test_a_named_profile_still_plans_recompute_on_a_cpu(monkeypatch, how):
    monkeypatch.delenv("KVPR_PROFILE", raising=False)
    if how == "env":
        monkeypatch.setenv("KVPR_PROFILE", "h200-pcie5")
    err, same, counted, rep = _run({"profile": "h200-pcie5"} if how == "option" else {})
    assert err <= 1e-5 and same
    assert "h200-pcie5" in rep.ratio_source and rep.plan is not None
    assert max(e.ratio for e in rep.layers) > 0 and counted.by_kind["tokens"] > 0


def test_report_names_no_x_for_a_layer_at_ratio_zero():
    err, same, counted, rep = _run({"ratio": 0.0})
    assert err <= 1e-5 and same and counted.by_kind["tokens"] == 0
    assert [e.x_node for e in rep.layers] == [NO_X] * LAYERS
    text = str(rep)
    assert text.count(NO_X) == LAYERS
    _, _, _, recomputing = _run({"ratio": 0.5})
    assert all(e.x_node != NO_X for e in recomputing.layers)
    assert NO_X not in str(recomputing)
