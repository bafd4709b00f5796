"""What the backend did to each graph it compiled: per-layer split ratios and skipped nodes."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field


@dataclass
class LayerEntry:
    layer: int
    ratio: float            # split ratio in effect in this graph (0 = load everything)
    requested: float        # ratio asked for (forced or scheduled)
    x_node: str
    side_inputs: list[str]
    note: str = ""


@dataclass
class Report:
    graph_index: int
    inner: str
    ratio_source: str = ""
    layers: list[LayerEntry] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (node, reason)
    notes: list[str] = field(default_factory=list)
    plan: object = None     # scheduler Plan (or ThroughputPlan) for this graph's shapes, when made
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
            lines.append(f"  {'layer':>5}  {'ratio':>6}  {'asked':>6}  {'X':<24} side inputs / note")
            for e in self.layers:
                extra = ", ".join(e.side_inputs) or "-"
                if e.note:
                    extra += f"  ({e.note})"
                lines.append(f"  {e.layer:>5}  {e.ratio:>6.3f}  {e.requested:>6.3f}  {e.x_node:<24} {extra}")
        if self.schedule == "throughput":
            lines.append(f"  schedule: throughput, micro-batches {self.micro_batches}, "
                         f"weights {self.weights}")
        for name, reason in self.skipped:
            lines.append(f"  skipped {name}: {reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        if self.plan is not None and hasattr(self.plan, "micro_batches"):
            lines.append(f"  planner: {self.plan}")
        elif self.plan is not None:
            from .plan.latency_table import format_layers
            lines.append(f"  scheduler: {self.plan}")
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


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def decode_graph_report(reports) -> Report | None:
    """The last report whose rewritten layers all decode one token (not a prefill or chunk
    graph: their notes start with "multi-token"; other notes, e.g. a shared RoPE record, are
    decode graphs too)."""
    for rep in reversed(reports):
        if rep.layers and not any(e.note.startswith("multi-token") for e in rep.layers):
            return rep
    return None
