"""A torch.profiler chrome trace -> per-stream GPU timeline (PNG) and overlap numbers.

Kineto writes each GPU activity as a complete event (``"ph": "X"``) with ``cat`` ``kernel``,
``gpu_memcpy`` or ``gpu_memset``, ``ts``/``dur`` in microseconds and the CUDA stream in
``args["stream"]`` (also the event's ``tid``) and the device in ``args["device"]`` (``pid``).
Copies are told apart by name ("Memcpy HtoD (Pinned -> Device)", "Memcpy DtoH ...").

``overlap_stats`` says how much of the host-to-device copy time runs while some kernel runs:
the number to look at to see whether the loads are hidden behind compute; and how long the
compute stream sits idle between kernels (``compute_idle``). The PNG has one row per
(device, stream), bars coloured by kind. matplotlib is imported only when drawing (the ``bench``
extra); without it the JSON trace and the numbers are still written.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

TOP_KERNELS = 6   # kernels by total time in overlap_stats: where the compute stream's time goes
GAP_US = 20.0     # compute_idle: a gap longer than this is more than a kernel launch
GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
COLORS = {"kernel": "tab:green", "H2D": "tab:blue", "D2H": "tab:orange", "D2D": "tab:purple",
          "copy": "tab:brown", "memset": "tab:gray"}


@dataclass(frozen=True)
class GpuEvent:
    device: int
    stream: int
    kind: str                # "kernel" | "H2D" | "D2H" | "D2D" | "copy" | "memset"
    name: str
    start_us: float
    dur_us: float

    @property
    def end_us(self) -> float:
        return self.start_us + self.dur_us


def classify(category: str, name: str) -> str:
    if category == "kernel":
        return "kernel"
    if category == "gpu_memset":
        return "memset"
    for tag, kind in (("HtoD", "H2D"), ("DtoH", "D2H"), ("DtoD", "D2D")):
        if tag in name:
            return kind
    return "copy"


def _int(value, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def gpu_events(trace: dict | list) -> list[GpuEvent]:
    """GPU kernels, copies and memsets of a chrome trace (its parsed JSON), by start time."""
    items = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    out = []
    for ev in items:
        if not isinstance(ev, dict) or ev.get("ph") != "X":
            continue
        cat = str(ev.get("cat", "")).lower()
        if cat not in GPU_CATEGORIES:
            continue
        args = ev.get("args") or {}
        name = str(ev.get("name", ""))
        out.append(GpuEvent(device=_int(args.get("device", ev.get("pid"))),
                            stream=_int(args.get("stream", ev.get("tid"))),
                            kind=classify(cat, name), name=name,
                            start_us=float(ev.get("ts", 0.0)), dur_us=float(ev.get("dur", 0.0))))
    return sorted(out, key=lambda e: e.start_us)


def step_marks(trace: dict | list, prefix: str = "decode step") -> list[float]:
    """Start times (us) of the GPU-side annotations whose name starts with ``prefix`` (kineto
    mirrors each ``record_function`` range onto the GPU timeline as ``gpu_user_annotation``)."""
    items = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    return sorted(float(ev.get("ts", 0.0)) for ev in items
                  if isinstance(ev, dict) and ev.get("ph") == "X"
                  and str(ev.get("cat", "")).lower() == "gpu_user_annotation"
                  and str(ev.get("name", "")).startswith(prefix))


def union(intervals) -> list[tuple[float, float]]:
    """Merged, sorted, disjoint (start, end) intervals."""
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def intersection(xs, ys) -> list[tuple[float, float]]:
    """Intersection of two merged interval lists."""
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def overlap_stats(events: list[GpuEvent]) -> dict:
    """Busy time per stream and kind (union, us), the share of H2D time under kernels, and the
    kernels with the most total time (by name; on the first GPU run these showed the assemble's
    concatenation and the recompute's elementwise kernels next to its GEMMs)."""
    if not events:
        return {"events": 0}
    kernels = union((e.start_us, e.end_us) for e in events if e.kind == "kernel")
    h2d = union((e.start_us, e.end_us) for e in events if e.kind == "H2D")
    streams: dict[str, dict] = {}
    by_stream = defaultdict(list)
    for e in events:
        by_stream[(e.device, e.stream)].append(e)
    for (device, stream), evs in sorted(by_stream.items()):
        kinds = defaultdict(list)
        for e in evs:
            kinds[e.kind].append((e.start_us, e.end_us))
        streams[f"cuda:{device} stream {stream}"] = {
            "busy_us": length(union((e.start_us, e.end_us) for e in evs)),
            **{f"{kind}_us": length(union(iv)) for kind, iv in sorted(kinds.items())}}
    h2d_us = length(h2d)
    totals: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.kind == "kernel":
            totals[e.name][0] += e.dur_us
            totals[e.name][1] += 1
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    return {
        "compute_idle": compute_idle(events),
        "events": len(events),
        "span_us": max(e.end_us for e in events) - min(e.start_us for e in events),
        "kernel_busy_us": length(kernels),
        "h2d_busy_us": h2d_us,
        "h2d_hidden_us": length(intersection(h2d, kernels)),
        "h2d_overlap": length(intersection(h2d, kernels)) / h2d_us if h2d_us else None,
        "streams": streams,
        "top_kernels": [{"name": name, "us": us, "count": n} for name, (us, n) in top],
    }


def compute_idle(events: list[GpuEvent], gap_us: float = GAP_US) -> dict | None:
    """The compute stream (the one with the most kernel time) between its first kernel's start
    and its last kernel's end: busy and idle time, and the gaps longer than ``gap_us`` (launch
    gaps are shorter; a host that stops queuing shows as long ones)."""
    per_stream = defaultdict(list)
    for e in events:
        if e.kind == "kernel":
            per_stream[(e.device, e.stream)].append((e.start_us, e.end_us))
    if not per_stream:
        return None
    (device, stream), spans = max(per_stream.items(), key=lambda kv: length(union(kv[1])))
    busy = union(spans)
    gaps = [b[0] - a[1] for a, b in zip(busy, busy[1:])]
    long = [g for g in gaps if g > gap_us]
    span = busy[-1][1] - busy[0][0]
    return {"stream": f"cuda:{device} stream {stream}", "span_us": span,
            "busy_us": length(busy), "idle_us": span - length(busy), "gap_us": gap_us,
            "long_gaps": len(long), "long_gap_us": sum(long), "max_gap_us": max(gaps, default=0.0)}


def render_png(events: list[GpuEvent], path: str | Path, title: str = "",
               step_marks_us: list[float] | None = None) -> None:
    """One row per (device, stream), bars per kind, time in ms from the first event; dotted
    lines where the GPU side of each ``decode step`` annotation starts."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = sorted({(e.device, e.stream) for e in events})
    t0 = min(e.start_us for e in events)
    fig = Figure(figsize=(14, 1.2 + 0.55 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    for y, row in enumerate(rows):
        bars = defaultdict(list)
        for e in events:
            if (e.device, e.stream) == row:
                bars[e.kind].append(((e.start_us - t0) / 1e3, max(e.dur_us, 0.5) / 1e3))
        for kind, spans in bars.items():
            ax.broken_barh(spans, (y - 0.4, 0.8), facecolors=COLORS.get(kind, "black"),
                           linewidth=0)
    ax.set_yticks(range(len(rows)), [f"cuda:{d} stream {s}" for d, s in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    kinds = sorted({e.kind for e in events})
    for mark in step_marks_us or ():
        ax.axvline((mark - t0) / 1e3, color="black", linestyle=":", linewidth=0.8)
    ax.legend(handles=[Patch(color=COLORS.get(k, "black"), label=k) for k in kinds],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    stats = overlap_stats(events)
    share = stats.get("h2d_overlap")
    if share is not None:
        title += f"  (H2D under kernels: {share * 100:.0f}%)"
    ax.set_title(title)
    fig.savefig(path, dpi=120)


def write_timeline(trace_path: str | Path, png_path: str | Path, title: str = "") -> dict:
    """Parse ``trace_path``; write the PNG when there are GPU events and matplotlib is present.
    Returns {"png": path or None, "stats": overlap_stats, "note": why there is no PNG}."""
    trace = json.loads(Path(trace_path).read_text())
    events = gpu_events(trace)
    out: dict = {"png": None, "stats": overlap_stats(events), "note": ""}
    if not events:
        out["note"] = "no CUDA kernels or copies in the trace (CPU run): no timeline"
        return out
    try:
        render_png(events, png_path, title, step_marks(trace))
    except ImportError:
        out["note"] = "matplotlib is not installed (pip install 'kvpr_compile[bench]'): no PNG"
        return out
    out["png"] = str(png_path)
    return out
