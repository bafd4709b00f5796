"""The split rule (how many past tokens a ratio recomputes) and the empty prefix rewritten graphs
call where nothing is recomputed. The rewrite, the loads, the runtime's cross-call prefetch and
the benchmarks' physical limit all use this one rule."""
from __future__ import annotations

from fractions import Fraction

import torch


def ratio_fraction(ratio: float) -> Fraction:
    """The ratio as the small fraction the rewrite bakes into the graph."""
    return Fraction(ratio).limit_denominator(1000)


def recompute_tokens(ratio: float, past: int) -> int:
    """Tokens recomputed (X shipped) out of ``past`` at ``ratio``."""
    frac = ratio_fraction(ratio)
    return split_len(past, frac.numerator, frac.denominator)


def split_len(past, num: int, den: int):
    """l = floor(ratio * past) for ratio = num/den; works on ints and SymInts alike."""
    return (past * num) // den


def empty_past(t: torch.Tensor) -> torch.Tensor:
    """A zero-length K/V prefix shaped like ``t`` (no recompute)."""
    return t[:, :, :0]
