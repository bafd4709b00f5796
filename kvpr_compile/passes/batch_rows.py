"""Whether a graph can run micro-batch by micro-batch, and what each input and output is.

The throughput schedule runs the graph on row ranges of the batch (one environment per
micro-batch), so every op must act on each row alone. On Dynamo's graph, before the rewrite:

- the batch is dim 0 of the new K of the cache reads (the cache's contract), and must be one
  symbol: a static batch (Dynamo's first compile specializes sizes; ``dynamic=True`` or a second
  batch size makes it symbolic) cannot be re-sized, and a batch that shares its symbol with a
  cached length (duck sizing) cannot be told apart from it;
- graph inputs are ``rows`` (a tensor with the batch on dim 0 and nowhere else: sliced),
  ``batch`` (the batch size itself: each micro-batch's size) or ``shared`` (no batch: weights,
  constants, the cache handle, side inputs such as a position table);
- outputs are ``rows`` (concatenated) or ``shared`` (taken from micro-batch 0);
- ops that mix rows are refused: a tensor computed from batch values without the batch (a
  reduction or a row pick), a scan, sort, concatenation, split or index along the batch axis, a
  ``squeeze()`` without a dim (a micro-batch of one row would lose its batch axis), and in-place
  writes into shared inputs (they would run once per micro-batch);
- row numbers (``arange(batch)``) are refused as values but allowed as the index that picks each
  row's own row along the batch axis (transformers 5.17's padding mask): passes/row_numbers.py;
- the batch size as a value, a slice bound or a second axis's size is refused:
  passes/batch_values.py.

``analyse`` returns the roles or raises ``Unsupported`` with the reason; the backend then keeps
the latency schedule and warns once.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from ..ops.errors import Unsupported
from ..ops.nodes import args_of
from . import batch_values, row_numbers
from .graph_utils import example_value, is_cache_update

# ops that act along one axis: name -> (position of the dim argument, its default; "all": the
# op acts on every axis). Along the batch axis they mix rows.
_ALONG_DIM = {
    **{name: (1, None) for name in ("cumsum", "cumprod", "cummax", "cummin", "logcumsumexp",
                                     "flip", "softmax", "log_softmax", "narrow", "select",
                                     "index_select", "gather", "scatter", "scatter_add",
                                     "median", "mode", "unflatten")},
    **{name: (1, -1) for name in ("sort", "argsort")},
    **{name: (1, 0) for name in ("cat", "concat", "concatenate", "stack", "unbind")},
    **{name: (2, 0) for name in ("split", "chunk", "tensor_split")},
    **{name: (2, -1) for name in ("topk", "kthvalue", "diff", "take_along_dim")},
    "roll": (2, "all"),
}


@dataclass
class BatchRows:
    symbol: object                 # the batch's sympy symbol
    inputs: list[str]              # per placeholder: "rows", "batch" or "shared"
    outputs: list[str]             # per output leaf: "rows" or "shared"
    example_batch: int


def _symbols(value) -> set:
    if isinstance(value, torch.SymInt):
        return set(value.node.expr.free_symbols)
    return set()


def _shape_symbols(value) -> list[set]:
    if isinstance(value, torch.Tensor):
        return [_symbols(s) for s in value.shape]
    return []


def _has_batch(value, sym) -> bool:
    return any(sym in s for s in _shape_symbols(value))


def _batch_axis(value, sym) -> int | None:
    for i, s in enumerate(_shape_symbols(value)):
        if sym in s:
            return i
    return None


def _name(node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[-1]


def _dim_arg(node):
    pos, default = _ALONG_DIM[_name(node)]
    dim = node.kwargs.get("dim", node.kwargs.get("dims"))
    if dim is None and len(node.args) > pos:
        dim = node.args[pos]
    return default if dim is None else dim


def _mixes_rows(node: fx.Node, sym) -> str | None:
    """Why ``node`` mixes rows of the batch, or None."""
    ins = [n for n in node.all_input_nodes if _has_batch(example_value(n), sym)]
    if not ins:
        return None
    out = example_value(node)
    if isinstance(out, torch.Tensor) and not _has_batch(out, sym):
        return "computes a tensor without the batch from batch rows (a reduction or a row pick)"
    first = node.args[0] if node.args else None
    if isinstance(first, (list, tuple)) and first:
        first = first[0]
    axis = _batch_axis(example_value(first), sym) if isinstance(first, fx.Node) else None
    if axis is None:
        return None
    name = _name(node)
    if name in _ALONG_DIM:
        dim = _dim_arg(node)
        rank = example_value(first).dim()
        dims = dim if isinstance(dim, (list, tuple)) else [dim]
        if dim == "all" or any(isinstance(d, int) and d % max(rank, 1) == axis for d in dims):
            return f"{name} along the batch axis"
    if name == "squeeze" and len(node.args) < 2 and "dim" not in node.kwargs:
        return "squeeze() without a dim (a one-row micro-batch would lose its batch axis)"
    if node.target is operator.getitem and isinstance(example_value(node.args[0]), torch.Tensor):
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if axis < len(index) and index[axis] != slice(None) and index[axis] is not Ellipsis \
                and not (axis > 0 and any(i is Ellipsis for i in index[:axis])):
            return "indexes along the batch axis"
    return None


def _writes_shared_input(node: fx.Node, roles: dict) -> bool:
    first = node.args[0] if node.args else None
    if not (isinstance(first, fx.Node) and roles.get(first) == "shared"):
        return False
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable and not str(schema.name).startswith("kvpr::")


def analyse(graph: fx.Graph) -> BatchRows:
    """The roles of ``graph``'s inputs and outputs under the throughput schedule (see the module
    docstring), or ``Unsupported`` with the reason."""
    sym, batch = _batch_symbol(graph)
    roles = _input_roles(graph, sym)
    inputs = list(roles.values())
    if "rows" not in inputs and "batch" not in inputs:
        raise Unsupported("no input carries the batch")
    numbered = _check_ops(graph, sym, roles)
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    outputs = [_output_role(leaf, sym, numbered)
               for leaf in torch.utils._pytree.tree_leaves(out_node.args[0])
               if isinstance(leaf, fx.Node)]
    return BatchRows(sym, inputs, outputs, int(batch.node.hint))


def _batch_symbol(graph: fx.Graph):
    """(Dynamo's symbol of the batch, the batch SymInt) every cache read agrees on; the batch
    must be dynamic and its own symbol."""
    sites = [n for n in graph.nodes if is_cache_update(n)]
    if not sites:
        raise Unsupported("no cache read to split by rows")
    batches = [example_value(args_of(n).k).shape[0] for n in sites]
    batch = batches[0]
    if not isinstance(batch, torch.SymInt) or batch.node.maybe_as_int() is not None:
        raise Unsupported(
            f"the graph's batch size is static ({int(batch)}): Dynamo specializes sizes at the "
            "first compile; compile with dynamic=True (or let a second batch size make it dynamic)")
    sym = batch.node.expr
    if not getattr(sym, "is_Symbol", False) or any(
            not isinstance(b, torch.SymInt) or b.node.expr != sym for b in batches):
        raise Unsupported("the cache reads disagree on the batch "
                          f"({sorted(set(map(str, batches)))})")
    for n in sites:
        if sym in _symbols(args_of(n).pos):
            raise Unsupported(f"the batch size and the cached length share Dynamo's symbol {sym} "
                              "(duck sizing: equal example values); rows cannot be told apart")
    return sym, batch


def _input_roles(graph: fx.Graph, sym) -> dict:
    """placeholder -> "batch" (the batch size itself), "rows" (the batch alone on dim 0) or
    "shared"."""
    roles: dict = {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        value = example_value(node)
        dims = _shape_symbols(value)
        if isinstance(value, torch.SymInt):
            role = "batch" if value.node.expr == sym else "shared"
            if role == "shared" and sym in _symbols(value):
                raise Unsupported(f"input {node.name} is computed from the batch size ({value})")
        elif any(sym in s for s in dims):
            if any(sym in s for s in dims[1:]) or value.shape[0].node.expr != sym:
                raise Unsupported(f"input {node.name} {tuple(value.shape)} has the batch "
                                  "elsewhere than alone on dim 0")
            role = "rows"
        else:
            role = "shared"
        roles[node] = role
    return roles


def _check_ops(graph: fx.Graph, sym, roles: dict) -> set:
    """Unsupported where an op mixes rows or writes a shared input; returns the row-number
    tensors (row_numbers.py)."""
    numbered: set = set()
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        if _writes_shared_input(node, roles):
            raise Unsupported(f"{node.name} writes in place into the shared input "
                              f"{node.args[0].name} (would run once per micro-batch)")
        if row_numbers.check(node, sym, numbered):
            continue
        why = batch_values.check(node, sym) or _mixes_rows(node, sym)
        if why:
            raise Unsupported(f"{node.name} ({_name(node)}) {why}")
    return numbered


def _output_role(leaf: fx.Node, sym, numbered: set) -> str:
    """"rows" (the batch alone on dim 0) or "shared", for one output of the graph."""
    if leaf in numbered:
        raise Unsupported(f"output {leaf.name} is the row numbers arange(batch): a "
                          "micro-batch numbers its rows from 0")
    value = example_value(leaf)
    dims = _shape_symbols(value)
    if isinstance(value, torch.Tensor) and any(sym in s for s in dims):
        if any(sym in s for s in dims[1:]) or value.shape[0].node.expr != sym:
            raise Unsupported(f"output {leaf.name} {tuple(value.shape)} has the batch "
                              "elsewhere than alone on dim 0")
        return "rows"
    if sym in _symbols(value):
        raise Unsupported(f"output {leaf.name} is computed from the batch size ({value})")
    return "shared"

