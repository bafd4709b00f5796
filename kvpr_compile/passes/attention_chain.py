"""How K and V reach an attention from the cache read: the chain of ops between them, and a
check, by running the chain on a probe, that it only lays them out (views, casts no narrower,
each head repeated as ``repeat_kv`` and ``repeat_interleave`` do, optionally the last two dims
swapped). The CPU part of a split attention reads the store's K,V and repeats that layout
itself, so anything else in the chain (a scale, a norm) keeps the layer off the CPU."""
from __future__ import annotations

import math

import torch
from torch import fx

from ..ops.errors import Unsupported
from .graph_utils import example_value, hint


def chain_from(operand, source: fx.Node) -> list[fx.Node] | None:
    """The nodes from ``source`` (excluded) to ``operand`` (included), each reading the previous
    one as its first argument; None where ``operand`` does not come from ``source`` so."""
    chain, node = [], operand
    for _ in range(32):
        if node is source:
            return chain[::-1]
        if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method") \
                or not node.args:
            return None
        chain.append(node)
        node = node.args[0]
    return None


def _concrete(arg):
    """An argument of a chain node as a plain value: sizes by their hint; a tensor by an empty
    one of its dtype (enough for ``to``/``type_as``; arithmetic with it fails the probe)."""
    def one(a):
        if not isinstance(a, fx.Node):
            return a
        value = example_value(a)
        if isinstance(value, torch.SymInt):
            return hint(value)
        if isinstance(value, torch.Tensor):
            return torch.zeros((), dtype=value.dtype)
        if isinstance(value, (int, float, bool, torch.dtype)):
            return value
        raise Unsupported(f"{a.name} is not a constant")
    return fx.node.map_aggregate(arg, one)


def probe_layout(chain: list[fx.Node], source: fx.Node, kv: torch.Tensor, what: str,
                 transposed: bool = False) -> int:
    """Run ``chain`` on a probe shaped like the cache read's result; returns the head repeat it
    applies (with the last two dims swapped where ``transposed``: K for ``q @ k^T``), or raises
    Unsupported when it does anything else."""
    shape = tuple(hint(s) for s in example_value(source).shape)
    probe = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    x = probe
    try:
        for node in chain:
            args, kwargs = _concrete(node.args[1:]), _concrete(dict(node.kwargs))
            x = getattr(x, node.target)(*args, **kwargs) if node.op == "call_method" \
                else node.target(x, *args, **kwargs)
    except Unsupported:
        raise
    except Exception as e:  # noqa: BLE001 - any op the probe cannot run is not a layout op
        raise Unsupported(f"{what} reaches attention through {node.name}, which the CPU part "
                          f"cannot repeat ({type(e).__name__})") from None
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] % shape[1]:
        raise Unsupported(f"{what} reaches attention in a shape the CPU part cannot repeat")
    rep = x.shape[1] // shape[1]
    want = probe.repeat_interleave(rep, dim=1)
    if transposed:
        want = want.transpose(-2, -1)
    if not (x.is_floating_point() and x.dtype.itemsize >= kv.dtype.itemsize
            and x.shape == want.shape and torch.equal(x.double(), want.to(x.dtype).double())):
        raise Unsupported(f"{what} reaches attention changed by more than layout and head "
                          f"repetition ({', '.join(n.name for n in chain) or 'as is'})")
    return rep
