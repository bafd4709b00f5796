"""Cut a lowered kvpr graph into layer segments for the throughput schedule's column order.

The step runs segment j for every micro-batch before segment j + 1, so the layer weights a
segment uses serve all micro-batches while they are on the device. Cuts (in graph order):

- before every ``kvpr::weights_ready`` (layers whose weights are streamed, ``stream_weights``):
  segment j then holds layer j's hooks and all uses of its weights;
- otherwise right after each rewritten layer's assemble (weights are resident, only the cache
  traffic is column-ordered).

Any contiguous cut is correct, since each micro-batch keeps its own values; the cuts only decide
the order. The weight hooks are taken out of the segments: ``weights_ready`` runs once before a
segment's first micro-batch, ``weights_release`` once after its last (a segment with a ready after
a release is refused: the slot it refills would still be read). Each segment becomes one
GraphModule (inputs: the values it reads from earlier segments or the graph's inputs; outputs:
what later segments or the graph's output read), built once and called for every micro-batch:
compile time grows with the layers, not with layers x micro-batches.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from ..runtime import direct
from ..runtime import weight_stream  # noqa: F401  (registers the kvpr::weights_* ops)
from .recompute_slice import Unsupported

READY = (torch.ops.kvpr.weights_ready.default, torch.ops.kvpr.weights_ready)
RELEASE = (torch.ops.kvpr.weights_release.default, torch.ops.kvpr.weights_release)
_ASSEMBLES = {direct.cpu_store_assemble, direct.stream_store_assemble, direct.cpu_assemble,
              direct.stream_assemble, direct.cpu_cache_update, direct.stream_cache_update,
              torch.ops.kvpr.assemble.default, torch.ops.kvpr.cache_update.default}


@dataclass
class Segment:
    module: fx.GraphModule
    inputs: list[fx.Node]                  # nodes of the lowered graph the module takes, in order
    outputs: list[fx.Node]                 # nodes of the lowered graph it returns, in order
    before: list[tuple] = field(default_factory=list)   # (target, args) hooks run once first
    after: list[tuple] = field(default_factory=list)    # ... and once after the last micro-batch
    drop: list[fx.Node] = field(default_factory=list)   # values no later segment reads


def _cuts(body: list[fx.Node]) -> tuple[set[fx.Node], str]:
    ready = [n for n in body if n.target in READY]
    if ready:
        return set(ready), "weights_ready"
    cuts = set()
    for i, node in enumerate(body):
        if node.op == "call_function" and node.target in _ASSEMBLES:
            j = i + 1
            while j < len(body) and body[j].target is operator.getitem and body[j].args[0] is node:
                j += 1
            if j < len(body):
                cuts.add(body[j])
    return cuts, "assemble"


def segments(gm: fx.GraphModule) -> tuple[list[Segment], list[fx.Node], fx.Node, str]:
    """(segments, placeholders, output node, what the cuts follow) of the lowered ``gm``."""
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    out_node = nodes[-1]
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    cuts, rule = _cuts(body)
    seg_of: dict[fx.Node, int] = {p: -1 for p in placeholders}
    groups: list[list[fx.Node]] = [[]]
    for node in body:
        if node in cuts and groups[-1]:
            groups.append([])
        groups[-1].append(node)
        seg_of[node] = len(groups) - 1
    last_use: dict[fx.Node, int] = {}
    for node in body:
        for src in node.all_input_nodes:
            last_use[src] = max(last_use.get(src, -1), seg_of[node])
    for src in out_node.all_input_nodes:
        last_use[src] = len(groups)   # kept to the end
    out = []
    for s, group in enumerate(groups):
        hooks_before, hooks_after, kept, released = [], [], [], False
        for node in group:
            if node.target in READY:
                if released:
                    raise Unsupported(f"{node.name}: a layer's weights are made ready after another "
                                      "layer's release in one segment")
                hooks_before.append(node)
            elif node.target in RELEASE:
                released = True
                hooks_after.append(node)
            else:
                kept.append(node)
        graph, env, inputs = fx.Graph(), {}, []

        def value(src):
            if src not in env:
                env[src] = graph.placeholder(src.name)
                inputs.append(src)
            return env[src]

        for hook in hooks_before + hooks_after:
            for src in hook.all_input_nodes:   # the hooks' arguments, read from micro-batch 0
                if seg_of[src] == s:
                    raise Unsupported(f"{hook.name} reads {src.name}, computed in its own segment")
        for node in kept:
            for src in node.all_input_nodes:
                if seg_of[src] != s:
                    value(src)
            env[node] = graph.node_copy(node, lambda n: env[n])
        outputs = [n for n in kept if last_use.get(n, -1) > s]
        graph.output(tuple(env[n] for n in outputs))
        module = fx.GraphModule(gm, graph)
        drop = [n for n, last in last_use.items() if last == s and seg_of[n] <= s]
        out.append(Segment(module, inputs, outputs,
                           [(h.target, h.args) for h in hooks_before],
                           [(h.target, h.args) for h in hooks_after], drop))
    return out, placeholders, out_node, rule
