"""Layer-ahead prefetch placement (passes/prefetch.py) on the built-in Llama: where the loads go,
that waits stay between the loads and the first use, and that results stay exact (<= 1e-5)."""
from __future__ import annotations

import operator

import pytest
import torch
from torch import fx

from helpers import hoisting_backend, tiny_llama, worst_rel_err
from kvpr_compile.models import greedy_generate
from kvpr_compile.ops.nodes import args_of
from kvpr_compile.passes.prefetch import hoist_loads

kvpr = torch.ops.kvpr
TOL = 1e-5
LAYERS = 4


def run(model, ratio, graphs, distance=1, steps=8):
    prompt = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(7))
    compiled = torch.compile(model, backend=hoisting_backend(graphs, distance),
                             options={"ratio": ratio})
    return greedy_generate(compiled, prompt, model.make_cache(2, 96), steps)


def reference(model, steps=8):
    prompt = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(7))
    return greedy_generate(model, prompt, model.make_cache(2, 96), steps)


def kvpr_nodes(graph, target):
    return {n.meta["custom"]["kvpr_layer"]: n for n in graph.nodes if n.target is target}


def positions(graph):
    return {n: i for i, n in enumerate(graph.nodes)}


def check_placement(graph, distance=1):
    pos = positions(graph)
    loads, waits = kvpr_nodes(graph, kvpr.load_kv.default), kvpr_nodes(graph, kvpr.wait.default)
    assembles = kvpr_nodes(graph, kvpr.assemble.default)
    layers = sorted(assembles, key=lambda i: pos[assembles[i]])
    assert layers == list(range(LAYERS))
    for earlier, later in zip(layers, layers[distance:]):
        assert pos[loads[later]] < pos[assembles[earlier]], (earlier, later)
    for layer in layers:
        wait = waits[layer]
        loaded = args_of(wait).tensors
        assert all(n.op == "call_function" and n.target is operator.getitem for n in loaded)
        assert all(pos[n] < pos[wait] for n in loaded)     # the wait follows its loads ...
        first_use = min(pos[u] for n in loaded for u in n.users if u is not wait)
        assert pos[wait] < first_use                        # ... and precedes their first use
        if layer not in layers[:distance]:                  # loads moved up, the wait did not:
            earlier = layers[layers.index(layer) - distance]
            assert pos[wait] > pos[assembles[earlier]]


# 0.5 loads both K,V and X; 0 (K,V only) and 1 (X only) with --run-slow
@pytest.mark.parametrize("ratio", [pytest.param(0.0, marks=pytest.mark.slow), 0.5,
                                   pytest.param(1.0, marks=pytest.mark.slow)])
def test_next_layer_loads_precede_this_layers_assemble(ratio):
    model = tiny_llama()
    ref_tokens, ref_logits = reference(model)
    graphs = []
    tokens, logits = run(model, ratio, graphs)
    assert graphs, "the test backend was not called"
    for gm in graphs:                       # prefill graph and decode graph(s)
        check_placement(gm.graph)
    assert worst_rel_err(logits, ref_logits) <= TOL
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.quick
def test_split_len_and_load_tokens_move_with_load_kv():
    graphs = []
    run(tiny_llama(), 0.5, graphs)
    decode = graphs[-1].graph
    pos = positions(decode)
    assembles = kvpr_nodes(decode, kvpr.assemble.default)
    for target in (kvpr.load_tokens.default, kvpr.load_kv.default):
        nodes = kvpr_nodes(decode, target)
        for layer in range(1, LAYERS):
            assert pos[nodes[layer]] < pos[assembles[layer - 1]]
    splits = [n for n in decode.nodes if n.meta.get("custom", {}).get("kvpr_role") == "split"]
    assert len(splits) == LAYERS
    for node in splits:
        layer = node.meta["custom"]["kvpr_layer"]
        if layer:
            assert pos[node] < pos[assembles[layer - 1]]


def test_distance_two_and_idempotent():
    model = tiny_llama()
    ref_tokens, ref_logits = reference(model)
    graphs = []
    tokens, logits = run(model, 0.5, graphs, distance=2)
    for gm in graphs:
        check_placement(gm.graph, distance=2)
        before = [n.name for n in gm.graph.nodes]
        hoist_loads(gm.graph, 2)
        assert [n.name for n in gm.graph.nodes] == before
    assert worst_rel_err(logits, ref_logits) <= TOL and torch.equal(tokens, ref_tokens)


def _synthetic(layers, late_layer):
    """A hand-built graph of ``layers`` rewritten sites; ``late_layer``'s load needs a value
    computed from the previous layer's assemble output."""
    g = fx.Graph()
    handle, past = g.placeholder("handle"), g.placeholder("past")

    def call(target, args, layer, role):
        node = g.call_function(target, args)
        node.meta["custom"] = {"kvpr_ratio": 0.0, "kvpr_layer": layer, "kvpr_role": role}
        return node

    prev = None
    for layer in range(layers):
        end = past
        if layer == late_layer:
            end = g.call_function(torch.ops.aten.sym_size.int, (prev, 2))
        ld = call(kvpr.load_kv.default, (handle, layer, 0, end, 1, 1, 4, torch.float32,
                                         torch.device("cpu")), layer, "load_kv")
        k, v = (call(operator.getitem, (ld, i), layer, "load_kv") for i in range(2))
        call(kvpr.wait.default, ([k, v],), layer, "wait")
        asm = call(kvpr.assemble.default, (handle, layer, k, v, k, v, k, v), layer, "assemble")
        prev = call(operator.getitem, (asm, 0), layer, "assemble")
    g.output(prev)
    return g


def test_loads_whose_inputs_come_late_stay_put():
    g = _synthetic(3, late_layer=1)
    assert hoist_loads(g, 1) == 1            # layer 2 moves; layer 1 needs layer 0's output
    pos = positions(g)
    loads, assembles = kvpr_nodes(g, kvpr.load_kv.default), kvpr_nodes(g, kvpr.assemble.default)
    assert pos[loads[1]] > pos[assembles[0]]
    assert pos[loads[2]] < pos[assembles[1]]
    getitems = [n for n in g.nodes if n.target is operator.getitem and n.args[0] is loads[2]]
    assert len(getitems) == 2 and all(pos[n] < pos[assembles[1]] for n in getitems)
    g.lint()
