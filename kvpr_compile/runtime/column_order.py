"""Cut a lowered kvpr graph into layer segments for the throughput schedule's column order.

The backend makes the cut (``cut(lower(gm))``) and hands it to the runner (column_runner.py),
which only runs segments. It lives with the runtime because it reads the lowered graph's
vocabulary (direct.py's calls, ``resolve``), which only the runtime defines.

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

A segment's cache loads are a GraphModule of their own, ``prefetch``: the ``load_tokens`` /
``load_kv`` calls (``kvpr_role`` in ops.nodes.LOAD_ROLES, their getitems) with what they need
from the segment itself, where that is only ``resolve``, ``split_len`` or the record specs
(``split_specs``): loads read the handle, positions and static specs, never the micro-batch's
activations. The runner issues micro-batch k+1's prefetch before micro-batch k's body
(column_runner.py); the body takes the loaded views as inputs. Load groups that read anything
else stay in the body. The backend leaves the loads at their own layer for this schedule (no
layer-ahead hoisting), so segment j's prefetch loads layer j.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from ..ops.errors import Unsupported
from ..ops.nodes import (ASSEMBLE, CACHE_UPDATE, LOAD_ROLES, WEIGHTS_READY, WEIGHTS_RELEASE,
                         args_of, is_kvpr, role_of)
from ..ops.specs import split_specs
from ..ops.split import split_len
from . import direct

READY = (WEIGHTS_READY, torch.ops.kvpr.weights_ready)
RELEASE = (WEIGHTS_RELEASE, torch.ops.kvpr.weights_release)
_ASSEMBLES = {direct.cpu_store_assemble, direct.stream_store_assemble, direct.cpu_assemble,
              direct.stream_assemble, direct.cpu_cache_update, direct.stream_cache_update,
              ASSEMBLE, CACHE_UPDATE}


@dataclass
class Segment:
    module: fx.GraphModule
    inputs: list[fx.Node]                  # nodes of the lowered graph the module takes, in order
    outputs: list[fx.Node]                 # nodes of the lowered graph it returns, in order
    before: list[tuple] = field(default_factory=list)   # (target, args) hooks run once first
    after: list[tuple] = field(default_factory=list)    # ... and once after the last micro-batch
    drop: list[fx.Node] = field(default_factory=list)   # values no later segment reads
    prefetch: fx.GraphModule | None = None  # the segment's cache loads (run before its body)
    prefetch_inputs: list[fx.Node] = field(default_factory=list)
    prefetch_outputs: list[fx.Node] = field(default_factory=list)   # what the body (or later) reads


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


_LOAD_HELPERS = {direct.resolve, split_len, split_specs}


def _loads(kept: list[fx.Node], seg_of: dict, s: int) -> set[fx.Node]:
    """The nodes of segment ``s`` (``kept``, in order) that its prefetch runs: load nodes and
    the helpers they read, each reading only earlier segments, inputs or other such nodes."""
    wanted = {n for n in kept if n.op == "call_function"
              and (role_of(n) in LOAD_ROLES or n.target in _LOAD_HELPERS)}
    while True:   # drop nodes reading something of this segment outside the set
        out = {n for n in wanted
               if all(seg_of[src] != s or src in wanted for src in n.all_input_nodes)}
        if out == wanted:
            break
        wanted = out
    loads = {n for n in wanted if role_of(n) in ("load_tokens", "load_kv")
             and n.target is not operator.getitem}
    keep = set()
    for n in reversed(kept):   # the loads and the helpers they read (helpers alone stay put)
        if n in loads or (n in wanted and any(u in keep for u in n.users)):
            keep.add(n)
    keep |= {n for n in wanted if n.target is operator.getitem and n.args[0] in keep}
    return keep


@dataclass
class ColumnCut:
    """What the column runner runs: the segments of a lowered graph, in order."""
    segments: list[Segment]
    placeholders: list[fx.Node]   # the lowered graph's inputs, in order
    output: fx.Node               # its output node
    rule: str                     # what the cuts follow: "weights_ready" or "assemble"
    handles: set[fx.Node]         # the cache handles its steps read (graph inputs, if runnable)


def cut(lowered: fx.GraphModule) -> ColumnCut:
    """The column cut of ``lowered`` (raises Unsupported where the column order cannot run it)."""
    segs, placeholders, out_node, rule = segments(lowered)
    nodes = [n for n in lowered.graph.nodes if n.op == "call_function"]
    handles = {n.args[0] for n in nodes if n.target is direct.resolve}
    handles |= {args_of(n).handle for n in nodes if is_kvpr(n) and n.target not in READY + RELEASE}
    return ColumnCut(segs, placeholders, out_node, rule, handles)


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
    out = [_segment(gm, s, group, seg_of, last_use) for s, group in enumerate(groups)]
    return out, placeholders, out_node, rule


def _hooks(group: list) -> tuple[list, list, list]:
    """(weight-ready hooks, weight-release hooks, the rest) of one segment's nodes."""
    hooks_before, hooks_after, kept, released = [], [], [], False
    for node in group:
        if node.target in READY:
            if released:
                raise Unsupported(f"{node.name}: a layer's weights are made ready after "
                                  "another layer's release in one segment")
            hooks_before.append(node)
        elif node.target in RELEASE:
            released = True
            hooks_after.append(node)
        else:
            kept.append(node)
    return hooks_before, hooks_after, kept


def _prefetch(gm, kept: list, loads: list, last_use: dict, s: int):
    """(module, inputs, outputs) of the segment's loads, run ahead for the next micro-batch
    (None, [], [] where the segment loads nothing but getitems)."""
    if not any(n.target is not operator.getitem for n in loads):
        return None, [], []
    pre_graph, pre_env, pre_inputs = fx.Graph(), {}, []
    for node in kept:
        if node not in loads:
            continue
        for src in node.all_input_nodes:
            if src not in loads and src not in pre_env:
                pre_env[src] = pre_graph.placeholder(src.name)
                pre_inputs.append(src)
        pre_env[node] = pre_graph.node_copy(node, lambda n: pre_env[n])
    pre_outputs = [n for n in kept if n in loads
                   and (last_use.get(n, -1) > s or any(u not in loads for u in n.users))]
    pre_graph.output(tuple(pre_env[n] for n in pre_outputs))
    return fx.GraphModule(gm, pre_graph), pre_inputs, pre_outputs


def _segment(gm, s: int, group: list, seg_of: dict, last_use: dict) -> Segment:
    """Segment ``s`` of ``group``'s nodes: its module, what it reads and keeps, its hooks, the
    values it drops, its prefetch."""
    hooks_before, hooks_after, kept = _hooks(group)
    loads = _loads(kept, seg_of, s)
    prefetch, pre_inputs, pre_outputs = _prefetch(gm, kept, loads, last_use, s)
    if prefetch is not None:
        kept = [n for n in kept if n not in loads]
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
            if seg_of[src] != s or src in loads:
                value(src)
        env[node] = graph.node_copy(node, lambda n: env[n])
    outputs = [n for n in kept if last_use.get(n, -1) > s]
    graph.output(tuple(env[n] for n in outputs))
    module = fx.GraphModule(gm, graph)
    drop = [n for n, last in last_use.items() if last == s and seg_of[n] <= s]
    return Segment(module, inputs, outputs,
                   [(h.target, h.args) for h in hooks_before],
                   [(h.target, h.args) for h in hooks_after], drop,
                   prefetch, pre_inputs, pre_outputs)

