"""The CPU share chosen by the latency LP (options ``cpu_ratio`` None, the default): the plan
stage takes l_i and u_i from one solve (plan/cpu_ratios.py, or the budget's placement), the
rewrite attends u_i of each layer's past on the CPU. Exact against eager; the report names the
share and where it comes from; no host rate in the profile plans no CPU share; a forced share
that nothing planned runs with a warning."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import kvpr_compile
from helpers import decode_seeded, tiny_llama, worst_rel_err
from kvpr_compile.plan.presets import PRESETS
from kvpr_compile.runtime import traffic

TOL = 1e-5
STEPS = 8
# the h200 preset with a host that attends at 50 GB/s and a 20 us round trip
HOST = dataclasses.replace(PRESETS["h200-pcie5"], name="h200-host50", round_trip_s=20e-6,
                           cpu_attention_bytes_per_s={"float32": 50e9, "float16": 50e9})


def _compiled_run(model, options, steps=STEPS):
    compiled = torch.compile(model, backend="kvpr", options=options)
    cache = model.make_cache(2, 96)
    out = decode_seeded(model, cache, steps, compiled)
    return compiled, cache, out, kvpr_compile.last_report()


def _kv_bytes_of_one_step(compiled, cache) -> int:
    with torch.no_grad(), traffic.counting() as counted:
        compiled(torch.zeros(2, 1, dtype=torch.long), cache)
    return counted.by_kind["kv"]


def test_the_lp_chooses_a_cpu_share_from_the_profiles_host_rate(path):
    """MHA (h = h_kv): at a 50 GB/s host the LP attends part of every layer's past on the CPU
    next to recompute; the graph does what it planned, exact, and loads fewer K,V bytes than
    the same split with nothing on the CPU."""
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    compiled, cache, out, report = _compiled_run(model, {"profile": HOST})
    assert worst_rel_err(out[0], ref[0]) <= TOL
    assert torch.equal(out[1], ref[1])
    planned = report.plan.cpu_ratios
    assert all(u > 0 for u in planned), planned
    assert "CPU share: host attention 50 GB/s" in report.ratio_source
    applied = {e.layer: e.cpu for e in report.layers}
    assert applied == pytest.approx({i: u for i, u in enumerate(planned)}, abs=1e-3)
    if path == "cpu":
        with_cpu = _kv_bytes_of_one_step(compiled, cache)
        torch._dynamo.reset()
        ratios = report.plan.ratios
        kept = {"profile": HOST, "cpu_ratio": 0.0, "ratio": min(ratios)}
        compiled0, cache0, _, _ = _compiled_run(model, kept)
        assert with_cpu < _kv_bytes_of_one_step(compiled0, cache0)


def test_no_host_rate_plans_no_cpu_share():
    model = tiny_llama()
    _, _, _, report = _compiled_run(model, {"profile": "h200-pcie5"}, steps=1)
    assert all(e.cpu == 0.0 for e in report.layers)
    assert "CPU share: " in report.ratio_source
    assert not any(report.plan.cpu_ratios)


def test_a_budgets_placement_carries_the_lps_cpu_share():
    """Under a budget the LP at the cache's full length (96) places r_i, l_i and u_i (at this
    size only with a round trip near 0); the CPU share it chose is applied too, exact over 40
    steps, whose past passes the resident caps so that all three shares are at work."""
    model = tiny_llama()
    steps = 40
    ref = decode_seeded(model, model.make_cache(2, 96), steps)
    budget = 3 * 1024 * 97 + 200 * 1024   # the working set and room for 200 tokens
    near = dataclasses.replace(HOST, round_trip_s=1e-7)
    _, cache, out, report = _compiled_run(model, {"profile": near, "gpu_budget_bytes": budget},
                                          steps)
    assert worst_rel_err(out[0], ref[0]) <= TOL
    assert torch.equal(out[1], ref[1])
    assert "placed under a budget" in report.ratio_source
    planned = report.plan.cpu_ratios
    assert all(planned) and all(report.plan.resident_tokens), report.plan
    assert max(cache._store.resident.filled) < 6 + steps   # the past reaches past the caps
    assert [e.cpu for e in report.layers] == pytest.approx(planned, abs=1e-3)


def test_a_forced_share_without_a_host_rate_runs_with_a_warning():
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _, _, out, report = _compiled_run(model, {"profile": "h200-pcie5", "cpu_ratio": 0.25})
    assert worst_rel_err(out[0], ref[0]) <= TOL
    said = [str(w.message) for w in seen if "plan did not choose it" in str(w.message)]
    assert said and "cpu_ratio']=0.25" in said[0] and "kvpr profile --host" in said[0]
    assert all(e.cpu == 0.25 for e in report.layers)


@pytest.mark.parametrize("measured", ["other", "same"])
def test_a_host_rate_measured_at_other_threads_than_the_workers_is_said(monkeypatch, measured):
    """The plan counts on the profile's host rate; measured at another thread count than the
    CPU worker attends with, it says so once (naming both counts and the fix); at the same count
    it says nothing."""
    from kvpr_compile.ops import attention
    monkeypatch.setattr(attention, "WORKER_THREADS", 2)
    threads = 5 if measured == "other" else 2
    profile = dataclasses.replace(HOST, name=f"h200-host50-{measured}-threads",
                                  cpu_attention_threads=threads)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _, _, _, report = _compiled_run(tiny_llama(), {"profile": profile}, steps=1)
    assert any(report.plan.cpu_ratios)
    said = [str(w.message) for w in seen if "CPU worker attends with" in str(w.message)]
    if measured == "same":
        assert not said
    else:
        assert len(said) == 1 and "measured at 5 torch threads" in said[0]
        assert "attends with 2" in said[0] and "WORKER_THREADS = 5" in said[0]
