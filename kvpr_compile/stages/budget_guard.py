"""The call-time budget check of a latency graph whose resident rows were placed under
``gpu_budget_bytes``.

One compiled graph serves caches of any capacity (runtime/checks.py: no guard on
``max_seq_len``), but the device memory a step uses grows with it: the load slots and the
assembled K,V are sized for the cache's ``max_seq_len``, while the resident tokens per layer
were fixed at compile time for the example call's cache. So before a call of the compiled graph
touches a cache of more positions than it was placed for, the working set at that capacity plus
the resident rows is checked against the budget; a cache it does not fit is a ValueError that
names the numbers, raised before anything is written. A capacity is checked once per graph;
caches no larger than the placed one pass without a check.
"""
from __future__ import annotations

from ..ops.split import ratio_fraction, resident_capacity
from ..runtime.handles import lookup
from .compilation import Compilation
from .residency import working_set


def budget_guard(c: Compilation):
    """``check(args)`` for the compiled graph's calls, or None where no budget placed rows
    (or the cache is not a graph input)."""
    ctx = c.latency_budget
    if ctx is None or not c.resident or ctx.handle_index is None:
        return None
    index = ctx.handle_index
    recompute = any(r > 0 for r in c.ratios.values())
    sizing = ctx.sizing[:4] + (recompute,)
    rules = [(ratio_fraction(share), cap) for share, cap, _ in c.resident.values()]
    passed = set()
    last = []   # the handle of the last cache that passed: the steady state checks only that

    def resident_tokens(positions: int) -> int:   # the rows the runtime allocates per layer
        return sum(resident_capacity(positions, f.numerator, f.denominator, cap)
                   for f, cap in rules)

    def check(args) -> None:
        h = args[index]
        if last and last[0] is h:
            return
        positions = lookup(h).max_seq_len
        if positions > ctx.max_seq_len and positions not in passed:
            parts = working_set(positions + 1, *sizing)
            resident = resident_tokens(positions) * ctx.per_token
            need = sum(parts.values()) + resident
            if need > ctx.budget:
                named = ", ".join(f"{name} {n}" for name, n in parts.items())
                raise ValueError(
                    f"kvpr: options['gpu_budget_bytes']={ctx.budget!r} was met for caches of "
                    f"{ctx.max_seq_len} positions when this graph was compiled; a cache of "
                    f"{positions} needs {need} bytes on the device ({named}, resident rows "
                    f"{resident}). Use caches of at most {ctx.max_seq_len} positions with this "
                    f"compiled model, or compile it again for this size "
                    f"(torch._dynamo.reset()); nothing was written")
            passed.add(positions)
        last[:] = [h]
    return check


def guarded(compiled, check):
    """``compiled`` with ``check(args)`` before each call."""
    def kvpr_budget_checked(*args):
        check(args)
        return compiled(*args)
    return kvpr_budget_checked
