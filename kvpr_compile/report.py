"""What the backend did to each graph it compiled: per-layer split ratios, skipped nodes and
notes (``Report``, kept for ``reports()``), and the wording of those notes and of the backend's
warnings (the functions after the registry), so the stages hold no prose."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field


@dataclass
class LayerEntry:
    layer: int
    ratio: float            # split ratio in effect in this graph (0 = load everything)
    requested: float        # ratio asked for (forced or scheduled)
    x_node: str             # the node stored as X, or NO_X where none is kept (ratio 0)
    side_inputs: list[str]
    note: str = ""
    cpu: float = 0.0        # share of the past attended on the CPU in this graph (cpu_ratio)


@dataclass
class Report:
    graph_index: int
    inner: str
    ratio_source: str = ""
    layers: list[LayerEntry] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (node, reason)
    notes: list[str] = field(default_factory=list)
    plan: object = None     # latency Plan (or ThroughputPlan) for this graph's shapes, when made
    schedule: str = "latency"
    micro_batches: list[int] | None = None   # throughput: the split of the example batch
    weights: str = ""       # throughput: "resident" or "streamed (...)"
    runner: object = field(default=None, repr=False)   # throughput: the ColumnRunner that runs it
    graph_module: object = field(default=None, repr=False)  # the rewritten Dynamo graph

    @property
    def ratios(self) -> dict[int, float]:
        return {e.layer: e.ratio for e in self.layers}

    def __str__(self) -> str:
        lines = [f"kvpr graph {self.graph_index}: {len(self.layers)} layer(s) rewritten, "
                 f"{len(self.skipped)} skipped, inner={self.inner}"
                 + (f", ratios: {self.ratio_source}" if self.ratio_source else "")]
        if self.layers:
            lines.append(f"  {'layer':>5}  {'ratio':>6}  {'asked':>6}  {'X':<24} "
                         "side inputs / note")
            for e in self.layers:
                extra = ", ".join(e.side_inputs) or "-"
                if e.note:
                    extra += f"  ({e.note})"
                lines.append(f"  {e.layer:>5}  {e.ratio:>6.3f}  {e.requested:>6.3f}  "
                             f"{e.x_node:<24} {extra}")
        if self.schedule == "throughput":
            from .plan.micro_batch_words import in_words
            split = "micro-batches unknown" if self.micro_batches is None else \
                in_words(self.micro_batches)
            lines.append(f"  schedule: throughput, {split}, weights {self.weights}")
        for name, reason in self.skipped:
            lines.append(f"  skipped {name}: {reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        if self.plan is not None and hasattr(self.plan, "micro_batches"):
            lines.append(f"  planner: {self.plan}")
        elif self.plan is not None:
            from .plan.latency_table import format_layers
            lines.append(f"  latency LP: {self.plan}")
            lines.append(format_layers(self.plan))
        return "\n".join(lines)


_REPORTS: list[Report] = []
_WARNED: set[str] = set()


def add_report(report: Report) -> None:
    _REPORTS.append(report)


def next_graph_index() -> int:
    return len(_REPORTS)


def last_report() -> Report | None:
    """The report of the latest graph compiled by the kvpr backend (None before any)."""
    return _REPORTS[-1] if _REPORTS else None


def reports() -> list[Report]:
    """Reports of every graph compiled by the kvpr backend in this process, oldest first."""
    return list(_REPORTS)


def warn_once(message: str, key: str | None = None) -> None:
    """Warn once per ``key`` (by default the message itself) in this process."""
    key = message if key is None else key
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


def decode_graph_report(reports) -> Report | None:
    """The last report whose rewritten layers all decode one token (not a prefill or chunk
    graph: their notes start with "multi-token"; other notes, e.g. a shared RoPE record, are
    decode graphs too)."""
    for rep in reversed(reports):
        if rep.layers and not any(e.note.startswith("multi-token") for e in rep.layers):
            return rep
    return None


# ---- the backend's notes and warnings ------------------------------------------------------
CPU_NO_LINK = ("CPU device: no link to save, ratio 0 (force with options['ratio'], or plan "
               "for a GPU with options['profile'])")
NO_X = "no X kept"   # the X column of a layer at ratio 0: the rewrite stores no X for it


def cuda_graph_mode_ignored(mode: str) -> None:
    warn_once(f"kvpr: mode={mode!r} asks for CUDA graphs, which cannot capture host-to-device "
              "streaming of a growing cache; ignored")


def nothing_to_rewrite(report: Report, attention_seen: bool) -> None:
    """No site: attention that reads no OffloadedKVCache is worth a warning; a graph without
    attention (e.g. a fragment between graph breaks) is no problem."""
    if attention_seen:
        report.notes.append("no attention reads an OffloadedKVCache; graph compiled unchanged")
        warn_once("kvpr: graph has attention that reads no OffloadedKVCache "
                  "(kvpr cache_update); it is compiled unchanged")
    else:
        report.notes.append("no attention in this graph (e.g. a fragment between graph "
                            "breaks); compiled unchanged")


def graph_holds_some_layers(report: Report, layers: list[int], num_layers: int,
                            graph_break: str | None) -> None:
    """A graph with ``layers`` of the cache's ``num_layers``: noted, and warned about once per
    layer count (per-layer graphs of a 32-layer model warn once, not 32 times)."""
    held = f"{len(layers)} of the cache's {num_layers} layers ({', '.join(map(str, layers))})"
    report.notes.append(f"holds {held}: no layer-ahead prefetch across the other graphs")
    reason = f" Dynamo's latest graph break: {graph_break}." if graph_break else ""
    warn_once(f"kvpr: graph {report.graph_index} holds {held}: Dynamo split the decoder into "
              "several graphs (a graph break), and a layer's loads are prefetched only while an "
              "earlier layer of its own graph computes. Results stay exact, but steps are "
              f"slower.{reason} Find the breaks with TORCH_LOGS=graph_breaks.",
              key=f"graph holds {len(layers)} of {num_layers} layers")


def cpu_share_words(share: float, device_fused: str | None = None) -> str:
    """A layer's note when the CPU attends to its share of the past; ``device_fused``: "" where
    the device part runs a fused kernel, why not where it does not, None where the device part
    is the graph's own ops."""
    words = f"cpu: the last floor({share:g} * past) tokens attended on the CPU, merged by LSE"
    if device_fused == "":
        return words + " (device part: fused kernel)"
    if device_fused:
        return words + f" (device part: float32 composite, {device_fused})"
    return words


def cpu_share_refused(share: float, reason: str) -> str:
    """A layer's note (and a one-time warning) when its attention cannot be split exactly:
    the layer keeps cpu share 0."""
    words = f"cpu share 0 (cpu_ratio {share:g} not applied): {reason}"
    warn_once(f"kvpr: {words}", key=f"cpu share refused: {reason}")
    return words


def site_left_unchanged(report: Report, node_name: str, layer: int, err: Exception) -> None:
    reason = f"layer {layer}: {err}; left as a plain offloaded-cache read"
    report.skipped.append((node_name, reason))
    warn_once(f"kvpr: {reason}")


def layer_entry(layer: int, sl, effective: float, requested: float, links=None) -> LayerEntry:
    """The report line of one rewritten layer: ``sl`` its RecomputeSlice, ``effective`` the
    ratio in effect, ``links`` the side inputs it reads from other layers' records."""
    note = sl.past_note
    if sl.module is None and note.startswith("multi-token graph: stores X, loads"):
        warn_once(f"kvpr: layer {layer}: {note} (exact, not recomputed)")
    if sl.module is not None and not sl.single_token and effective == 0:
        note = "multi-token graph: ratio 0, loads the past"
    if sl.narrowed and effective > 0:
        note = "; ".join(filter(None, [note, "fused QKV: recomputes the K/V columns only"]))
    if links is not None:
        shared = ", ".join(sl.token_inputs[i].name for i, _, _ in links)
        owners = ", ".join(sorted({str(owner) for _, owner, _ in links}))
        note = "; ".join(filter(None, [note, f"{shared}: layer {owners}'s record (stored once)"]))
    from .ops.split import ratio_fraction   # local: `kvpr --help` imports this module
    x_name = sl.x.name if ratio_fraction(requested) > 0 else NO_X   # rewrite.py's keep_x
    return LayerEntry(layer, effective, requested, x_name,
                      [s.name for s in sl.token_inputs[1:]], note)


def keep_latency(report: Report, reason: str) -> None:
    report.notes.append(f"throughput schedule not applied: {reason}; latency schedule")
    warn_once(f"kvpr: schedule='throughput' not applied to this graph: {reason}; it runs on "
              "the latency schedule")


def column_order_applied(report: Report, runner, example_batch: int, inner: str) -> None:
    """The throughput schedule's part of the report: micro-batches, weights, segments."""
    report.schedule, report.runner = "throughput", runner
    try:
        report.micro_batches = list(runner.sizes(example_batch))
    except ValueError as err:   # raised again by every call with this batch, before any write
        report.notes.append(str(err))
    streamed = runner.cut_rule == "weights_ready"
    report.weights = ("streamed (kvpr::weights_ready / weights_release once per layer per step)"
                      if streamed else "resident")
    report.notes.append(f"throughput: {len(runner.segments)} segments cut at each "
                        f"{'weights_ready' if streamed else 'assemble'}; micro-batches "
                        f"{report.micro_batches} for batch {example_batch}")
    if inner != "eager":
        why = f"inner={inner!r} not used: the throughput segments run eagerly"
        report.notes.append(why)
        warn_once(f"kvpr: {why} (inductor between the steps is built for the latency schedule "
                  "only)")
