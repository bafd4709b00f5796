"""The step's task graph: structure, and its longest path against the LP and the cost model."""
from __future__ import annotations

import random

import networkx as nx
import pytest
import torch

from kvpr_compile.plan import cost_model as cm
from kvpr_compile.plan.presets import PRESETS
from kvpr_compile.plan.latency_lp import plan_split
from kvpr_compile.plan.taskgraph import (END, build_task_graph, critical_path, plan_task_graph,
                                    predicted_step_time)

pytestmark = pytest.mark.quick

H200 = PRESETS["h200-pcie5"]


def coefficients(**kw):
    args = dict(batch_size=8, seq_len=1024, hidden_size=4096, kv_hidden_size=4096,
                dtype=torch.float16)
    args.update(kw)
    return cm.layer_coefficients(PRESETS["a100-pcie4"], **args)


@pytest.mark.parametrize("overlap", cm.OVERLAPS)
def test_structure(overlap):
    n = 4
    g = build_task_graph(coefficients(), [100] * n, [10] * n, overlap)
    assert nx.is_directed_acyclic_graph(g)
    assert g.number_of_nodes() == 5 * n + 1
    # each resource is one serial chain, in schedule order
    for resource in ("link", "gpu"):
        tasks = [v for v, d in g.nodes(data=True) if d["resource"] == resource]
        order = list(nx.topological_sort(g.subgraph(tasks)))
        assert len(tasks) == (3 * n if resource == "link" else 2 * n)
        for u, v in zip(order, order[1:]):
            assert g.has_edge(u, v), (u, v)
    for i in range(n):
        assert g.has_edge(("x", i), ("rc", i)) and g.has_edge(("kv", i), ("attn", i))
        assert g.has_edge(("attn", i), ("store", i))
        assert g.nodes[("x", i)]["duration"] == pytest.approx(100 * 8 * 4096 * 2 / 25e9)
    # layer-ahead prefetch: layer i+1's loads do not wait for layer i's attention
    for i in range(n - 1):
        assert not nx.has_path(g, ("attn", i), ("x", i + 1))
        assert not nx.has_path(g, ("attn", i), ("kv", i + 1))
    if overlap == "row":     # but they do wait for layer i's recompute (the paper's order)
        assert all(g.has_edge(("rc", i), ("x", i + 1)) for i in range(n - 1))
    else:                    # only for the slot of layer i-1
        assert not nx.has_path(g, ("rc", 1), ("x", 2))
        assert all(nx.has_path(g, ("attn", i), ("x", i + 2)) for i in range(n - 2))
    for u, v, d in g.edges(data=True):
        assert d["weight"] == g.nodes[u]["duration"]
    assert all(g.has_edge(v, END) for v in g.nodes if v != END)


def test_single_layer_by_hand():
    c = coefficients()
    l = 300
    g = build_task_graph(c, [l])
    a, r, k = c.x_load_s(l), c.recompute_s(l), c.kv_load_s(l)
    m, rest = c.assemble_s, c.rest_s
    assert m > 0 and rest > 0
    assert predicted_step_time(g) == pytest.approx(a + max(r, k) + m + rest + c.store_s)


@pytest.mark.parametrize("overlap", cm.OVERLAPS)
def test_longest_path_equals_cost_model_for_any_split(overlap):
    rng = random.Random(0)
    for kv in (4096, 1024):
        c = coefficients(kv_hidden_size=kv, seq_len=2048)
        for _ in range(60):
            n = rng.randint(1, 7)
            resident = [rng.choice([0, rng.randint(0, 2048)]) for _ in range(n)]
            recompute = [rng.randint(0, 2048 - r) for r in resident]
            g = build_task_graph(c, recompute, resident, overlap)
            assert predicted_step_time(g) == pytest.approx(
                cm.step_time(c, recompute, resident, overlap), rel=1e-12)


@pytest.mark.parametrize("overlap", cm.OVERLAPS)
@pytest.mark.parametrize("profile", list(PRESETS.values()), ids=list(PRESETS))
@pytest.mark.parametrize("kv,budget", [(4096, None), (1024, None), (4096, 3e9), (5120, 6e9)])
def test_longest_path_agrees_with_lp(overlap, profile, kv, budget):
    h = 5120 if kv == 5120 else 4096
    plan = plan_split(profile, num_layers=8, batch_size=16, seq_len=2048, hidden_size=h,
                      kv_hidden_size=kv, dtype=torch.float16, gpu_budget_bytes=budget,
                      overlap=overlap)
    longest = predicted_step_time(plan)
    # the same model at the integer plan: equal up to float rounding
    assert longest == pytest.approx(plan.predicted_step_s, rel=1e-12)
    # the LP's own optimum (continuous l, r) differs only by the flooring to whole tokens
    assert longest == pytest.approx(plan.lp_objective_s, rel=5e-3)
    assert longest >= plan.lp_objective_s * (1 - 1e-9)
    # and the baseline graph reproduces the baseline
    zeros = [0] * 8
    g0 = build_task_graph(plan.coefficients, zeros, zeros, overlap)
    assert predicted_step_time(g0) == pytest.approx(plan.baseline_step_s, rel=1e-12)


def test_critical_path_of_full_kv_prefetch_is_the_link():
    plan = plan_split(H200, num_layers=4, batch_size=16, seq_len=2048, hidden_size=4096,
                      kv_hidden_size=1024, dtype=torch.float16)
    path = critical_path(plan)
    assert [v for v in path if v[0] == "kv"] == [("kv", i) for i in range(4)]
    assert path[-1] == ("store", 3)
    assert plan_task_graph(plan).number_of_nodes() == 21
