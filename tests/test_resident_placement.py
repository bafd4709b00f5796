"""The latency LP's placement of a budget, carried out by the runtime: where the split is planned
(a profile named, no forced ratio or share) the plan stage solves the LP at the cache's full
length under ``gpu_budget_bytes`` and each layer keeps its own r_i resident and recomputes its
own share of the rest (stages/residency.py planned_rule). Exact against eager, the device rows
and the bytes per step those of the plan, and the LP's memory row equal to the backend's check."""
from __future__ import annotations

import pytest
import torch

from helpers import decode_seeded, hf_build, hf_generate, on_paths, tiny_llama, worst_rel_err
from kvpr_compile.ops.split import recompute_tokens
from kvpr_compile.runtime import traffic

TOL = 1e-5
STEPS = 10
PROFILE = "h200-pcie5"   # a named profile: the CPU device plans as that hardware would


def _row(kv_heads):
    """One position's K and V in one layer of tiny_llama (batch 2, head_dim 16, fp32)."""
    return 2 * 2 * kv_heads * 16 * 4


def _working_set(kv_heads):
    """Two K,V slots and one assembled K,V for 96 + 1 positions."""
    return 3 * _row(kv_heads) * 97


def _planned(model, budget, steps=STEPS):
    import kvpr_compile
    compiled = torch.compile(model, backend="kvpr",
                             options={"profile": PROFILE, "gpu_budget_bytes": budget})
    cache = model.make_cache(2, 96)
    out = decode_seeded(model, cache, steps, compiled)
    return compiled, cache, out, kvpr_compile.last_report()


def _step_bytes(plan, past, kv_row, x_row):
    """H2D bytes of one decode step at ``past`` under the plan's rule: layer i keeps
    min(past, r_i) resident, recomputes l_i / (s - r_i) of the rest, loads what remains."""
    s, total = plan.seq_len, {"kv": 0, "tokens": 0}
    for l_full, r_full in zip(plan.recompute_tokens, plan.resident_tokens):
        r = min(past, r_full)
        l = recompute_tokens(l_full / (s - r_full), past - r) if s > r_full else 0
        total["kv"] += (past - r - l) * kv_row
        total["tokens"] += l * x_row
    return total


# on simulated streams by default: MHA past its caps (40 steps), the other two with --run-slow
@pytest.mark.parametrize("path,kv_heads,extra_tokens,steps", [
    *on_paths([(1, 200, STEPS), (4, 48, STEPS), (4, 200, 40)],
              slow_on_sim={(1, 200, STEPS), (4, 48, STEPS)}),
    *(pytest.param(path, 1, 48, STEPS, marks=pytest.mark.slow) for path in ("cpu", "runtime-sim"))],
    indirect=["path"])
def test_the_runtime_keeps_the_lps_resident_rows_per_layer(path, kv_heads, extra_tokens, steps):
    """GQA (1 KV head of 4) and MHA: exact, each layer's device rows sized to its own r_i, and
    (CPU path) a step moves exactly the bytes the plan's rule says. MHA with room for 200
    tokens: the LP keeps 29-37 tokens resident and recomputes the rest, so 40 steps take the
    past beyond the caps."""
    model = tiny_llama(kv_heads=kv_heads)
    ref = decode_seeded(model, model.make_cache(2, 96), steps)
    budget = _working_set(kv_heads) + extra_tokens * _row(kv_heads)
    compiled, cache, out, report = _planned(model, budget, steps)
    assert worst_rel_err(out[0], ref[0]) <= TOL
    assert torch.equal(out[1], ref[1])
    plan = report.plan
    assert plan.seq_len == 96 and plan.gpu_budget_bytes == budget
    assert "placed under a budget" in report.ratio_source
    held = cache._store.resident
    past = 6 + steps
    for layer, r in enumerate(plan.resident_tokens):
        if r:
            assert held.k[layer].shape[0] == r
            assert held.filled[layer] == min(past, r)
        else:
            assert held.k[layer] is None
    if path == "cpu":
        with torch.no_grad(), traffic.counting() as counted:
            compiled(torch.zeros(2, 1, dtype=torch.long), cache)
        # X of one position (batch 2, hidden 64) and its RoPE cos, sin (head_dim 16), fp32
        x_row = 2 * 64 * 4 + 2 * 16 * 4
        want = _step_bytes(plan, past, _row(kv_heads), x_row)
        assert counted.by_kind["kv"] == want["kv"]
        assert counted.by_kind["tokens"] == want["tokens"]


def test_gqa_placement_is_uneven_and_within_the_budget():
    """Where recompute cannot pay (h = 4 h_kv) the LP spends the budget on resident rows, and
    not the same number in every layer: the early layers' loads cannot hide under compute."""
    model = tiny_llama(kv_heads=1)
    budget = _working_set(1) + 200 * _row(1)
    _, _, _, report = _planned(model, budget, steps=1)
    plan = report.plan
    assert plan.recompute_tokens == [0] * 4
    assert len(set(plan.resident_tokens)) > 1
    assert plan.resident_tokens == sorted(plan.resident_tokens, reverse=True)
    assert sum(plan.resident_tokens) * _row(1) + plan.working_set_bytes <= budget
    assert sum(plan.resident_tokens) >= 190


def test_the_lps_memory_row_is_the_backends_check():
    """The LP's working set (cost_model) and the backend's (stages/residency.py) count the same
    bytes: two K,V slots and one assembled K,V of s + 1 positions, X slots of l tokens."""
    from kvpr_compile.plan import cost_model as cm
    from kvpr_compile.plan.presets import preset
    from kvpr_compile.stages.residency import working_set
    c = cm.layer_coefficients(preset(PROFILE), batch_size=2, seq_len=96, hidden_size=64,
                              kv_hidden_size=16, dtype=torch.float32)
    backend = working_set(97, 2, 16, 64, 4, recompute=False)
    assert cm.working_set_bytes(c, x_tokens=0) == sum(backend.values()) == _working_set(1)
    with_x = working_set(97, 2, 16, 64, 4, recompute=True)
    assert cm.working_set_bytes(c, x_tokens=97) == sum(with_x.values())


def test_a_planned_budget_below_the_working_set_is_refused_before_anything_is_written():
    model = tiny_llama()
    cache = model.make_cache(2, 96)
    compiled = torch.compile(model, backend="kvpr",
                             options={"profile": PROFILE, "gpu_budget_bytes": 1000.0})
    with pytest.raises(Exception, match=r"gpu_budget_bytes'\]=1000.0 is below the latency "
                                        r"working set of 297984 bytes"):
        with torch.no_grad():
            compiled(torch.zeros(2, 3, dtype=torch.long), cache)
    assert cache.seq_len(0) == 0 and cache._store.written == [0] * 4


def test_hf_qwen2_generate_under_a_planned_budget():
    """HF Qwen2 (GQA) through generate with a profile named and a budget that holds part of the
    cache: exact, and fewer K,V bytes than with nothing resident."""
    from kvpr_compile import hf as kvpr_hf
    model = hf_build("qwen2")
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = hf_generate(model, ids)
    counts = []
    for options in ({"profile": PROFILE, "resident_ratio": 0.0},
                    {"profile": PROFILE, "gpu_budget_bytes": _budget_for_part(model, ids)}):
        torch._dynamo.reset()
        kvpr_hf.compile(model, **options)
        with traffic.counting() as counted:
            out = hf_generate(model, ids)
        assert worst_rel_err(out.logits, ref.logits) <= TOL
        assert torch.equal(out.sequences, ref.sequences)
        counts.append(counted.by_kind["kv"])
    assert 0 < counts[1] < counts[0]


def _budget_for_part(model, ids):
    """The working set of hf_generate's cache (64 positions) plus room for 4 tokens per
    layer."""
    cfg = model.config
    kv_heads = cfg.num_key_value_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    row = 2 * ids.shape[0] * kv_heads * head_dim * 4
    return 3 * row * (64 + 1) + 4 * cfg.num_hidden_layers * row
