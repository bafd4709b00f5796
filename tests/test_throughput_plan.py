"""The throughput schedule's planner: LP == the task graph's longest path, the balanced split in
closed form, GQA at ratio 0, the gain bound, micro-batch splits and budget errors."""
from __future__ import annotations

import math

import pytest

from kvpr_compile.plan import cost_model as cm
from kvpr_compile.plan.arch_presets import ARCH_PRESETS
from kvpr_compile.plan import throughput_graph as tg
from kvpr_compile.plan.throughput_lp import (even_split, plan_throughput, solve_split, step_shape,
                                             working_set_bytes)
from kvpr_compile.plan.presets import preset
from kvpr_compile.plan.profile import HardwareProfile

pytestmark = pytest.mark.quick

OPT = ARCH_PRESETS["opt-6.7b"]


def _slow_gpu(flops: float) -> HardwareProfile:
    """A profile whose GEMM rate makes the recompute bind, so the LP's split is interior."""
    return HardwareProfile(name="test", device_name="test", h2d_bytes_per_s=25e9,
                           d2h_bytes_per_s=25e9, flops_per_s={"float16": flops},
                           torch_version="", date="", source="test")


def _shape(profile, layers=6, micro=(8, 8, 7), s=256, arch=OPT):
    return step_shape(profile, num_layers=layers, micro_batches=micro, seq_len=s,
                      hidden_size=arch.hidden_size, kv_hidden_size=arch.kv_hidden_size,
                      dtype="float16", mlp_params=arch.mlp_params, device_mem_bytes_per_s=2e12)


@pytest.mark.parametrize("flops", [650e12, 20e12, 3e12])
def test_lp_optimum_is_the_longest_path_of_its_own_split(flops):
    shape = _shape(_slow_gpu(flops))
    tokens, lp_end = solve_split(shape)
    assert lp_end == pytest.approx(tg.makespan(shape, tokens), rel=1e-6)
    # and no integer plan beats the LP (it is a relaxation of them)
    for l in (0, shape.seq_len // 2, shape.seq_len):
        assert tg.makespan(shape, [l] * shape.num_layers) >= lp_end * (1 - 1e-6)


def _per_layer(shape, l):
    """(link seconds, GPU seconds) of one layer at recompute length l: the resource bound."""
    spec = tg.tasks(shape)
    return tuple(sum(c + per_token * l for (res, c, per_token, layer) in spec.values()
                     if res == resource and layer == 0) for resource in ("link", "gpu"))


def test_one_micro_batch_sits_at_the_balanced_split():
    """Steady state with one micro-batch: link (W + X + KV + append) = GPU (recompute + layer)
    gives l = (W + 2 b s h_kv p / v + D - C) / (b (2 h_kv - h) p / v + 4 b h h_kv / v_gpu)."""
    profile = _slow_gpu(20e12)
    shape = _shape(profile, layers=12, micro=(23,))
    tokens, _ = solve_split(shape)
    v, p, h, hkv, s = (shape.h2d_bytes_per_s, shape.bytes_per_element, shape.hidden,
                       shape.kv_hidden, shape.seq_len)
    b = shape.micro_batches[0]
    num = shape.weight_s() + 2 * b * s * hkv * p / v + shape.store_s(b) - shape.compute_s(b)
    elementwise = 2 * (2 * b * hkv * p) / profile.mem_copy_bytes_per_s   # one read+write pass
    den = b * (2 * hkv - h) * p / v + 4 * b * h * hkv / profile.flops("float16") + elementwise
    closed = num / den
    assert 0 < closed < s, "the case must be interior to test anything"
    for l in tokens[2:-3]:
        assert l == pytest.approx(closed, rel=0.02)


@pytest.mark.parametrize("micro", [(23,), (8, 8, 7), (6, 6, 6, 5)])
@pytest.mark.parametrize("flops", [650e12, 20e12])
def test_plan_is_within_ten_percent_of_the_resource_bound(micro, flops):
    """No schedule beats L * min_l max(link, GPU) per layer; the column order with two weight
    and two cache slots stays within 10% of it (pipeline fill and the weight copy's place)."""
    shape = _shape(_slow_gpu(flops), layers=12, micro=micro)
    _, end = solve_split(shape)
    bound = shape.num_layers * min(max(_per_layer(shape, l)) for l in range(shape.seq_len + 1))
    assert bound * (1 - 1e-9) <= end <= 1.10 * bound


def test_gqa_plans_ratio_zero_and_gains_nothing():
    arch = ARCH_PRESETS["llama-3-8b"]
    plan = plan_throughput(preset("h200-pcie5"), num_layers=4, batch_size=64, seq_len=288,
                           hidden_size=arch.hidden_size, kv_hidden_size=arch.kv_hidden_size,
                           dtype="float16", mlp_params=arch.mlp_params)
    assert plan.recompute_tokens == [0] * 4
    assert plan.speedup == pytest.approx(1.0)


def test_mha_gain_is_below_the_link_bound_and_grows_with_batch():
    arch = ARCH_PRESETS["opt-30b"]
    kw = dict(num_layers=8, seq_len=288, hidden_size=arch.hidden_size,
              kv_hidden_size=arch.kv_hidden_size, dtype="float16", mlp_params=arch.mlp_params)
    gains = []
    for batch in (32, 128, 512):
        plan = plan_throughput(preset("h200-pcie5"), batch_size=batch, **kw)
        w = cm.layer_params(arch.hidden_size, arch.kv_hidden_size, arch.mlp_params) * 2
        kv = cm.kv_bytes_per_token(batch, arch.kv_hidden_size, 2) * 288
        assert 1.0 < plan.speedup < (w + kv) / (w + kv / 2) * 1.01
        assert plan.predicted_step_s >= plan.link_limit_s * (1 - 1e-9)
        gains.append(plan.speedup)
    assert gains == sorted(gains)


def test_forced_ratio_zero_is_the_baseline():
    plan = plan_throughput(preset("h200-pcie5"), num_layers=3, batch_size=16, seq_len=128,
                           hidden_size=OPT.hidden_size, kv_hidden_size=OPT.kv_hidden_size,
                           dtype="float16", micro_batches=3, ratio=0.0)
    assert plan.micro_batches == [6, 5, 5]
    assert plan.predicted_step_s == pytest.approx(plan.baseline_step_s)


def test_budget_picks_more_micro_batches_and_keeps_the_working_set_inside():
    kw = dict(num_layers=4, batch_size=256, seq_len=1024, hidden_size=OPT.hidden_size,
              kv_hidden_size=OPT.kv_hidden_size, dtype="float16", mlp_params=OPT.mlp_params)
    roomy = plan_throughput(preset("h200-pcie5"), **kw)
    budget = roomy.working_set_bytes / 3
    tight = plan_throughput(preset("h200-pcie5"), gpu_budget_bytes=budget, **kw)
    assert len(tight.micro_batches) > len(roomy.micro_batches)
    assert sum(tight.micro_batches) == 256
    assert tight.working_set_bytes <= budget


@pytest.mark.parametrize("batch,m", [(10, 3), (7, 7), (128, 5)])
def test_even_split_covers_the_batch(batch, m):
    split = even_split(batch, m)
    assert sum(split) == batch and len(split) == m and max(split) - min(split) <= 1


@pytest.mark.parametrize("m,match", [(0, ">= 1"), (9, "larger than the batch"), (2.0, "integer"),
                                     (True, "integer")])
def test_bad_micro_batches_are_named(m, match):
    with pytest.raises(ValueError, match=match):
        plan_throughput(preset("h200-pcie5"), num_layers=2, batch_size=8, seq_len=64,
                        hidden_size=64, kv_hidden_size=64, dtype="float16", micro_batches=m)


def test_budget_below_two_layers_of_weights_names_the_numbers():
    shape = _shape(preset("h200-pcie5"), micro=(1,))
    need = working_set_bytes(shape, 0)
    with pytest.raises(ValueError, match=r"nothing fits.*working set"):
        plan_throughput(preset("h200-pcie5"), num_layers=6, batch_size=1, seq_len=256,
                        hidden_size=OPT.hidden_size, kv_hidden_size=OPT.kv_hidden_size,
                        dtype="float16", mlp_params=OPT.mlp_params,
                        gpu_budget_bytes=need * 0.9, device_mem_bytes_per_s=2e12)
    assert math.isfinite(need) and need > 2 * shape.layer_weight_bytes


def test_weight_slots_and_cache_slots_bound_the_prefetch():
    """Layer j+1's weights never load before layer j-1's last compute; a micro-batch's loads never
    run more than two units ahead of the compute."""
    shape = _shape(preset("h200-pcie5"), layers=4, micro=(4, 4))
    why = {(u, v): w for u, v, w in tg.edges(shape)}
    assert why[(("att", 0, 1), ("w", 2))] == "weight slot"
    assert why[(("att", 0, 0), ("x", 1, 0))] == "cache slot"
    order = tg.link_order(shape)
    assert order.index(("kv", 0, 1)) < order.index(("w", 1)) < order.index(("x", 1, 0))
