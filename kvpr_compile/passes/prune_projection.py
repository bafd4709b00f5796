"""Recompute only the K/V columns of a fused QKV projection.

A fused projection (GPT-2's ``c_attn``, nanoGPT, StarCoder's multi-query ``c_attn``) computes
q|k|v in one GEMM and splits the result along the last dim; the recompute slice uses only the K
and V chunks, so the Q columns (a third of the FLOPs or more) are wasted work. When the chunks the
slice uses are contiguous, this pass narrows the projection to their columns (weight and bias
sliced as views, no copy) and renumbers the split. Layouts that interleave q/k/v per head
(GPT-NeoX, Falcon) are left as they are: the slice is still exact, only not narrowed.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .graph_utils import example_value, projection_args


def _width(node) -> int | None:
    val = example_value(node)
    return (int(val.shape[-1])
            if isinstance(val, torch.Tensor) and isinstance(val.shape[-1], int) else None)


def _chunks(split: fx.Node, width: int) -> list[int] | None:
    size = split.args[1] if len(split.args) > 1 else split.kwargs.get("split_size")
    if isinstance(size, int):
        return [min(size, width - i) for i in range(0, width, size)]
    if (isinstance(size, (list, tuple)) and all(isinstance(s, int) for s in size)
            and sum(size) == width):
        return list(size)
    return None


def _last_dim(node: fx.Node, dim) -> bool:
    val = example_value(node)
    return (isinstance(dim, int) and isinstance(val, torch.Tensor)
            and dim % val.dim() == val.dim() - 1)


def prune_fused_projection(gm: fx.GraphModule) -> bool:
    """Narrow the first fused projection feeding a last-dim split; True if the graph changed."""
    for proj in gm.graph.nodes:
        layout = projection_args(proj)
        if layout is None:
            continue
        _, w_arg, b_arg, out_dim = layout
        width = _width(proj)
        if width is None or not isinstance(proj.args[w_arg], fx.Node):
            continue
        chain, node = [], proj
        while len(node.users) == 1:   # follow ops that keep the last dim as is
            user = next(iter(node.users))
            if user.op == "call_method" and user.target in ("view", "reshape", "unsqueeze") \
                    and _width(user) == width:
                chain.append(user)
                node = user
                continue
            break
        split = next(iter(node.users)) if len(node.users) == 1 else None
        if split is None or not (split.op == "call_method" and split.target == "split"):
            continue
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        sizes = _chunks(split, width)
        getters = list(split.users)
        if sizes is None or not _last_dim(node, dim) or not all(
                g.op == "call_function" and g.target is operator.getitem for g in getters):
            continue
        used = sorted({g.args[1] for g in getters})
        i0, i1 = used[0], used[-1]
        if used != list(range(i0, i1 + 1)) or (i0 == 0 and i1 == len(sizes) - 1):
            continue
        c0, c1 = sum(sizes[:i0]), sum(sizes[:i1 + 1])
        _narrow(gm.graph, proj, chain, split, getters, w_arg, b_arg, out_dim, c0, c1, width,
                sizes[i0:i1 + 1], i0)
        gm.recompile()
        return True
    return False


def _narrow(graph, proj, chain, split, getters, w_arg, b_arg, out_dim, c0, c1, width, sizes, i0):
    args = list(proj.args)
    rows = (slice(None),) * out_dim + (slice(c0, c1),)   # the weight's output features c0..c1
    with graph.inserting_before(proj):
        args[w_arg] = graph.call_function(operator.getitem, (args[w_arg], rows))
        if b_arg is not None and isinstance(args[b_arg], fx.Node):
            args[b_arg] = graph.call_function(operator.getitem, (args[b_arg], slice(c0, c1)))
    proj.args = tuple(args)
    for node in chain:
        if node.target in ("view", "reshape"):
            shape = list(node.args[1:])
            nested = len(shape) == 1 and isinstance(shape[0], (tuple, list))
            shape = list(shape[0]) if nested else shape
            if shape and shape[-1] == width:
                shape[-1] = c1 - c0
            node.args = (node.args[0], tuple(shape)) if nested else (node.args[0], *shape)
    split.args = (split.args[0], list(sizes), *split.args[2:])
    split.kwargs = {k: v for k, v in split.kwargs.items() if k != "split_size"}
    for g in getters:
        g.args = (g.args[0], g.args[1] - i0)
