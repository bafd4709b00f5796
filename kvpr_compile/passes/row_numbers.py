"""Row numbers under the throughput schedule: ``torch.arange(batch)`` and the one use of it that
keeps rows apart.

Run micro-batch by micro-batch, ``arange(batch)`` numbers each micro-batch's rows from 0, not by
their place in the whole batch, so as a value it differs from the whole-batch program. As the
index of the batch axis of a tensor of the same micro-batch it picks each row's own row in both
programs: ``mask[arange(b)[:, None, None, None], kv]`` (how transformers 5.17's padding mask
function reads a row's mask, ``sdpa_mask`` without vmap) gives row i of the result from row i
of ``mask`` alone.

``check`` classifies one node against the row-number tensors seen so far (``numbered``):

- ``arange(batch)`` (start 0, step 1), and the same values with size-1 axes added or moved to
  the device (``[:, None]``, ``unsqueeze``, ``to``, ``contiguous``, ``clone``), are row numbers;
- an index ``x[..., rows, ...]`` whose tensor entry at ``x``'s batch axis is row numbers is a
  pick of each row's own row, if ``x`` has the batch on that axis alone, no other entry is row
  numbers or computed from the batch size, and the result has the batch on one axis alone (an
  index tensor carrying the batch on another broadcast axis would cross rows: result[i, j] reads
  row j for every i);
- any other use of row numbers, and an ``arange`` over any other range computed from the batch
  size, is refused (``Unsupported``).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..ops.errors import Unsupported
from .graph_utils import example_value

_KEEP_VALUES = ("unsqueeze", "to", "contiguous", "clone")


def _expr(arg):
    value = example_value(arg)
    return value.node.expr if isinstance(value, torch.SymInt) else value


def _mentions(arg, sym) -> bool:
    if isinstance(arg, slice):
        return any(_mentions(a, sym) for a in (arg.start, arg.stop, arg.step))
    value = example_value(arg)
    return isinstance(value, torch.SymInt) and sym in value.node.expr.free_symbols


def _is_numbered(entry, numbered: set) -> bool:
    return isinstance(entry, fx.Node) and entry in numbered


def _batch_dims(value, sym) -> list[int]:
    if not isinstance(value, torch.Tensor):
        return []
    return [i for i, s in enumerate(value.shape)
            if isinstance(s, torch.SymInt) and sym in s.node.expr.free_symbols]


def _name(node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[-1]


def _arange(node, sym) -> bool:
    """True for ``arange(batch)``; Unsupported for an arange over another range computed from
    the batch size; False for an arange that does not involve the batch."""
    args = list(node.args)
    start, end, step = 0, None, 1
    if len(args) == 1:
        end = args[0]
    elif args:
        start, end, step = (args + [1])[:3]
    start = node.kwargs.get("start", start)
    end = node.kwargs.get("end", end)
    step = node.kwargs.get("step", step)
    if not any(_mentions(a, sym) for a in (start, end, step)):
        return False
    if _expr(start) == 0 and _expr(step) == 1 and _expr(end) == sym:
        return True
    raise Unsupported(f"{node.name} (arange) numbers a range computed from the batch size: a "
                      "micro-batch would number it differently")


def _keeps_values(node, numbered: set) -> bool:
    """``node`` holds the values of a row-number tensor with at most size-1 axes added."""
    first = node.args[0] if node.args else None
    if not _is_numbered(first, numbered):
        return False
    if node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return all(i is None or i is Ellipsis or i == slice(None) for i in index)
    if _name(node) not in _KEEP_VALUES:
        return False
    before, after = example_value(first), example_value(node)
    return isinstance(after, torch.Tensor) and after.dtype == before.dtype


def _consumed_dims(entry) -> int:
    """How many axes of the indexed tensor an index entry consumes."""
    if entry is None or entry is Ellipsis:
        return 0
    value = example_value(entry)
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        return value.dim()
    return 1


def _entry_at(index: tuple, axis: int, rank: int) -> list[int]:
    """The positions in ``index`` of the entries that consume axis ``axis`` of the tensor."""
    hits, pos = [], 0
    for k, entry in enumerate(index):
        if entry is Ellipsis:
            pos = rank - sum(_consumed_dims(e) for e in index[k + 1:])
            continue
        width = _consumed_dims(entry)
        if pos <= axis < pos + width:
            hits.append(k)
        pos += width
    return hits


def _own_row_pick(node, sym, numbered: set) -> str | None:
    """Why ``node`` (a node reading row numbers) is not a pick of each row's own row, or None
    when it is one."""
    if node.target is not operator.getitem or _is_numbered(node.args[0], numbered):
        return "uses them as values"
    source = example_value(node.args[0])
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    axes = _batch_dims(source, sym)
    if len(axes) != 1 or _expr(source.shape[axes[0]]) != sym:
        return "indexes a tensor without the batch on one axis alone"
    if sum(e is Ellipsis for e in index) > 1:
        return "indexes with more than one Ellipsis"
    at = _entry_at(index, axes[0], source.dim())
    if len(at) != 1 or not _is_numbered(index[at[0]], numbered):
        return "uses them elsewhere than at the batch axis of the indexed tensor"
    rows = index[at[0]]
    tensors = [e for e in index if isinstance(example_value(e), torch.Tensor)]
    if any(_mentions(e, sym) for e in index if not isinstance(example_value(e), torch.Tensor)):
        return "indexes another axis by a size computed from the batch size"
    if any(_is_numbered(e, numbered) for e in tensors if e is not rows):
        return "uses them to index another axis"
    own = _batch_dims(example_value(rows), sym)
    if len(own) != 1 or _expr(example_value(rows).shape[own[0]]) != sym:
        return "picks with row numbers whose batch axis is not one axis of the batch size"
    if len(_batch_dims(example_value(node), sym)) != 1:   # another index tensor's batch axis
        return "gives a result with the batch on more than one axis (rows crossed)"
    return None


def check(node: fx.Node, sym, numbered: set) -> bool:
    """True if ``node`` holds row numbers (then added to ``numbered``) or picks each row's own
    row with them; False if it has nothing to do with row numbers; Unsupported if it uses them
    any other way (see the module docstring)."""
    if node.op == "call_function" and node.target is torch.arange:
        if _arange(node, sym):
            numbered.add(node)
            return True
        return False
    if not any(n in numbered for n in node.all_input_nodes):
        return False
    if _keeps_values(node, numbered):
        numbered.add(node)
        return True
    why = _own_row_pick(node, sym, numbered)
    if why:
        raise Unsupported(f"{node.name} ({_name(node)}) reads the row numbers arange(batch) and "
                          f"{why}: a micro-batch numbers its rows from 0")
    return True
