"""The split rule (how many past tokens a ratio recomputes), the resident rule (how many sit on
the device), the CPU rule (where the range the CPU attends to starts) and the empty prefix
rewritten graphs call where nothing is recomputed. The rewrite, the loads, the runtime's
cross-call prefetch and the benchmarks' physical limit all use these rules."""
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


def resident_len(past, num: int, den: int, cap: int):
    """r = min(floor(resident_ratio * past), cap) for resident_ratio = num/den (``cap`` < 0: no
    cap); works on ints and SymInts alike (``torch.sym_min`` guards on nothing)."""
    r = (past * num) // den
    if cap < 0:
        return r
    return min(r, cap) if isinstance(r, int) else torch.sym_min(r, cap)


def cpu_start(past, num: int, den: int, taken, first=0):
    """Where the CPU's key range [start, past) begins: past - c, c = floor(cpu_ratio * (past -
    first)) for cpu_ratio = num/den (``first``: a sliding window's first position, else 0),
    capped so that the range starts at or after ``taken`` (the end of what the device holds or
    recomputes; a budget's share may take the whole past); ints and SymInts alike."""
    c = ((past - first) * num) // den
    room = past - taken
    if isinstance(c, int) and isinstance(room, int):
        return past - min(c, room)
    return past - torch.sym_min(c, room)


def resident_capacity(max_seq_len: int, num: int, den: int, cap: int) -> int:
    """Rows a layer's resident prefix can ever hold in a cache of ``max_seq_len`` positions: the
    most ``resident_len`` asks for."""
    return resident_len(max_seq_len, num, den, cap)


def empty_past(t: torch.Tensor) -> torch.Tensor:
    """A zero-length K/V prefix shaped like ``t`` (no recompute)."""
    return t[:, :, :0]
