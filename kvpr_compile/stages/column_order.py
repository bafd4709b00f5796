"""The throughput schedule's branch: stage ``batch_rows`` (before the rewrite: which inputs
and outputs carry the batch, and the GPU budget check) and stage ``columns`` (after it: the
rewritten graph lowered and cut into layer segments run in column order). A graph the column
order cannot run keeps the latency schedule, with one warning saying why."""
from __future__ import annotations

from .. import report as rep
from ..ops.errors import Unsupported
from .compilation import Compilation
from .dims import graph_dims
from .throughput_plan import budget_check


def batch_rows(c: Compilation) -> None:
    if c.options.schedule != "throughput" or not c.slices:
        return
    from ..passes.batch_rows import analyse
    try:
        c.rows = analyse(c.graph)
    except Unsupported as err:
        rep.keep_latency(c.report, str(err))
        return
    c.budget = budget_check(graph_dims(c.slices), len(c.slices), profile=c.options.profile,
                            gpu_budget_bytes=c.options.gpu_budget_bytes)


def columns(c: Compilation) -> None:
    if c.rows is None:
        return
    from ..runtime.column_order import cut
    from ..runtime.column_runner import ColumnRunner
    from ..runtime.lower import lower
    c.graph.lint()
    c.gm.recompile()
    if c.options.micro_batches is not None:
        count = c.options.micro_batches
    else:
        planned = len(c.report.plan.micro_batches)
        count = lambda batch: planned   # noqa: E731  (capped at the batch by the runner)
    try:
        runner = ColumnRunner(cut(lower(c.gm)), c.rows, count, c.budget)
    except Unsupported as err:
        rep.keep_latency(c.report, str(err))
        return
    rep.column_order_applied(c.report, runner, c.rows.example_batch, c.options.inner)
    c.compiled = runner
