"""A protocol-2 document as Markdown: per row, every contender with its spread, host time,
order, token agreement and flags; then the yardsticks, each resident-share contender's bytes
and step over its own T*, and the headline ratios, each either a number (both sides
unflagged) or "withheld" with the flags that stopped it."""
from __future__ import annotations

from .contenders import ALL_NAMES


def _f(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def markdown(doc: dict) -> str:
    lines = [f"protocol {doc.get('protocol')}: {doc.get('device')}, torch {doc.get('torch')}, "
             f"transformers {doc.get('transformers')}, driver {doc.get('driver')}; H2D "
             f"{_f(doc.get('h2d_gbps'), '.1f')} GB/s, D2H {_f(doc.get('d2h_gbps'), '.1f')} GB/s; "
             f"tests {doc['tests']['passed']} passed, {doc['tests']['failed']} failed"]
    if doc.get("note"):
        lines.append(f"note: {doc['note']}")
    for row in doc.get("rows", []):
        lines += ["", f"### {row['model']} ({row['attention']}, {row['layers']} layers) "
                      f"b{row['batch']} p{row['prompt']}", "",
                  "| contender | median ms | p10 | p90 | host ms | order | tokens | flags |",
                  "|---|---|---|---|---|---|---|---|"]
        cs = row["contenders"]
        for name in ALL_NAMES:
            if name in cs:
                c = cs[name]
                agree = "-" if c["token_agreement"] is None else f"{c['token_agreement']:.1%}"
                lines.append(f"| {name} | {_f(c['median_ms'])} | {_f(c['p10_ms'])} | "
                             f"{_f(c['p90_ms'])} | {_f(c['host_ms'])} | {c['order']} | {agree} "
                             f"| {', '.join(c['flags']) or '-'} |")
            elif name in row.get("absent", {}):
                lines.append(f"| {name} | absent: {row['absent'][name]} | | | | | | |")
        split = row.get("split") or []
        mean = f"{sum(split) / len(split):.2f}" if split else "-"
        lines += ["", f"kv_link {_f(row['kv_link_ms'])} ms, T* {_f(row['t_star_ms'])} ms "
                      f"(l = {row.get('t_star_l')}), HF bytes bound "
                      f"{_f(row['hf_bound_ms']['overlapped'])} (overlapped) - "
                      f"{_f(row['hf_bound_ms']['serial'])} (serial) ms, kvpr mean split {mean}"]
        for name, c in cs.items():
            if c.get("predicted_ms"):
                cpu = c.get("cpu_split") or []
                share = f", mean CPU share {sum(cpu) / len(cpu):.3f}" if cpu else ""
                lines.append(f"- {name}: predicted {_f(c['predicted_ms'])} ms by the cost model "
                             f"for the split it ran{share}, measured / predicted "
                             f"{_f(c.get('measured_over_predicted'))}")
            t = c.get("trace") or {}
            if "compute_idle_ms_per_step" in t:
                overlap = t.get("h2d_overlap")
                lines.append(f"- {name}: traced {t['steps']} steps: compute stream busy "
                             f"{_f(t['compute_busy_ms_per_step'])} ms and idle "
                             f"{_f(t['compute_idle_ms_per_step'])} ms per step "
                             f"({_f(t['long_gaps_per_step'], '.1f')} gaps > 20 us, "
                             f"{_f(t['long_gap_ms_per_step'])} ms; longest "
                             f"{_f(t['max_gap_ms'])} ms), H2D under kernels "
                             f"{'-' if overlap is None else f'{overlap:.0%}'}")
            elif t:
                lines.append(f"- {name}: traced {t.get('steps')} steps: {t.get('note') or '-'}")
            if "resident_share" in c:
                lines.append(f"- {name}: {c['resident_share']:.2f} of the past resident, "
                             f"{c['h2d_bytes_per_step'] / 1e6:.1f} MB per step (counted "
                             f"{_f((c.get('kv_bytes_counted_per_step') or 0) / 1e6, '.1f')}), "
                             f"{_f(c.get('over_t_star'))} x its own T* "
                             f"{_f(c.get('t_star_ms'))} ms")
        for key, h in row.get("headline", {}).items():
            text = f"{h['value']:.2f}" if h["value"] is not None else f"withheld ({h['withheld']})"
            lines.append(f"- {key}: {text}")
    for r in doc.get("throughput_rows", []):
        flags = ", ".join(r.get("flags", [])) or "-"
        lines.append(f"- throughput {r.get('model')} b{r.get('batch')}: micro-batches "
                     f"{r.get('micro_batches') or '-'}, flags {flags}")
    return "\n".join(lines)
