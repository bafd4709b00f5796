"""The batch size where the throughput schedule would change its meaning: as a value, as a slice
bound, or as the size of a second axis.

Run on micro-batches, every size computed from the batch symbol becomes the micro-batch's size.
That is right where the size shapes the batch axis itself (``view(b, s, -1)``,
``expand(b, -1)``, ``zeros(b, n)``, ``reshape(-1, h)`` flattening batch and tokens), and wrong
anywhere else, silently:

- as a value (``h / b``, ``x * b``, ``full(..., fill_value=b)``): each micro-batch divides by
  its own size;
- as a slice bound or index (``table[:b]``, ``x[:, :b]``): every micro-batch reads the first
  rows of the table, not its own;
- as the size of a second axis (``x[:, :b]`` on a batch-major tensor, a ``(b, b)`` matrix): each
  micro-batch sees a smaller square, and row i meets only its micro-batch's columns.

``check(node, sym)`` returns the reason such a node must keep the latency schedule, or None.
Row numbers (``arange(batch)``) are passes/row_numbers.py's, checked before this.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .graph_utils import example_value

# ops whose SymInt arguments are sizes (of the result, or of a view of the input): there the
# micro-batch's size is the right one, as long as the batch stays on one axis of the result
SIZE_OPS = frozenset({
    "view", "reshape", "expand", "broadcast_to", "repeat", "unflatten", "new_zeros", "new_ones",
    "new_empty", "new_full", "zeros", "ones", "empty", "full", "rand", "randn", "empty_strided",
    "_unsafe_view", "view_as", "expand_as", "reshape_as",
})


def _name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[-1]


def _mentions(value, sym) -> bool:
    return isinstance(value, torch.SymInt) and sym in value.node.expr.free_symbols


def _batch_args(node: fx.Node, sym) -> list[str]:
    """The SymInt arguments of ``node`` (anywhere in its args and kwargs, slices included)
    computed from the batch symbol, as text."""
    found = []

    def visit(arg):
        if isinstance(arg, slice):
            for part in (arg.start, arg.stop, arg.step):
                visit(part)
        elif isinstance(arg, (list, tuple)):
            for part in arg:
                visit(part)
        elif isinstance(arg, dict):
            for part in arg.values():
                visit(part)
        elif isinstance(arg, fx.Node):
            value = example_value(arg)
            if _mentions(value, sym):   # "s52", or "mul_3 = 2*s52"
                found.append(arg.name if str(value) == arg.name else f"{arg.name} = {value}")
        elif _mentions(arg, sym):
            found.append(str(arg))
    visit(node.args)
    visit(node.kwargs)
    return found


def _batch_axes(value, sym) -> list[int]:
    if not isinstance(value, torch.Tensor):
        return []
    return [i for i, s in enumerate(value.shape) if _mentions(s, sym)]


def check(node: fx.Node, sym) -> str | None:
    """Why ``node`` uses the batch size other than as the batch axis's size, or None."""
    if node.op not in ("call_function", "call_method"):
        return None
    out = example_value(node)
    if not isinstance(out, torch.Tensor):   # SymInt arithmetic, sizes, tuples of sizes
        return None
    axes = _batch_axes(out, sym)
    if len(axes) > 1:
        return (f"has the batch size in {len(axes)} axes {tuple(out.shape)} (a micro-batch "
                "would see only its own rows along each)")
    uses = _batch_args(node, sym)
    if not uses:
        return None
    if node.target is operator.getitem:
        return f"indexes or slices with the batch size ({', '.join(uses)})"
    if _name(node) not in SIZE_OPS:
        return f"uses the batch size as a value ({', '.join(uses)})"
    return None
