"""The throughput planner's device-memory budget on grouped-query shapes (plan/throughput_lp.py):
K and V are h_kv wide, X and the hidden states h wide. Multi-head shapes (h_kv = h) cannot tell
the two apart; a Llama-3-8B layer (h = 4096, h_kv = 1024) can: the working set is checked
against its formula written out, and so is the micro-batch count a budget makes the planner
pick."""
from __future__ import annotations

import pytest

from kvpr_compile.plan.arch_presets import ARCH_PRESETS
from kvpr_compile.plan.presets import preset
from kvpr_compile.plan.throughput_lp import (even_split, plan_throughput, step_shape,
                                             working_set_bytes)

pytestmark = pytest.mark.quick

GQA = ARCH_PRESETS["llama-3-8b"]
P = 2   # float16
LAYERS, BATCH, SEQ = 4, 64, 1024


def by_formula(micro, s: int, x_tokens: int, arch=GQA) -> int:
    """Two layers' weights + four copies of the batch's hidden states + two cache slots (K,V of
    the largest micro-batch for s + 1 positions, X for ``x_tokens``) + the K,V its attention
    reads."""
    h, h_kv, b = arch.hidden_size, arch.kv_hidden_size, max(micro)
    weights = (2 * h * h + 2 * h * h_kv + arch.mlp_params) * P
    kv = 2 * b * h_kv * P * (s + 1)
    slot = kv + b * h * P * x_tokens
    return 2 * weights + 4 * sum(micro) * h * P + 2 * slot + kv


def shape(micro, s=SEQ):
    return step_shape(preset("h200-pcie5"), num_layers=LAYERS, micro_batches=micro, seq_len=s,
                      hidden_size=GQA.hidden_size, kv_hidden_size=GQA.kv_hidden_size,
                      dtype="float16", mlp_params=GQA.mlp_params)


def test_the_preset_is_grouped_query():
    assert GQA.kv_hidden_size * 4 == GQA.hidden_size


@pytest.mark.parametrize("micro,x_tokens", [((64,), 0), ((8, 8, 7), 0), ((8, 8, 7), 300),
                                            ((3, 2), 1024)],
                         ids=["64-x0", "8-8-7-x0", "8-8-7-x300", "3-2-x1024"])
def test_working_set_is_its_formula_with_kv_h_kv_wide(micro, x_tokens):
    assert working_set_bytes(shape(micro), x_tokens) == by_formula(micro, SEQ, x_tokens)


def test_a_budget_picks_its_micro_batch_count_by_the_gqa_working_set():
    """A budget just above the formula's working set for 2 micro-batches (1 does not fit): the
    planner tries 2, 4 and 8 and picks 8 (finer pipelining hides more of the first loads, and
    GQA recomputes nothing); its working set is the formula's and fits."""
    budget = 1.01 * by_formula(even_split(BATCH, 2), SEQ, 0)
    assert by_formula(even_split(BATCH, 1), SEQ, 0) > budget
    plan = plan_throughput(preset("h200-pcie5"), num_layers=LAYERS, batch_size=BATCH,
                           seq_len=SEQ, hidden_size=GQA.hidden_size,
                           kv_hidden_size=GQA.kv_hidden_size, dtype="float16",
                           mlp_params=GQA.mlp_params, gpu_budget_bytes=budget)
    assert [c["micro_batches"] for c in plan.candidates] == [2, 4, 8]
    assert all(c["fits"] for c in plan.candidates)
    assert plan.micro_batches == list(even_split(BATCH, 8))
    assert plan.recompute_tokens == [0] * LAYERS
    assert plan.working_set_bytes == by_formula(plan.micro_batches, SEQ, 0) <= budget
