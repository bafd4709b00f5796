"""Piecewise inner compiler: inductor between the kvpr steps, the steps themselves in program order.

``compile_piecewise(lowered)`` takes the rewritten graph with its kvpr steps lowered to direct
calls (lower.py) and splits it (``torch.fx.passes.split_module``) into runs of kvpr nodes
(the direct calls, the items of their results, the split rule) and runs of everything else. The
outer graph calls the runs in the original order, so a layer's loads are still issued before the
previous layer's attention and its waits stay right before first use: copy/compute overlap is
kept while the model's own ops between the steps are fused.

Each run of everything else is ``torch.compile(piece.forward, backend="inductor", dynamic=True)``,
compiled on its first call. Compiling it here from Dynamo's fake values fails for pieces whose
inputs have sizes like ``past // 2`` or ``past + 1`` (inductor's symbol binding); a fresh trace
gives every size its own symbol. The price is one guard check per piece and call.

Inductor cannot reuse memory across pieces (every value between pieces is a reference the outer
graph holds) and never writes a piece's inputs, so loads keep writing device slots and stores
need no staging copy.
"""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from ..ops.specs import split_specs
from ..ops.split import split_len
from . import direct

STEP_FUNCTIONS = {getattr(direct, name) for name in dir(direct)
                  if callable(getattr(direct, name)) and not name.startswith("_")} \
    | {split_len, split_specs}


def is_step(node: fx.Node) -> bool:
    """A kvpr step: a direct call, a kvpr:: op, the split rule, or an item of a step's result."""
    if node.op != "call_function":
        return False
    if node.target in STEP_FUNCTIONS or getattr(node.target, "namespace", None) == "kvpr":
        return True
    if node.target is operator.getitem:
        src = node.args[0]
        return isinstance(src, fx.Node) and is_step(src)
    return False


def partitions(graph: fx.Graph) -> dict[fx.Node, int]:
    """Partition id per node: a new id each time the graph switches between steps and compute."""
    ids, current, last_kind = {}, 0, None
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        kind = is_step(node)
        if last_kind is not None and kind != last_kind:
            current += 1
        ids[node], last_kind = current, kind
    return ids


def compile_piecewise(lowered: fx.GraphModule) -> fx.GraphModule:
    """The split module, every piece between kvpr steps compiled by inductor on first call."""
    ids = partitions(lowered.graph)
    split = split_module(lowered, None, lambda n: ids[n], keep_original_order=True,
                         keep_original_node_name=True)
    steps = {f"submod_{i}" for n, i in ids.items() if is_step(n)}
    for node in split.graph.nodes:
        if node.op == "call_module" and node.target not in steps:
            piece = getattr(split, node.target)
            # the piece's own forward: each has its own code object, so Dynamo's per-code
            # recompile limit counts each piece apart (compiling the modules would share one)
            setattr(split, node.target,
                    Piece(torch.compile(piece.forward, backend="inductor", dynamic=True)))
    split.recompile()
    return split


class Piece(torch.nn.Module):
    """A compiled piece as a submodule of the outer graph."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)
