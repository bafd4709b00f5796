"""Stage ``place``: the latency schedule's load placement. Layer i+1's loads are issued before
layer i's assemble, and layer 0's loads of the next call after the last assemble
(passes/prefetch.py); the column order issues its loads itself (runtime/column_runner.py)."""
from __future__ import annotations

from ..passes.prefetch import hoist_loads, prefetch_next_call
from .compilation import Compilation


def place(c: Compilation) -> None:
    if not c.slices or c.compiled is not None:
        return
    hoist_loads(c.graph)
    prefetch_next_call(c.graph)
    c.graph.lint()
    c.gm.recompile()
