"""The recompute slice of one attention site, as extraction (recompute_slice.py) finds it, the
one-token specialisation (one_token.py) and the token batching fill it in, and the rewrite
(rewrite.py) consumes it; and ``same``, the size equality all of them decide on."""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true


@dataclass
class RecomputeSlice:
    x: fx.Node
    token_inputs: list[fx.Node]   # X first, then per-token side inputs
    tdims: list[int]              # token dim of each in this graph; -1: one record per call
    consts: list                  # other slice inputs (nodes or values), passed unchanged
    nodes: list[fx.Node]          # the slice, in graph order
    single_token: bool            # this graph adds one token per call
    module: fx.GraphModule | None = None  # (records[l, ...]..., consts...) -> K,V (b, hkv, l, d);
                                          # None: this graph loads the whole past
    narrowed: bool = False        # a fused QKV projection recomputes only its K/V columns
    past_note: str = ""           # multi-token graphs: whether and why (not) the past is recomputed


def same(a, b) -> bool:
    """Whether two sizes (ints or SymInts) are provably equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return statically_known_true(a == b)
    except Exception:  # noqa: BLE001 - mixed symbolic types: not provably equal
        return False
