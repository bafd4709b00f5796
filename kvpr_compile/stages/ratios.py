"""Stage ``plan``: the split ratio each rewritten layer asks for, forced by ``ratio`` or
planned for this graph's sizes: by the throughput LP for the throughput schedule (unless both
``ratio`` and ``micro_batches`` are given), else by the latency LP. A forced ratio never imports
mip. A forced ``resident_ratio`` keeps that share of every layer's past on the device (a planned
ratio is then capped at 1 - resident_ratio); else ``gpu_budget_bytes`` (on CUDA "auto" by
default) decides what is resident (stages/residency.py)."""
from __future__ import annotations

from ..ops.nodes import args_of
from .compilation import Compilation
from .dims import graph_dims
from .residency import resident_rule
from .throughput_plan import plan_columns


def plan(c: Compilation) -> None:
    if not c.slices:
        return
    o, layers = c.options, sorted(args_of(node).layer for node in c.slices)
    if o.schedule == "throughput" and (o.ratio is None or o.micro_batches is None):
        planned = plan_columns(graph_dims(c.slices), len(layers), profile=o.profile,
                               ratio=o.ratio, micro_batches=o.micro_batches,
                               gpu_budget_bytes=o.gpu_budget_bytes)
        source = ("forced" if o.ratio is not None
                  else f"throughput plan, profile {planned.profile_name}")
        ratios = planned.ratios
    elif o.ratio is not None:
        ratios, source, planned = [o.ratio] * len(layers), "forced", None
    else:
        from ..plan.latency_ratios import choose_ratios  # local: keeps mip out of import time
        d = graph_dims(c.slices)
        ratios, source, planned = choose_ratios(
            profile=o.profile, overlap=o.overlap, num_layers=len(layers),
            batch_size=d.batch_size, hidden_size=d.hidden_size,
            kv_hidden_size=d.kv_hidden_size, dtype=d.dtype, device=d.device)
    share = o.resident_ratio or 0.0
    if share and o.ratio is None:   # a planned ratio recomputes from what is not resident
        ratios = [min(r, 1.0 - share) for r in ratios]
    c.ratios = dict(zip(layers, ratios))
    c.resident = resident_rule(c, layers) if o.schedule == "latency" else {}
    c.report.ratio_source, c.report.plan = source, planned
