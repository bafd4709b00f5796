"""The plan side of CPU co-attention: the host's rates in the profile, the host task in the cost
model and task graph, the LP's fourth fraction, `kvpr plan --cpu-attention-gbps` and
`kvpr profile --host`, and their refusals of bad input."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from kvpr_compile.plan import cost_model as cm
from kvpr_compile.plan import host_measure
from kvpr_compile.plan.cpu_ratios import choose_cpu_ratios
from kvpr_compile.plan.cpu_terms import with_cpu_terms
from kvpr_compile.plan.latency_lp import plan_split
from kvpr_compile.plan.presets import PRESETS, preset
from kvpr_compile.plan.profile import HardwareProfile
from kvpr_compile.plan.taskgraph import build_task_graph, plan_task_graph, predicted_step_time
from helpers import kvpr_cli

pytestmark = pytest.mark.quick

H200 = PRESETS["h200-pcie5"]
GQA = dict(batch_size=16, hidden_size=4096, kv_hidden_size=1024, dtype=torch.float16)
MHA = dict(batch_size=16, hidden_size=4096, kv_hidden_size=4096, dtype=torch.float16)
TRIP = 30e-6


@pytest.fixture(autouse=True)
def _isolated(isolated_profiles):
    pass


kvpr = kvpr_cli   # tests read as the command line


def cpu_coefficients(rate=50e9, trip=TRIP, seq_len=1024, dims=GQA, profile=H200):
    c = cm.layer_coefficients(profile, seq_len=seq_len, **dims)
    return with_cpu_terms(c, profile, **dims, cpu_attention_bytes_per_s=rate, round_trip_s=trip)


def test_gqa_with_a_host_near_the_link_attends_about_half_and_halves_the_step():
    # 50 GB/s host next to a 55 GB/s link: the link carries about half the past, the host
    # attends the other half; the step is about half the full-K,V link limit (not quite: the
    # host waits for each layer's query and the GPU's work after the merge waits for it)
    s = 4096
    plan = plan_split(H200, num_layers=6, seq_len=s, **GQA, cpu_attention_bytes_per_s=50e9,
                      cpu_round_trip_s=TRIP)
    assert all(0.4 * s < u < 0.6 * s for u in plan.cpu_tokens), plan.cpu_tokens
    assert plan.recompute_tokens == [0] * 6 and plan.cpu_ratios == [u / s for u in plan.cpu_tokens]
    assert 0.45 < plan.predicted_step_s / plan.baseline_link_limit_s < 0.6
    assert plan.predicted_step_s < 0.6 * plan.baseline_step_s
    # a layer costs the longer of the link's share and the host's chain; past the first
    # layers (where the link runs ahead of a host that starts with the first query) they balance
    c = plan.coefficients
    for i in range(1, 5):
        u = plan.cpu_tokens[i]
        link = c.kv_load_s(0, 0, u) + c.store_s
        host = c.cpu_s(u) + c.post_merge_s
        assert plan.layer_times_s[i] == pytest.approx(max(link, host), rel=2e-3)
        if i >= 3:
            assert link == pytest.approx(host, rel=2e-3)
    assert "CPU share" in str(plan)
    # the bytes loaded drop by the share
    assert sum(plan.h2d_bytes) == sum(c.kv_bytes_per_token * (s - u) for u in plan.cpu_tokens)


@pytest.mark.parametrize("overlap", cm.OVERLAPS)
def test_bare_model_balances_link_and_host_from_first_principles(overlap):
    # No append, no rest of the layer, no round trip: the link's (s - u)/v and the host's
    # u/v_cpu balance at u = s * v_cpu / (v + v_cpu), and the step is v / (v + v_cpu) of the
    # full-K,V link limit: 55 / 105 = 0.52 for a 50 GB/s host next to a 55 GB/s link.
    v, v_cpu, s = H200.h2d_bytes_per_s, 50e9, 2048
    plan = plan_split(H200, num_layers=4, seq_len=s, **GQA, new_tokens=0, overlap=overlap,
                      cpu_attention_bytes_per_s=v_cpu, cpu_round_trip_s=0.0)
    for u in plan.cpu_tokens:
        assert abs(u - s * v_cpu / (v + v_cpu)) <= 2, plan.cpu_tokens
    ratio = plan.predicted_step_s / plan.baseline_link_limit_s
    assert ratio == pytest.approx(v / (v + v_cpu), rel=2e-3)


@pytest.mark.parametrize("overlap", cm.OVERLAPS)
def test_no_rate_zero_rate_or_a_slow_host_plan_exactly_as_before(overlap):
    kw = dict(num_layers=5, seq_len=2048, overlap=overlap)
    for dims in (GQA, MHA):
        before = plan_split(H200, **kw, **dims)
        assert before.cpu_tokens == [0] * 5 and before.cpu_attention_bytes_per_s is None
        assert "no host attention rate" in before.cpu_note
        for rate, trip in ((0, None), (1e6, TRIP), (50e9, 1.0)):   # none, 1 MB/s, 1 s trip
            plan = plan_split(H200, **kw, **dims, cpu_attention_bytes_per_s=rate,
                              cpu_round_trip_s=trip)
            assert plan.cpu_tokens == [0] * 5, (rate, trip)
            assert plan.recompute_tokens == before.recompute_tokens
            assert plan.resident_tokens == before.resident_tokens
            assert plan.predicted_step_s == pytest.approx(before.predicted_step_s, rel=1e-12)
            assert plan.layer_times_s == pytest.approx(before.layer_times_s, rel=1e-12)
            assert "no CPU share" in plan.cpu_note


@pytest.mark.parametrize("overlap", cm.OVERLAPS)
@pytest.mark.parametrize("dims,budget", [(GQA, None), (MHA, None), (GQA, 3e9), (MHA, 6e9)])
def test_lp_equals_finish_times_equals_longest_path_with_cpu_tasks(overlap, dims, budget):
    plan = plan_split(H200, num_layers=7, seq_len=2048, **dims, gpu_budget_bytes=budget,
                      overlap=overlap, cpu_attention_bytes_per_s=40e9, cpu_round_trip_s=TRIP)
    assert all(u > 0 for u in plan.cpu_tokens)
    c = plan.coefficients
    done = cm.finish_times(c, plan.recompute_tokens, plan.resident_tokens, overlap,
                           plan.cpu_tokens)
    g = plan_task_graph(plan)
    assert sum(1 for node in g.nodes if node[0] == "cpu") == 7
    assert predicted_step_time(g) == pytest.approx(done.total, rel=1e-12)
    assert plan.predicted_step_s == pytest.approx(done.total, rel=1e-12)
    assert plan.predicted_step_s == pytest.approx(plan.lp_objective_s, rel=2e-3)
    assert plan.predicted_step_s >= plan.lp_objective_s * (1 - 1e-9)
    assert plan.predicted_step_s < plan_split(H200, num_layers=7, seq_len=2048, **dims,
                                              gpu_budget_bytes=budget,
                                              overlap=overlap).predicted_step_s
    # the host is one serial resource and starts each layer after the layer's input exists
    for i in range(1, 7):
        assert done.cpu[i] >= done.cpu[i - 1] + c.cpu_s(plan.cpu_tokens[i]) * (1 - 1e-12)
        assert done.cpu[i] >= done.attention[i - 1] + c.cpu_s(plan.cpu_tokens[i]) * (1 - 1e-12)
        assert done.attention[i] >= done.cpu[i] + c.post_merge_s * (1 - 1e-12)
    if budget is not None:
        used = plan.working_set_bytes + sum(plan.resident_tokens) * c.kv_bytes_per_token
        assert used <= budget


@pytest.mark.parametrize("overlap", cm.OVERLAPS)
def test_longest_path_equals_finish_times_for_any_split_with_cpu(overlap):
    rng = random.Random(1)
    s = 1024
    for dims in (GQA, MHA):
        c = cpu_coefficients(rate=rng.choice([5e9, 50e9]), seq_len=s, dims=dims)
        for _ in range(40):
            n = rng.randint(1, 6)
            resident = [rng.choice([0, rng.randint(0, s)]) for _ in range(n)]
            recompute = [rng.randint(0, s - r) for r in resident]
            cpu = [rng.choice([0, rng.randint(0, s - r - l)]) for l, r in zip(recompute, resident)]
            g = build_task_graph(c, recompute, resident, overlap, cpu)
            assert predicted_step_time(g) == pytest.approx(
                cm.step_time(c, recompute, resident, overlap, cpu), rel=1e-12)


def test_cpu_terms_written_out():
    b, s, h, kv, p, rate = 16, 1024, 4096, 1024, 2, 50e9
    c = cpu_coefficients(rate=rate, seq_len=s)
    kvb = 2 * b * kv * p
    assert c.cpu_s_per_token == pytest.approx(kvb / rate)
    v_gpu, v_read, v_copy = H200.flops("float16"), H200.mem_read_bytes_per_s, \
        H200.mem_copy_bytes_per_s
    q_proj = max(2 * b * h * h / v_gpu, h * h * p / v_read)
    vec = b * h * p
    assert c.cpu_fixed_s == pytest.approx(q_proj + vec / H200.d2h_bytes_per_s
                                          + vec / H200.h2d_bytes_per_s + TRIP)
    assert c.gpu_kv_s_per_token == pytest.approx(2 * kvb / v_copy
                                                 + max(4 * b * h / v_gpu, kvb / v_read))
    params = 2 * h * h + 2 * h * kv + 8 * h * h
    gemms = max(2 * b * params / v_gpu, params * p / v_read)
    assert c.post_merge_s == pytest.approx(gemms * (h * h + 8 * h * h) / params)
    # one layer by hand: the GPU's part (fewer loaded and attended positions) against the host
    u = 400
    k = kvb * (s - u) / H200.h2d_bytes_per_s
    att = c.assemble_s + c.rest_s - u * c.gpu_kv_s_per_token
    host = c.cpu_fixed_s + u * kvb / rate + c.post_merge_s
    assert cm.step_time(c, [0], [0], cpu_tokens=[u]) == pytest.approx(
        max(k + att, host) + c.store_s)
    assert c.cpu_s(0) == 0.0 and cm.step_time(c, [0], [0], cpu_tokens=[0]) == pytest.approx(
        cm.step_time(c, [0], [0]))


def test_fractions_sum_to_at_most_one_per_layer():
    for dims, budget, rate in ((GQA, None, 200e9), (MHA, None, 80e9), (GQA, 2e9, 500e9),
                               (MHA, 8e9, 1e12)):
        s = 1000
        plan = plan_split(H200, num_layers=5, seq_len=s, **dims, gpu_budget_bytes=budget,
                          cpu_attention_bytes_per_s=rate, cpu_round_trip_s=TRIP)
        for l, r, u in zip(plan.recompute_tokens, plan.resident_tokens, plan.cpu_tokens):
            assert min(l, r, u) >= 0 and l + r + u <= s
        for ratio, u, r in zip(plan.ratios, plan.cpu_ratios, plan.resident_tokens):
            assert ratio + u + r / s <= 1 + 1e-12
        assert any(plan.cpu_tokens)


def test_cost_model_refuses_counts_past_the_layer_or_cpu_tokens_without_a_rate():
    plain = cm.layer_coefficients(H200, seq_len=100, **GQA)
    with pytest.raises(ValueError, match="no host attention rate"):
        cm.finish_times(plain, [0], [0], cpu_tokens=[5])
    with pytest.raises(ValueError, match=r"l \+ r \+ u <= s=100"):
        cm.finish_times(cpu_coefficients(seq_len=100), [50], [30], cpu_tokens=[21])
    with pytest.raises(ValueError, match="no host attention rate"):
        build_task_graph(plain, [0], [0], cpu_tokens=[1])


@pytest.mark.parametrize("bad,match", [
    (dict(cpu_attention_bytes_per_s=-1.0), "finite number >= 0"),
    (dict(cpu_attention_bytes_per_s=float("nan")), "finite number >= 0"),
    (dict(cpu_attention_bytes_per_s="50e9"), "must be a number of bytes"),
    (dict(cpu_attention_bytes_per_s=True), "must be a number of bytes"),
    (dict(cpu_attention_bytes_per_s=50e9, cpu_round_trip_s=-1e-6), "cpu_round_trip_s"),
])
def test_plan_split_rejects_bad_host_rates_in_words(bad, match):
    with pytest.raises(ValueError, match=match):
        plan_split(H200, num_layers=2, seq_len=64, **GQA, **bad)


def test_profile_rates_from_the_profile_and_old_files_without_them(tmp_path):
    old = preset("h200-pcie5").to_dict()
    for key in ("cpu_attention_bytes_per_s", "cpu_attention_threads", "round_trip_s"):
        old.pop(key)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = HardwareProfile.load(path)
    assert loaded.cpu_attention_bytes_per_s is None and loaded.round_trip_s is None
    assert loaded.cpu_attention_rate("float16") is None
    assert plan_split(loaded, num_layers=3, seq_len=512, **GQA).cpu_tokens == [0] * 3
    # a profile with the host's rates plans with them, and they survive JSON
    host = HardwareProfile(**{**old, "cpu_attention_bytes_per_s": {"float16": 50e9},
                              "cpu_attention_threads": 8, "round_trip_s": TRIP})
    path.write_text(host.to_json())
    again = HardwareProfile.load(path)
    assert again.cpu_attention_rate(torch.float16) == 50e9 and again.round_trip_s == TRIP
    assert again.cpu_attention_rate("float32") is None
    plan = plan_split(again, num_layers=3, seq_len=512, **GQA)
    assert plan.cpu_attention_bytes_per_s == 50e9 and plan.cpu_round_trip_s == TRIP
    assert all(plan.cpu_tokens) and plan.cpu_note == ""
    assert plan_split(again, num_layers=3, seq_len=512, **{**GQA, "dtype": "float32"}
                      ).cpu_tokens == [0] * 3           # no rate for that dtype
    assert "host attention GB/s float16 50.0 (8 threads)" in again.summary()


@pytest.mark.parametrize("field,value,match", [
    ("cpu_attention_bytes_per_s", {"float16": -1.0}, "positive finite"),
    ("cpu_attention_bytes_per_s", {"float16": "fast"}, "positive finite"),
    ("cpu_attention_bytes_per_s", {"int8": 1e9}, "not one of"),
    ("cpu_attention_bytes_per_s", 5e9, "mapping of dtype"),
    ("cpu_attention_threads", 0, "integer >= 1"),
    ("round_trip_s", float("nan"), "seconds >= 0"),
])
def test_profile_rejects_bad_host_fields_in_words(field, value, match):
    data = {**preset("h200-pcie5").to_dict(), field: value}
    with pytest.raises(ValueError, match=match):
        HardwareProfile.from_dict(data)


def test_kvpr_plan_cpu_attention_gbps(capsys):
    argv = ["plan", "--arch", "llama-3-8b", "--batch", "16", "--seq", "2048", "--profile",
            "h200-pcie5", "--layers", "4"]
    assert kvpr(argv) == 0
    out = capsys.readouterr().out
    assert "CPU share: none (the profile has no host attention rate" in out
    header = next(line for line in out.splitlines() if line.startswith("layer"))
    assert "cpu" not in header.split()                  # the table as before without a rate
    assert kvpr(argv + ["--cpu-attention-gbps", "50"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("layer"))
    assert header.split()[:5] == ["layer", "ratio", "recompute", "resident", "cpu"]
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["1"]]
    assert 800 < int(rows[0][4]) < 1200
    assert "the full-K,V link limit" in out and "at 50.00 GB/s" in out
    share = float(out.split("x the full-K,V link limit")[0].rsplit("= ", 1)[1])
    assert 0.5 < share < 0.7
    assert kvpr(argv + ["--cpu-attention-gbps", "50", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cpu_attention_bytes_per_s"] == 50e9 and all(plan["cpu_tokens"])


@pytest.mark.parametrize("value,words", [
    ("-1", "must be a finite number of GB/s >= 0"),
    ("nan", "must be a finite number of GB/s >= 0"),
    ("inf", "must be a finite number of GB/s >= 0"),
    ("fast", "takes the host's attention rate in GB/s"),
])
def test_kvpr_plan_refuses_bad_cpu_rates_in_words(capsys, value, words):
    assert kvpr(["plan", "--arch", "llama-3-8b", "--batch", "4", "--seq", "64", "--profile",
                 "h200-pcie5", f"--cpu-attention-gbps={value}"]) == 2
    err = capsys.readouterr().err
    assert "--cpu-attention-gbps" in err and words in err and repr(value) in err


def test_kvpr_plan_cpu_rate_is_for_the_latency_schedule(capsys):
    assert kvpr(["plan", "--arch", "llama-3-8b", "--batch", "4", "--seq", "64", "--profile",
                 "h200-pcie5", "--schedule", "throughput", "--cpu-attention-gbps", "10"]) == 2
    assert "throughput schedule has none" in capsys.readouterr().err


@pytest.fixture
def toy_host(monkeypatch):
    """kvpr profile --host at toy shapes (the real ones take seconds on a shared machine)."""
    monkeypatch.setattr(host_measure, "HOST_SHAPES", host_measure.QUICK_SHAPES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_kvpr_profile_host_on_a_cpu(capsys, tmp_path, toy_host):
    out_path = tmp_path / "host.json"
    assert kvpr(["profile", "--host", "--cpu-threads", "1", "-o", str(out_path)]) == 0
    captured = capsys.readouterr()
    assert "no CUDA device here" in captured.err and "h200-pcie5" in captured.err
    assert "host attention float16" in captured.out and "(1 threads)" in captured.out
    assert "round trip" in captured.out and "not measured (needs CUDA)" in captured.out
    saved = HardwareProfile.load(out_path)
    assert set(saved.cpu_attention_bytes_per_s) == {"float16", "bfloat16", "float32"}
    assert all(v > 0 and math.isfinite(v) for v in saved.cpu_attention_bytes_per_s.values())
    assert saved.cpu_attention_threads == 1 and saved.round_trip_s is None
    assert "round trip not measured" in saved.notes
    plan = plan_split(saved, num_layers=2, seq_len=256, **GQA)
    assert plan.cpu_attention_bytes_per_s == saved.cpu_attention_bytes_per_s["float16"]
    assert "round trip not measured" in plan.cpu_note
    # kvpr plan --profile FILE plans with it; the flag overrides it
    assert kvpr(["plan", "--arch", "llama-3-8b", "--batch", "16", "--seq", "1024", "--profile",
                 str(out_path), "--layers", "2", "--cpu-attention-gbps", "50"]) == 0
    assert "at 50.00 GB/s" in capsys.readouterr().out
    # a preset keeps saying it has no host rate
    assert kvpr(["profile", "--preset", "h100-pcie5"]) == 0
    assert "not measured (kvpr profile --host)" in capsys.readouterr().out


def test_kvpr_profile_cpu_threads_needs_host_and_a_positive_count(capsys):
    assert kvpr(["profile", "--preset", "h100-pcie5", "--cpu-threads", "2"]) == 2
    assert "without --host" in capsys.readouterr().err
    assert kvpr(["profile", "--preset", "h100-pcie5", "--host", "--cpu-threads", "0"]) == 2
    assert "integer >= 1" in capsys.readouterr().err


def test_measure_host_quick():
    rates = host_measure.measure_host(threads=1, dtypes=("float32",), quick=True, repeats=1)
    assert rates.threads == 1 and list(rates.attention_bytes_per_s) == ["float32"]
    assert rates.attention_bytes_per_s["float32"] > 0
    if not torch.cuda.is_available():
        assert rates.round_trip_s is None and "round trip not measured" in rates.notes
    profile = host_measure.with_host_rates(preset("a100-pcie4"), rates)
    assert profile.cpu_attention_rate("float32") == rates.attention_bytes_per_s["float32"]
    assert profile.h2d_bytes_per_s == PRESETS["a100-pcie4"].h2d_bytes_per_s
    assert PRESETS["a100-pcie4"].cpu_attention_bytes_per_s is None      # a copy was changed
    with pytest.raises(ValueError, match="thread count"):
        host_measure.measure_host(threads=0, quick=True)


def test_choose_cpu_ratios_for_the_backend():
    kw = dict(num_layers=3, batch_size=16, hidden_size=4096, kv_hidden_size=1024,
              dtype=torch.float16, device="cpu")
    split = choose_cpu_ratios(profile="h200-pcie5", **kw)
    assert split.cpu_ratios == [0.0] * 3 and split.ratios == [0.0] * 3
    assert "no host attention rate" in split.how and "h200-pcie5 (preset)" in split.how
    split = choose_cpu_ratios(profile="h200-pcie5", cpu_attention_bytes_per_s=50e9, **kw)
    assert all(0.3 < u < 0.7 for u in split.cpu_ratios), split.cpu_ratios
    assert split.plan.seq_len == cm.REPRESENTATIVE_SEQ_LEN
    assert "host attention 50 GB/s (given)" in split.how
    assert choose_cpu_ratios(profile="h200-pcie5", cpu_attention_bytes_per_s=50e9, **kw
                             ).plan is split.plan                                 # cached
    mha = choose_cpu_ratios(profile="h200-pcie5", cpu_attention_bytes_per_s=50e9,
                            **{**kw, "kv_hidden_size": 4096})
    assert all(r > 0 for r in mha.ratios) and all(u > 0 for u in mha.cpu_ratios)
    assert all(r + u <= 1 for r, u in zip(mha.ratios, mha.cpu_ratios))
    with pytest.raises(ValueError, match="finite number >= 0"):
        choose_cpu_ratios(profile="h200-pcie5", cpu_attention_bytes_per_s=-5, **kw)
