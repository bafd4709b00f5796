"""Where the token axis is in the recompute slice, traced back from the cache's K/V (whose token
dim is 2 by the cache contract) through layout and elementwise ops.

Used to find a side input's token dim when its sizes alone are ambiguous (a prompt as long as
head_dim makes RoPE's cos (1, 1, n, d) have two dims of size n). Ops without a rule end the walk.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .graph_utils import COMPLEX_VIEWS, NORMS, example_value, is_pointwise


def _rank(node) -> int | None:
    val = example_value(node) if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _dim_arg(node: fx.Node, pos: int, default):
    return node.args[pos] if len(node.args) > pos else node.kwargs.get("dim", default)


def _element_rank(node) -> int | None:
    """Rank of a tensor, or of the tensors of a tuple (the result of unbind / split)."""
    val = example_value(node) if isinstance(node, fx.Node) else None
    if isinstance(val, (tuple, list)) and val and isinstance(val[0], torch.Tensor):
        return val[0].dim()
    return val.dim() if isinstance(val, torch.Tensor) else None


def operand_dim(node: fx.Node, operand: fx.Node, dim: int) -> int | None:
    """The dim of ``operand`` that becomes dim ``dim`` of ``node``'s output (of each element,
    for ops returning tuples), if a rule knows it."""
    r, ra = _element_rank(node), _element_rank(operand)
    if r is None or ra is None:
        return None
    t, args, method = node.target, node.args, node.op == "call_method"
    if t is operator.getitem and isinstance(example_value(operand), (tuple, list)):
        return dim                                   # one element of unbind / split / chunk
    if t in (torch.stack, torch.cat, torch.concat) and operand in args[0]:
        d = _dim_arg(node, 1, 0) % r
        if t is torch.stack:
            return None if dim == d else dim if dim < d else dim - 1
        return None if dim == d else dim
    if operand is args[0] and (t == "unbind" or t is torch.unbind):
        d = _dim_arg(node, 1, 0) % ra
        return dim if dim < d else dim + 1
    if operand is args[0] and (t in ("split", "chunk") or t in (torch.split, torch.chunk)):
        return None if dim == _dim_arg(node, 2, 0) % ra else dim
    if operand is args[0] and t in NORMS:            # normalise trailing dims, keep the layout
        return dim
    if t in COMPLEX_VIEWS:   # only the trailing (real, imag) dim changes
        return dim if dim < min(r, ra) else None
    if is_pointwise(node):   # broadcasting aligns dims from the right
        idx = dim - (r - ra)
        return idx if 0 <= idx < ra else None
    if operand is not args[0]:
        return None
    if t == "transpose" or t is torch.transpose:
        i, j = (a % r for a in args[1:3])
        return j if dim == i else i if dim == j else dim
    if t == "permute" or t is torch.permute:
        dims = args[1:] if method else args[1]
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        return dims[dim] % r
    if t == "flatten" or t is torch.flatten:
        start = (args[1] if len(args) > 1 else 0) % ra
        end = (args[2] if len(args) > 2 else -1) % ra
        return dim if dim < start else dim + (end - start) if dim > start else None
    if t == "unsqueeze" or t is torch.unsqueeze:
        u = args[1] % r
        return None if dim == u else dim if dim < u else dim - 1
    return None


def token_dims(outputs: list[fx.Node], members: set[fx.Node], order: dict) -> dict[fx.Node, int]:
    """Token dim of every slice node (and side input) the walk from ``outputs`` reaches."""
    tdim = {o: 2 for o in outputs}
    for node in sorted(members, key=order.__getitem__, reverse=True):
        if node not in tdim or node.op not in ("call_function", "call_method"):
            continue
        for inp in node.all_input_nodes:
            d = operand_dim(node, inp, tdim[node])
            if d is not None:
                tdim.setdefault(inp, d)
    return tdim
