"""Stage ``plan``: the split ratio each rewritten layer asks for, forced by ``ratio`` or
planned for this graph's sizes: by the throughput LP for the throughput schedule (unless both
``ratio`` and ``micro_batches`` are given), else by the latency LP. A forced ratio never imports
mip. A forced ``resident_ratio`` keeps that share of every layer's past on the device (a planned
ratio is then capped at 1 - resident_ratio - cpu_ratio); a forced ``cpu_ratio`` has the CPU
attend to that share (passes/cpu_attention.py); else ``gpu_budget_bytes`` (on CUDA "auto" by
default) decides what is resident (stages/residency.py).

On a CPU device with no profile named (neither ``options['profile']`` nor $KVPR_PROFILE) the
plan is ratio 0: the store lives in the same memory, loads are views, so there is no link whose
bytes recompute could save (the default profile, a GPU preset, would recompute for nothing).
A profile the user names is still planned with, on a CPU too: naming one asks for the split
that hardware would get (the demo and the tests show it that way); a forced ratio wins over
both.
"""
from __future__ import annotations

import os

from .. import report as rep
from ..ops.nodes import args_of
from ..plan.resolve import ENV_PROFILE
from .compilation import Compilation
from .dims import graph_dims
from .residency import budget_context, planned_rule, resident_rule, store_of
from .throughput_plan import plan_columns


def _no_link(o, dims) -> bool:
    """A CPU device, no forced ratio and no profile named: nothing to plan for."""
    named = o.profile is not None or bool(os.environ.get(ENV_PROFILE))
    return o.ratio is None and not named and dims.device.type == "cpu"


def plan(c: Compilation) -> None:
    if not c.slices:
        return
    o, layers = c.options, sorted(args_of(node).layer for node in c.slices)
    no_link = _no_link(o, graph_dims(c.slices))
    if o.schedule == "throughput" and (o.ratio is None or o.micro_batches is None):
        planned = plan_columns(graph_dims(c.slices), len(layers), profile=o.profile,
                               ratio=0.0 if no_link else o.ratio, micro_batches=o.micro_batches,
                               gpu_budget_bytes=o.gpu_budget_bytes)
        source = (rep.CPU_NO_LINK if no_link else "forced" if o.ratio is not None
                  else f"throughput plan, profile {planned.profile_name}")
        ratios = planned.ratios
    elif o.ratio is not None:
        ratios, source, planned = [o.ratio] * len(layers), "forced", None
    elif no_link:
        ratios, source, planned = [0.0] * len(layers), rep.CPU_NO_LINK, None
    elif o.schedule == "latency" and o.resident_ratio is None and \
            (ctx := budget_context(c, recompute=False)) is not None:
        _place(c, layers, ctx)
        return
    elif o.cpu_ratio is None:   # the LP chooses the CPU share with the split
        _plan_with_cpu(c, layers)
        return
    else:
        from ..plan.latency_ratios import choose_ratios  # local: keeps mip out of import time
        d = graph_dims(c.slices)
        ratios, source, planned = choose_ratios(
            profile=o.profile, overlap=o.overlap, num_layers=len(layers),
            batch_size=d.batch_size, hidden_size=d.hidden_size,
            kv_hidden_size=d.kv_hidden_size, dtype=d.dtype, device=d.device)
        _warn_unplanned_cpu(o, d)
    forced_cpu = o.cpu_ratio or 0.0   # None with a forced ratio or no link: nothing planned
    share = (o.resident_ratio or 0.0) + forced_cpu
    if share and o.ratio is None:   # a planned ratio recomputes from what is not resident
        ratios = [min(r, 1.0 - share) for r in ratios]   # or attended on the CPU
    c.ratios = dict(zip(layers, ratios))
    c.cpu = {layer: forced_cpu for layer in layers} if forced_cpu > 0 else {}
    c.resident = resident_rule(c, layers) if o.schedule == "latency" else {}
    c.report.ratio_source, c.report.plan = source, planned


def _plan_with_cpu(c: Compilation, layers: list[int]) -> None:
    """No ratio or CPU share forced: the latency LP chooses l_i and the CPU share u_i together
    (plan/cpu_ratios.py; u = 0 where the profile has no host attention rate)."""
    from ..plan.cpu_ratios import choose_cpu_ratios  # local: keeps mip out of import time
    o, d = c.options, graph_dims(c.slices)
    split = choose_cpu_ratios(profile=o.profile, overlap=o.overlap, num_layers=len(layers),
                              batch_size=d.batch_size, hidden_size=d.hidden_size,
                              kv_hidden_size=d.kv_hidden_size, dtype=d.dtype, device=d.device)
    ratios = split.ratios
    share = o.resident_ratio or 0.0
    if share:   # a forced resident share: the planned shares apply to what is not resident
        ratios = [min(r, 1.0 - share - u) for r, u in zip(ratios, split.cpu_ratios)]
    c.ratios = dict(zip(layers, ratios))
    c.cpu = {layer: u for layer, u in zip(layers, split.cpu_ratios) if u > 0}
    c.resident = resident_rule(c, layers)
    c.report.ratio_source, c.report.plan = split.how, split.plan
    if split.warning:
        rep.warn_once(split.warning)


def _sliding(c: Compilation, layers: list[int]) -> tuple[int, ...]:
    """The positions in ``layers`` of the sliding-window layers, by the graph (a read that
    starts past 0) or by the example call's cache (its windows: a prefill's reads all start at
    0): the rewrite keeps nothing of a window resident, so the LP must not place rows there."""
    windowed = {args_of(node).layer for node in c.slices
                if not (isinstance(args_of(node).start, int) and args_of(node).start == 0)}
    store = store_of(c, next(iter(c.slices)))
    windows = getattr(store, "windows", ()) if store is not None else ()
    windowed |= {layer for layer, w in enumerate(windows) if w}
    return tuple(i for i, layer in enumerate(layers) if layer in windowed)


def _warn_threads(o, d, planned) -> None:
    from ..plan.cpu_ratios import threads_warning
    from ..plan.resolve import resolve_profile
    warning = threads_warning(resolve_profile(o.profile, device=d.device), None, planned)
    if warning:
        rep.warn_once(warning)


def _warn_unplanned_cpu(o, d) -> None:
    """A forced CPU share next to a planned split whose profile measured no host rate: it runs,
    but nothing chose it."""
    if not o.cpu_ratio:
        return
    from ..plan.resolve import resolve_profile
    profile = resolve_profile(o.profile, device=d.device)
    if profile.cpu_attention_rate(d.dtype) is None:
        rep.warn_once(f"kvpr: options['cpu_ratio']={o.cpu_ratio:g} is applied as given: profile "
                  f"{profile.name} has no host attention rate for {d.dtype}, so the plan did "
                  f"not choose it (measure one with `kvpr profile --host`)")


def _place(c: Compilation, layers: list[int], ctx) -> None:
    """A budget decides what is resident and the split is planned: the latency LP at the
    cache's full length places r_i and l_i per layer (stages/residency.py planned_rule)."""
    from ..plan.latency_ratios import choose_placement  # local: keeps mip out of import time
    o, d = c.options, graph_dims(c.slices)
    planned, source = choose_placement(
        profile=o.profile, overlap=o.overlap, num_layers=len(layers), batch_size=d.batch_size,
        seq_len=ctx.max_seq_len, hidden_size=d.hidden_size, kv_hidden_size=d.kv_hidden_size,
        dtype=d.dtype, gpu_budget_bytes=ctx.budget, device=d.device,
        cpu_attention_bytes_per_s=None if o.cpu_ratio is None else 0.0,
        no_resident=_sliding(c, layers))
    c.ratios, c.resident = planned_rule(layers, planned)
    if o.cpu_ratio is None:   # the LP's own CPU share, a share of the whole past
        c.cpu = {layer: u for layer, u in zip(layers, planned.cpu_ratios) if u > 0}
        if c.cpu:
            _warn_threads(o, d, planned)
    elif o.cpu_ratio > 0:
        c.cpu = {layer: o.cpu_ratio for layer in layers}
    c.report.ratio_source, c.report.plan = source, planned
