"""The results as a fixed-width table (stdout) and as one JSON document (``--json PATH``).

Table columns, per case: median ms per decode step of each contender; the scheduler's mean split
ratio l/s; the physical limits of ratio 0 and of the scheduler's split and each run over its
limit; speed-ups of kvpr-sched over kvpr-r0 and over HF offloaded; the lowest token agreement
with the reference run; then one PASS/FAIL/- column per target (targets.py).
"""
from __future__ import annotations

import json
import os
import platform
from collections import Counter
from pathlib import Path

import torch

from . import targets as tg
from .runners import CONTENDERS, HF_OFFLOADED, KVPR_R0, KVPR_SCHED, RESIDENT
from .suite import CaseResult

HEADS = {RESIDENT: "resident", HF_OFFLOADED: "HF-off", KVPR_R0: "kvpr-r0", KVPR_SCHED: "kvpr-sch"}


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _ms(value: float | None) -> str:
    """Milliseconds: two decimals, or three significant digits below 0.1 ms (toy CPU runs)."""
    return "-" if value is None else format(value, ".2f" if value >= 0.1 else ".3g")


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _run_cell(result: CaseResult, name: str) -> str:
    run = result.runs.get(name)
    if run is None:
        return "-"
    if run.status == "skipped":
        return "skip"
    if run.status == "error":
        return "ERR"
    return _ms(run.ms)


def _agree_cell(result: CaseResult) -> str:
    others = {k: v for k, v in result.agreement.items() if k != result.reference}
    if not others:
        return "-"
    worst = min(others.values())
    return "100%" if worst == 1.0 else f"{worst * 100:.1f}%"


def _target_cell(result: CaseResult, key: str) -> str:
    found = [t for t in result.targets if t.key == key]
    return found[0].verdict.replace("n/a", "?") if found else "-"


def row_cells(result: CaseResult) -> list[str]:
    c, s = result.case, result.spec
    sched = result.runs.get(KVPR_SCHED)
    mean_ratio = (sum(sched.ratios) / len(sched.ratios)
                  if sched is not None and sched.ok and sched.ratios else None)
    lim_r0, lim_s = result.limits.get(KVPR_R0), result.limits.get(KVPR_SCHED)
    r0, sch, hf = result.ms(KVPR_R0), result.ms(KVPR_SCHED), result.ms(HF_OFFLOADED)
    return [s.name, s.attention, str(c.batch), str(c.prompt), str(c.new_tokens),
            *(_run_cell(result, name) for name in CONTENDERS),
            _num(mean_ratio), _ms(result.predicted_ms.get(KVPR_SCHED)),
            _ms(lim_r0.ms if lim_r0 else None),
            _ms(lim_s.ms if lim_s else None),
            _num(_div(r0, lim_r0.ms if lim_r0 else None)),
            _num(_div(sch, lim_s.ms if lim_s else None)),
            _num(_div(r0, sch)), _num(_div(hf, sch)), _agree_cell(result),
            *(_target_cell(result, key) for key in tg.KEYS)]


HEADER = ["model", "attn", "b", "prompt", "new", *(HEADS[n] for n in CONTENDERS), "l/s",
          "pred-sch", "lim-r0", "lim-sch", "r0/lim", "sch/lim", "r0/sch", "HF/sch", "tokens",
          "limit", "vs_r0", "vs_hf"]


def format_rows(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i])
              for i in range(len(header))]
    def line(cells):
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths)))
    out = [line(header), "-" * len(line(header))]
    out += [line(r) for r in rows]
    return out


def target_lines(results: list[CaseResult]) -> list[str]:
    lines, counts = [], Counter()
    for result in results:
        for t in result.targets:
            counts[t.verdict] += 1
            value = "-" if t.value is None else f"{t.value:.2f}"
            lines.append(f"  {t.verdict:<4}  {result.case.label:<28} {t.text} = {value} "
                         f"({t.op} {t.threshold:g})")
    summary = ", ".join(f"{counts[v]} {v.lower()}" for v in ("PASS", "FAIL", "n/a") if counts[v])
    return [f"targets ({summary or 'none apply'}):"] + lines


def format_report(results: list[CaseResult], meta: dict) -> str:
    steps = sorted({len(r.runs[n].step_ms) for r in results for n in r.runs if r.runs[n].ok})
    lines = [f"kvpr bench on {meta['device']} (torch {meta['torch']}, transformers "
             f"{meta['transformers']}), {meta['dtype']}, random weights"]
    if meta.get("note"):
        lines.append(f"*** {meta['note']} ***")
    lines += [f"scheduler profile: {meta['profile_summary']}",
              f"physical limit: plan's H2D bytes / {meta['h2d_gbps']:.1f} GB/s "
              f"({meta['h2d_source']})",
              f"ms per decode step (one token per sequence), median of "
              f"{'/'.join(map(str, steps)) or '?'} timed "
              f"steps after {meta['warmup']} warm-up steps, prefill excluded",
              ""]
    lines += format_rows(HEADER, [row_cells(r) for r in results])
    lines += ["pred-sch: the task graph's predicted ms/step for the scheduler's split"
              " (profile above);",
              "l/s: the scheduler's mean split ratio; lim-r0, lim-sch: physical limits (ms/step)"
              " of ratio 0 and of the scheduler's split; r0/lim, sch/lim: measured / limit;",
              "r0/sch, HF/sch: speed-ups of kvpr-sched; tokens: lowest share of greedy tokens "
              "equal to the reference run's (resident); limit, vs_r0, vs_hf: targets below"]
    lines += ["", *(["targets: not evaluated on the CPU"] if meta.get("cpu")
                    else target_lines(results))]
    notes = [f"  {r.case.label}: {run.name} {run.status}: {run.reason}"
             for r in results for run in r.runs.values() if run.status != "ok" or run.reason]
    if notes:
        lines += ["", "not run / notes:", *dict.fromkeys(notes)]
    traces = [(r.case.label, run.name, run.trace) for r in results for run in r.runs.values()
              if run.trace]
    if traces:
        lines += ["", "traces:"]
        for label, name, info in traces:
            overlap = info.get("stats", {}).get("h2d_overlap")
            hidden = (f", {overlap * 100:.0f}% of H2D time under kernels"
                      if overlap is not None else "")
            lines.append(f"  {label} {name}: {info['json']}"
                         + (f", {info['png']}" if info.get("png") else f" ({info.get('note', '')})")
                         + hidden)
            lines += [f"    {k['us'] / 1e3:8.2f} ms in {k['count']:4d} x {k['name'][:80]}"
                      for k in info.get("stats", {}).get("top_kernels", [])]
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    import transformers
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        (platform.processor() or platform.machine() or "cpu") + " (CPU)"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}


def write_json(path: str | Path, results: list[CaseResult], meta: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = Counter(t.verdict for r in results for t in r.targets)
    doc = {"meta": meta, "cases": [r.to_dict() for r in results],
           "targets": {"pass": counts["PASS"], "fail": counts["FAIL"], "n/a": counts["n/a"]}}
    tmp = path.with_name(path.name + ".tmp")   # rewritten after every case: never half a file
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)
