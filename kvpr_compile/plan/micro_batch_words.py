"""Micro-batch sizes in words, for the plan's text and the report: "1 micro-batch of 16 rows",
"4 micro-batches of 32 rows", "3 micro-batches: 2 of 6 rows, 1 of 4" (largest first)."""
from __future__ import annotations

from collections import Counter


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def in_words(sizes) -> str:
    sizes = list(sizes)
    if not sizes:
        return "no micro-batches"
    count = len(sizes)
    noun = "micro-batch" if count == 1 else "micro-batches"
    groups = sorted(Counter(sizes).items(), reverse=True)
    if len(groups) == 1:
        return f"{count} {noun} of {_rows(sizes[0])}"
    parts = [f"{n} of {_rows(size) if i == 0 else size}" for i, (size, n) in enumerate(groups)]
    return f"{count} {noun}: " + ", ".join(parts)
