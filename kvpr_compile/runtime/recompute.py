"""Small helpers called from rewritten graphs (split length, empty recompute prefix)."""
from __future__ import annotations

import torch


def split_len(past, num: int, den: int):
    """l = floor(ratio * past) for ratio = num/den; works on ints and SymInts alike."""
    return (past * num) // den


def empty_past(t: torch.Tensor) -> torch.Tensor:
    """A zero-length K/V prefix shaped like ``t`` (no recompute)."""
    return t[:, :, :0]
