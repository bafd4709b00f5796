"""The split LP against the paper's closed form, brute force, budgets and errors."""
from __future__ import annotations

import math
import time

import pytest
import torch

from kvpr_compile.plan import cost_model as cm
from kvpr_compile.plan import latency_ratios
from kvpr_compile.plan.latency_lp import plan_split
from kvpr_compile.plan.latency_ratios import choose_ratios, ratio_for
from kvpr_compile.plan.presets import PRESETS
from kvpr_compile.plan.profile import HardwareProfile

pytestmark = pytest.mark.quick

H200 = PRESETS["h200-pcie5"]
A100 = PRESETS["a100-pcie4"]


def make_profile(h2d=55e9, d2h=55e9, fp16=650e12, name="custom", copy=1e12, read=2e12
                 ) -> HardwareProfile:
    return HardwareProfile(name=name, device_name=name, h2d_bytes_per_s=h2d, d2h_bytes_per_s=d2h,
                           flops_per_s={"float16": fp16}, torch_version="", date="",
                           source="test", mem_copy_bytes_per_s=copy, mem_read_bytes_per_s=read)


def paper_l_star(s, h, p, v_com, v_gpu):
    """l* = s*p*v_gpu / (2*h*v_com + p*v_gpu), written out here, not taken from cost_model."""
    return s * p * v_gpu / (2 * h * v_com + p * v_gpu)


def mha_row_l_star(s, h, p, profile):
    """The row schedule's first layer for MHA: A + max(R, K) balanced at R = K, with R the GEMMs
    (4*b*l*h^2 / v_gpu) plus one read+write pass over K,V[:l] (4*b*l*h*p / v_copy); b cancels:
    l = s * (2*h*p / v) / (4*h^2 / v_gpu + 4*h*p / v_copy + 2*h*p / v)."""
    v, g, copy = profile.h2d_bytes_per_s, profile.flops(torch.float16), profile.mem_copy_bytes_per_s
    k = 2 * h * p / v
    return s * k / (4 * h * h / g + 4 * h * p / copy + k)


@pytest.mark.parametrize("profile,b,s,h", [
    (H200, 32, 1024, 4096),
    (H200, 8, 4096, 5120),
    (A100, 16, 2048, 4096),
    (make_profile(h2d=12e9, fp16=90e12), 4, 3000, 2048),
])
def test_mha_matches_paper_closed_form(profile, b, s, h):
    # Apples to apples: new_tokens=0 removes the append (D) and the rest-of-layer compute,
    # leaving exactly the paper's per-layer max(A + R, A + K).
    plan = plan_split(profile, num_layers=6, batch_size=b, seq_len=s, hidden_size=h,
                      kv_hidden_size=h, dtype=torch.float16, new_tokens=0, overlap="row")
    want = paper_l_star(s, h, 2, profile.h2d_bytes_per_s, profile.flops(torch.float16))
    assert 0 < want < s
    for l in plan.recompute_tokens:
        assert abs(l - want) <= 1, (plan.recompute_tokens, want)
    assert plan.ratios[0] == plan.recompute_tokens[0] / s
    # and the cost of that split is the paper's A + max(R, K) per layer
    a = b * want * h * 2 / profile.h2d_bytes_per_s
    r = 4 * b * want * h * h / profile.flops(torch.float16)
    assert plan.predicted_step_s == pytest.approx(6 * (a + r), rel=1e-3)


def test_with_append_layer0_is_paper_and_middle_layers_balance_r_eq_k_plus_d():
    b, s, h = 32, 2048, 4096
    plan = plan_split(H200, num_layers=5, batch_size=b, seq_len=s, hidden_size=h,
                      kv_hidden_size=h, dtype=torch.float16, overlap="row")
    v, g = H200.h2d_bytes_per_s, H200.flops(torch.float16)
    assert abs(plan.recompute_tokens[0] - mha_row_l_star(s, h, 2, H200)) <= 1
    d = b * (h + 2 * h) * 2 / H200.d2h_bytes_per_s           # the new token's X, K, V
    k_tok = 2 * b * h * 2 / v
    r_tok = 4 * b * h * h / g + 2 * (2 * b * h * 2) / H200.mem_copy_bytes_per_s  # GEMMs + pass
    extended = (d + k_tok * s) / (r_tok + k_tok)             # R(l) = K(l) + D
    assert extended - mha_row_l_star(s, h, 2, H200) > 0.5    # the append term matters here
    for l in plan.recompute_tokens[1:-1]:
        assert abs(l - extended) <= 1
    assert cm.balanced_recompute_tokens(plan.coefficients, overlap="row") == pytest.approx(extended)


def test_clamps_to_s_on_a_fast_gpu():
    fast = make_profile(fp16=1e18, copy=1e18, read=1e18)
    plan = plan_split(fast, num_layers=4, batch_size=8, seq_len=777, hidden_size=4096,
                      kv_hidden_size=4096, dtype=torch.float16)
    assert plan.recompute_tokens == [777] * 4 and plan.ratios == [1.0] * 4
    assert plan.predicted_step_s < 0.55 * plan.baseline_step_s      # ships X: half the bytes


def test_stream_overlap_recomputes_more_than_row_on_h200():
    # With recompute overlapping the next layer's loads, the stream schedule recomputes more
    # than the row schedule; with (nearly) free device memory, i.e. counting GEMMs only, X-only
    # (l = s) wins on an H200's GEMM and link rates.
    kw = dict(num_layers=6, batch_size=32, seq_len=1024, hidden_size=4096, kv_hidden_size=4096,
              dtype=torch.float16)
    plan = plan_split(H200, overlap="stream", **kw)
    row = plan_split(H200, overlap="row", **kw)
    assert plan.predicted_step_s < row.predicted_step_s < row.baseline_step_s
    assert plan.baseline_step_s == pytest.approx(row.baseline_step_s)
    assert min(plan.recompute_tokens[1:-1]) > max(row.recompute_tokens[1:-1])
    gemm_only = HardwareProfile(**{**H200.to_dict(), "mem_copy_bytes_per_s": 1e18,
                                   "mem_read_bytes_per_s": 1e18})
    assert plan_split(gemm_only, overlap="stream", **kw).recompute_tokens[:4] == [1024] * 4


@pytest.mark.parametrize("overlap", cm.OVERLAPS)
@pytest.mark.parametrize("kv", [1024, 2048])   # GQA 4:1 and exactly 2:1 (a tie the LP must break)
def test_gqa_never_recomputes(overlap, kv):
    for profile in (*PRESETS.values(), make_profile(fp16=1e18)):
        for dtype in (torch.float16, torch.float32):
            plan = plan_split(profile, num_layers=5, batch_size=16, seq_len=4096,
                              hidden_size=4096, kv_hidden_size=kv, dtype=dtype, overlap=overlap)
            assert plan.recompute_tokens == [0] * 5, (profile.name, dtype)
            assert plan.predicted_step_s == pytest.approx(plan.baseline_step_s)


@pytest.mark.parametrize("overlap", cm.OVERLAPS)
def test_lp_is_optimal_against_brute_force(overlap):
    # Without a budget the plan can be checked token by token: no single-layer change of l
    # beats it, and the best uniform l (searched exhaustively) is no better.
    s = 300
    plan = plan_split(A100, num_layers=3, batch_size=4, seq_len=s, hidden_size=4096,
                      kv_hidden_size=4096, dtype=torch.float32, overlap=overlap)
    c = plan.coefficients
    best = plan.predicted_step_s
    assert best == pytest.approx(cm.step_time(c, plan.recompute_tokens, None, overlap))
    assert best <= min(cm.step_time(c, [l] * 3, None, overlap) for l in range(s + 1)) * (1 + 1e-6)
    for i in range(3):
        for l in range(s + 1):
            trial = list(plan.recompute_tokens)
            trial[i] = l
            assert best <= cm.step_time(c, trial, None, overlap) * (1 + 1e-6)
    assert 0 < plan.recompute_tokens[1] < s


def test_predicted_never_worse_than_baseline_and_lp_matches_model():
    for profile in PRESETS.values():
        for kv in (4096, 1024):
            plan = plan_split(profile, num_layers=8, batch_size=16, seq_len=2048,
                              hidden_size=4096, kv_hidden_size=kv, dtype=torch.float16)
            assert plan.predicted_step_s <= plan.baseline_step_s * (1 + 1e-12)
            assert plan.predicted_step_s == pytest.approx(plan.lp_objective_s, rel=1e-3)
            assert sum(plan.layer_times_s) + plan.tail_s == pytest.approx(plan.predicted_step_s)


def test_baseline_is_full_kv_prefetch_from_first_principles():
    b, s, h, L = 8, 1000, 4096, 4
    plan = plan_split(A100, num_layers=L, batch_size=b, seq_len=s, hidden_size=h,
                      kv_hidden_size=h, dtype=torch.float16, new_tokens=0)
    kv_bytes = 2 * b * s * h * 2
    assert plan.baseline_h2d_bytes == kv_bytes
    assert plan.baseline_step_s == pytest.approx(L * kv_bytes / A100.h2d_bytes_per_s)
    assert plan.baseline_link_limit_s == pytest.approx(L * kv_bytes / A100.h2d_bytes_per_s)
    l = plan.recompute_tokens[0]
    assert plan.h2d_bytes[0] == b * l * h * 2 + 2 * b * (s - l) * h * 2


def test_budget_uses_resident_prefix_and_more_budget_never_hurts():
    kw = dict(num_layers=6, batch_size=16, seq_len=2048, hidden_size=4096, kv_hidden_size=4096,
              dtype=torch.float16)
    free = plan_split(H200, **kw)
    per_token = 2 * 16 * 4096 * 2
    working = 3 * per_token * (2048 + 1)   # two K,V slots and one assembled K,V
    assert free.resident_tokens == [0] * 6
    previous = math.inf   # (None is not "budget 0": it skips the memory check altogether)
    for extra_tokens in (0, 500, 1000, 3000, 6 * 2048, 6 * 2048 + 4096):
        budget = working + extra_tokens * per_token
        plan = plan_split(H200, gpu_budget_bytes=budget, **kw)
        used = plan.working_set_bytes + sum(plan.resident_tokens) * per_token
        assert used <= budget
        assert plan.predicted_step_s <= previous * (1 + 1e-9)
        previous = plan.predicted_step_s
        for l, r in zip(plan.recompute_tokens, plan.resident_tokens):
            assert 0 <= l and 0 <= r and l + r <= 2048
        if extra_tokens >= 3000:
            assert sum(plan.resident_tokens) > 0
            assert plan.predicted_step_s < free.predicted_step_s
    # Everything resident: no bytes loaded, only compute (assemble + rest, one layer after the
    # other) and the last append remain.
    assert plan.resident_tokens == [2048] * 6 and sum(plan.h2d_bytes) == 0
    c = plan.coefficients
    assert plan.predicted_step_s == pytest.approx(6 * (c.assemble_s + c.rest_s) + c.store_s)
    assert plan.predicted_step_s < 0.2 * free.baseline_step_s


def test_budget_at_the_working_set_forbids_recompute_staging():
    kw = dict(num_layers=3, batch_size=16, seq_len=1024, hidden_size=4096, kv_hidden_size=4096,
              dtype=torch.float16)
    working = 3 * (2 * 16 * 4096 * 2) * (1024 + 1)
    plan = plan_split(H200, gpu_budget_bytes=working, **kw)
    assert plan.recompute_tokens == [0] * 3 and plan.resident_tokens == [0] * 3


@pytest.mark.parametrize("bad,match", [
    (dict(gpu_budget_bytes=-1), "nothing fits"),
    (dict(gpu_budget_bytes=1e6), "nothing fits"),
    (dict(gpu_budget_bytes=float("nan")), "finite"),
    (dict(batch_size=0), "batch_size"),
    (dict(seq_len=-5), "seq_len"),
    (dict(num_layers=0), "num_layers"),
    (dict(hidden_size=4096.0), "hidden_size"),
    (dict(dtype=torch.int32), "dtype"),
    (dict(overlap="wavefront"), "overlap"),
])
def test_clear_errors(bad, match):
    kw = dict(num_layers=4, batch_size=8, seq_len=1024, hidden_size=4096, kv_hidden_size=4096,
              dtype=torch.float16)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        plan_split(H200, **kw)


def test_eighty_layers_solve_fast():
    plan_split(H200, num_layers=2, batch_size=1, seq_len=16, hidden_size=64, kv_hidden_size=64,
               dtype=torch.float16)   # load CBC once
    start = time.perf_counter()
    plan = plan_split(H200, num_layers=80, batch_size=16, seq_len=4096, hidden_size=8192,
                      kv_hidden_size=8192, dtype=torch.float16, gpu_budget_bytes=60e9)
    assert time.perf_counter() - start < 1.0
    assert len(plan.recompute_tokens) == 80 and plan.solve_s < 1.0


def test_ratio_for_is_cached_and_s_independent():
    latency_ratios._cached_plan.cache_clear()
    r1 = ratio_for(H200, 32, 4096, 4096, torch.float16, 4, overlap="row")
    r2 = ratio_for(H200, 32, 4096, 4096, "float16", 4, overlap="row")
    assert r1 == r2 and latency_ratios._cached_plan.cache_info().hits == 1
    want = mha_row_l_star(1, 4096, 2, H200)
    assert all(abs(r - want) < 2 / 4096 for r in r1)
    # the ratio at another length is the same to within a token
    plan = plan_split(H200, num_layers=4, batch_size=32, seq_len=1000, hidden_size=4096,
                      kv_hidden_size=4096, dtype=torch.float16, overlap="row")
    assert all(abs(a - b) <= 2 / 1000 for a, b in zip(plan.ratios, r1))
    assert ratio_for(H200, 32, 4096, 1024, torch.float16, 4) == [0.0] * 4
    slower = HardwareProfile(**{**H200.to_dict(), "flops_per_s": {"float16": 100e12}})
    # keyed on rates
    assert ratio_for(slower, 32, 4096, 4096, torch.float16, 4, overlap="row")[1] < r1[1]


def test_choose_ratios(monkeypatch):
    """The backend's latency ratios, typed arguments only (a forced ratio never gets here: the
    plan stage answers it without mip; its checks are in test_options.py)."""
    kw = dict(num_layers=3, batch_size=8, hidden_size=4096, kv_hidden_size=4096,
              dtype=torch.float16, device="cpu")
    monkeypatch.delenv("KVPR_PROFILE", raising=False)
    ratios, how, plan = choose_ratios(profile=None, overlap="row", **kw)
    assert "h200-pcie5" in how and "preset" in how and "row overlap" in how
    assert plan.ratios == ratios and plan.seq_len == cm.REPRESENTATIVE_SEQ_LEN
    assert "h200-pcie5" in str(plan) and "ms/step" in str(plan)
    assert all(abs(r - mha_row_l_star(1, 4096, 2, H200)) < 2 / 4096 for r in ratios)
    ratios, how, _ = choose_ratios(profile="a100-pcie4", overlap="row", **kw)
    assert "a100-pcie4" in how
    assert ratios[1] == pytest.approx(mha_row_l_star(1, 4096, 2, A100), abs=2 / 4096)
    monkeypatch.setenv("KVPR_PROFILE", "a100-pcie4")
    assert choose_ratios(profile=None, overlap="row", **kw)[0] == ratios
    ratios, how, _ = choose_ratios(profile="h200-pcie5", **kw)   # default: stream
    row = choose_ratios(profile="h200-pcie5", overlap="row", **kw)[0]
    assert ratios[1] > row[1] and "stream overlap" in how
    assert choose_ratios(profile=None, **{**kw, "kv_hidden_size": 1024})[0] == [0.0] * 3
    with pytest.raises(ValueError, match="unknown hardware profile"):
        choose_ratios(profile="tpu", **kw)
    with pytest.raises(ValueError, match="overlap"):
        choose_ratios(profile=None, overlap="diagonal", **kw)
