"""Stage ``lower``: the rewritten graph handed to the ``inner`` compiler (inner.py), unless the
column order already made the callable; where resident rows were placed under a budget, the
callable checks each new cache capacity against it first (budget_guard.py)."""
from __future__ import annotations

from ..inner import compile_inner
from .budget_guard import budget_guard, guarded
from .compilation import Compilation


def lower(c: Compilation) -> None:
    if c.compiled is None:
        c.compiled = compile_inner(c.gm, c.example_inputs, c.options.inner)
        check = budget_guard(c)
        if check is not None:
            c.compiled = guarded(c.compiled, check)
