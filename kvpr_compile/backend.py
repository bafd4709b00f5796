"""The Dynamo backend ``kvpr``: options -> find sites -> extract slices -> plan -> rewrite ->
layer-ahead placement of loads (and the next call's first loads) -> inner compiler.

Registered through the ``torch_dynamo_backends`` entry point (setup.cfg), so
``torch.compile(model, backend="kvpr", options={...})`` works without importing this package.

Options:
- ``ratio``: float in [0, 1], forces the split ratio of every layer (l = floor(ratio * past)).
  Without it the scheduler picks per-layer ratios from the hardware profile.
- ``profile``: preset name, JSON path or HardwareProfile for the scheduler (see plan/resolve.py).
- ``overlap``: the schedule the scheduler models, ``"stream"`` (default; layer-ahead loads) or
  ``"row"`` (the paper's per-layer max(A+R, A+K)); see cost_model.py.
- ``inner``: ``"eager"`` (default: the rewritten FX graph with the kvpr steps as direct calls,
  in program order), ``"piecewise"`` (inductor between the steps) or ``"inductor"`` (the whole
  graph); see inner.py.
- ``schedule``: ``"latency"`` (default) or ``"throughput"`` (micro-batches in column order), with
  ``micro_batches`` and ``gpu_budget_bytes``; see schedule.py. A graph the column order cannot
  run (passes/batch_rows.py, passes/column_order.py) keeps the latency schedule, with a warning.
``mode=`` (e.g. HF's ``"reduce-overhead"``) is accepted; CUDA-graph modes are ignored with a warning.
"""
from __future__ import annotations

from torch import fx

from . import dynamo_watch
from . import report as rep
from .passes.find_sites import find_sites
from .passes.graph_utils import example_value, hint, param_derived, to_networkx
from .passes.prefetch import hoist_loads, prefetch_next_call
from .passes.recompute_slice import Unsupported, extract_slice
from .passes.rewrite import check_rewritable, rewrite_site
from .passes.shared_inputs import shared_links
from .runtime.recompute import ratio_fraction
from .inner import INNER, compile_inner, default_inner
from . import schedule
from .runtime import ops  # noqa: F401  (registers kvpr:: ops before any graph runs)
_KNOWN = {"ratio", "inner", "profile", "overlap"} | schedule.OPTIONS


def parse_options(options: dict | None) -> dict:
    options = dict(options or {})
    unknown = set(options) - _KNOWN
    if unknown:
        raise ValueError(f"kvpr: unknown option(s) {sorted(unknown)}; known: {sorted(_KNOWN)}")
    ratio = options.get("ratio")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"kvpr: options['ratio'] must be a number in [0, 1], got {ratio!r}")
        options["ratio"] = float(ratio)
    inner = options.setdefault("inner", None)   # None: by device (inner.py)
    if inner is not None and inner not in INNER:
        raise ValueError(f"kvpr: options['inner'] must be one of {INNER}, got {inner!r}")
    schedule.parse(options)
    return options


def _choose_ratios(options, slices, layers_in_graph):
    """Per-layer ratios (forced, or the scheduler's for this graph's shapes), their source, plan."""
    if options["schedule"] == "throughput" and (
            options.get("ratio") is None or options["micro_batches"] is None):
        plan = schedule.plan(options, slices, len(layers_in_graph))
        source = "forced" if options.get("ratio") is not None else \
            f"throughput plan, profile {plan.profile_name}"
        return dict(zip(sorted(layers_in_graph), plan.ratios)), source, plan
    if options.get("ratio") is not None:   # forced: no scheduler, so mip is never imported
        return {layer: options["ratio"] for layer in layers_in_graph}, "forced", None
    from .plan.scheduler import choose_ratios  # local: keeps mip out of import time
    cache_node, sl = next(iter(slices.items()))
    k_new, x = example_value(cache_node.args[1]), example_value(sl.x)
    b, hkv, _, d = k_new.shape
    # hints, not int(): the graph stays dynamic in batch (the plan uses the batch seen first)
    ratios, source, plan = choose_ratios(
        options, num_layers=len(layers_in_graph), batch_size=hint(b), hidden_size=hint(x.shape[-1]),
        kv_hidden_size=hint(hkv) * hint(d), dtype=x.dtype, device=x.device)
    return dict(zip(sorted(layers_in_graph), ratios)), source, plan


def kvpr_backend(gm: fx.GraphModule, example_inputs, **kwargs):
    options = parse_options(kwargs.get("options"))
    dynamo_watch.install()   # a function Dynamo gives up on is reported, not silently slow
    if options["inner"] is None:
        options["inner"] = default_inner(example_inputs)
    mode = kwargs.get("mode")
    if mode in ("reduce-overhead", "max-autotune"):
        rep.warn_once(f"kvpr: mode={mode!r} asks for CUDA graphs, which cannot capture host-to-device "
                      "streaming of a growing cache; ignored")
    report = rep.Report(rep.next_graph_index(), options["inner"], graph_module=gm)
    graph = gm.graph
    scan = find_sites(graph)
    report.skipped.extend(scan.skipped)
    if not scan.sites:
        if scan.skipped:   # attention that reads no OffloadedKVCache: worth a warning
            report.notes.append("no attention reads an OffloadedKVCache; graph compiled unchanged")
            rep.warn_once("kvpr: graph has attention that reads no OffloadedKVCache "
                          "(kvpr cache_update); it is compiled unchanged")
        else:              # e.g. a fragment between graph breaks: nothing to rewrite, no problem
            report.notes.append("no attention in this graph (e.g. a fragment between graph "
                                "breaks); compiled unchanged")
        rep.add_report(report)
        return compile_inner(gm, example_inputs, options["inner"])

    params, nxg = param_derived(graph), to_networkx(graph)
    slices = {}
    for site in scan.sites:
        try:
            check_rewritable(site.cache_node)
            slices[site.cache_node] = extract_slice(nxg, site.cache_node, params)
        except Unsupported as err:
            reason = f"layer {site.layer}: {err}; left as a plain offloaded-cache read"
            report.skipped.append((site.cache_node.name, reason))
            rep.warn_once(f"kvpr: {reason}")
    rows = _throughput_rows(options, graph, report) if slices else None
    budget = schedule.budget_check(options, slices, len(slices)) if rows is not None else None
    if slices:
        layers = [node.args[3] for node in slices]
        ratios, report.ratio_source, report.plan = _choose_ratios(options, slices, layers)
        links = shared_links(graph, [(node.args[3], sl) for node, sl in slices.items()
                                     if ratio_fraction(ratios[node.args[3]]) > 0])
        for node, sl in slices.items():
            layer = node.args[3]
            effective = rewrite_site(graph, node, sl, ratios[layer],
                                     owned_loads=options["inner"] == "inductor",
                                     links=links.get(layer, ()))
            note = sl.past_note
            if sl.module is None and note.startswith("multi-token graph: stores X, loads"):
                rep.warn_once(f"kvpr: layer {layer}: {note} (exact, not recomputed)")
            if sl.module is not None and not sl.single_token and effective == 0:
                note = "multi-token graph: ratio 0, loads the past"
            if sl.narrowed and effective > 0:
                note = "; ".join(filter(None, [note, "fused QKV: recomputes the K/V columns only"]))
            if layer in links:
                shared = ", ".join(sl.token_inputs[i].name for i, _, _ in links[layer])
                owners = ", ".join(sorted({str(owner) for _, owner, _ in links[layer]}))
                note = "; ".join(filter(None, [note, f"{shared}: layer {owners}'s record (stored once)"]))
            report.layers.append(rep.LayerEntry(layer, effective, ratios[layer], sl.x.name,
                                                [s.name for s in sl.token_inputs[1:]], note))
        if rows is None:   # the column order issues loads itself (column_runner.py)
            hoist_loads(graph)  # layer i+1's loads are issued before layer i's assemble
            prefetch_next_call(graph)   # and layer 0's of the next call after the last assemble
        graph.lint()
        gm.recompile()
    rep.add_report(report)
    if rows is not None:
        runner = _column_runner(options, gm, rows, budget, report)
        if runner is not None:
            return runner
        if slices:   # latency after all: its layer-ahead prefetch
            hoist_loads(graph)
            prefetch_next_call(graph)
            gm.recompile()
    return compile_inner(gm, example_inputs, options["inner"])


def _throughput_rows(options, graph, report):
    """The graph's batch roles if the throughput schedule is asked for and can run it, else None
    (with one warning saying why)."""
    if options["schedule"] != "throughput":
        return None
    from .passes.batch_rows import analyse
    try:
        return analyse(graph)
    except Unsupported as err:
        _keep_latency(report, str(err))
        return None


def _keep_latency(report, reason: str) -> None:
    report.notes.append(f"throughput schedule not applied: {reason}; latency schedule")
    rep.warn_once(f"kvpr: schedule='throughput' not applied to this graph: {reason}; it runs on "
                  "the latency schedule")


def _column_runner(options, gm, rows, budget, report):
    """The column-order step of the rewritten ``gm``, or None (latency, with a warning)."""
    from .runtime.column_runner import ColumnRunner
    from .runtime.lower import lower
    if options["micro_batches"] is not None:
        count = options["micro_batches"]
    else:
        planned = len(report.plan.micro_batches)
        count = lambda batch: planned   # noqa: E731  (capped at the batch by the runner)
    try:
        runner = ColumnRunner(lower(gm), rows, count, budget)
    except Unsupported as err:
        _keep_latency(report, str(err))
        return None
    report.schedule, report.runner = "throughput", runner
    try:
        report.micro_batches = list(runner.sizes(rows.example_batch))
    except ValueError as err:   # raised again by every call with this batch, before any write
        report.notes.append(str(err))
    streamed = runner.cut_rule == "weights_ready"
    report.weights = ("streamed (kvpr::weights_ready / weights_release once per layer per step)"
                      if streamed else "resident")
    report.notes.append(f"throughput: {len(runner.segments)} segments cut at each "
                        f"{'weights_ready' if streamed else 'assemble'}; micro-batches "
                        f"{report.micro_batches} for batch {rows.example_batch}")
    if options["inner"] != "eager":
        why = f"inner={options['inner']!r} not used: the throughput segments run eagerly"
        report.notes.append(why)
        rep.warn_once(f"kvpr: {why} (inductor between the steps is built for the latency schedule only)")
    return runner
