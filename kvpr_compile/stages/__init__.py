"""The ``kvpr`` backend's compilation of one graph as a flat, ordered list of named stages.

Each stage is ``stage(c: Compilation) -> None``: it reads what the earlier ones left in ``c``
(stages/compilation.py) and adds its part; a stage with nothing to do returns at once (no
attention site, no slice, not the throughput schedule, a callable already made).

    find        the attention sites that read an offloaded cache         sites.py
    count_layers  a graph with only some of the cache's layers: warned   layer_count.py
    extract     each site's recompute slice; the others left unchanged    slices.py
    batch_rows  throughput: the batch roles and the GPU budget check      column_order.py
    plan        each layer's ratio: forced, latency LP or throughput LP   ratios.py
    rewrite     cache reads -> kvpr steps, one report line per layer      rewriting.py
    record      the report published                                      rewriting.py
    columns     throughput: the column-order runner                       column_order.py
    place       latency: loads one layer ahead and into the next call     loads.py
    lower       the inner compiler (eager / piecewise / inductor)         inner_compile.py
"""
from __future__ import annotations

from .column_order import batch_rows, columns
from .compilation import Compilation, start
from .layer_count import count_layers
from .slices import extract
from .sites import find
from .inner_compile import lower
from .loads import place
from .ratios import plan
from .rewriting import record, rewrite

STAGES = (find, count_layers, extract, batch_rows, plan, rewrite, record, columns, place, lower)

__all__ = ["Compilation", "STAGES", "run", "start"]


def run(c: Compilation):
    """Every stage in order on ``c``; the callable the last one made."""
    for stage in STAGES:
        stage(c)
    return c.compiled
