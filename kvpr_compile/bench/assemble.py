"""One protocol-2 row from the children's raw numbers: statistics, yardsticks, flags, headline.

Per contender, the timed steps of both rounds are pooled (median, p10, p90); ``order`` is its
position in round 1; token agreement is against the resident run (StaticCache, else
DynamicCache), with the share near-ties explain beside it. Yardsticks (yardsticks.py) use the
rates of the run's one profile (a dict as ``kvpr profile`` writes it) and the measured resident
step. Flags (flags.py) are attached to the contender they judge; a headline ratio is given only
where both of its sides are unflagged, else it is withheld with the flags that stopped it.
"""
from __future__ import annotations

import statistics

from . import contenders as ct
from . import flags as fl
from . import yardsticks as ys
from .limits import split_tokens, step_h2d_bytes

ELEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
HEADLINES = (("kvpr_vs_hf_generate", ct.HF_GENERATE, ct.KVPR),   # numerator / denominator
             ("kvpr_vs_ratio0", ct.KVPR_RATIO0, ct.KVPR),
             ("kvpr_over_t_star", ct.KVPR, "t_star"),
             ("kvpr_over_resident", ct.KVPR, "resident"))
# with the plan's CPU share: against the full-K,V link limit (the bound recompute alone cannot
# pass for GQA) and against ratio 0; only in rows where kvpr_cpu was asked for
CPU_HEADLINES = (("kvpr_cpu_over_kv_link", ct.KVPR_CPU, "kv_link"),
                 ("kvpr_cpu_vs_ratio0", ct.KVPR_RATIO0, ct.KVPR_CPU))


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]) of a non-empty list."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def flops_for(profile: dict, dtype: str) -> float:
    rates = profile["flops_per_s"]
    if dtype in rates:
        return float(rates[dtype])
    half = rates.get("float16", rates.get("bfloat16"))
    return float(half) / (16.0 if dtype == "float32" else 1.0)


def rates_of(profile: dict, dtype: str) -> ys.Rates:
    return ys.Rates(h2d_bytes_per_s=profile["h2d_bytes_per_s"],
                    d2h_bytes_per_s=profile["d2h_bytes_per_s"],
                    flops_per_s=flops_for(profile, dtype),
                    mem_copy_bytes_per_s=profile["mem_copy_bytes_per_s"],
                    mem_read_bytes_per_s=profile["mem_read_bytes_per_s"])


def agreement(tokens, reference) -> float | None:
    if tokens is None or reference is None:
        return None
    pairs = [(a, b) for row, ref in zip(tokens, reference) for a, b in zip(row, ref)]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def summarize(runs: list[dict]) -> dict | None:
    """Pooled statistics of one contender's rounds (None when no round produced numbers)."""
    done = [r for r in runs if r.get("status") == "ok" and r.get("step_ms")]
    if not done:
        return None
    steps = [t for r in done for rep in r["step_ms"] for t in rep]
    host = [t for r in done if r.get("host_ms") for rep in r["host_ms"] for t in rep]
    n = done[0]["spec"]["steps"]
    walls = [w / n for r in done for w in r["wall_ms"]]
    per_round = [statistics.median([t for rep in r["step_ms"] for t in rep]) for r in done]
    grown = sorted({k for r in done for k in r.get("counters", {}).get("grown", [])})
    return {"median_ms": statistics.median(steps), "p10_ms": quantile(steps, 0.1),
            "p90_ms": quantile(steps, 0.9), "steps": n, "repeats": len(done[0]["step_ms"]),
            "host_ms": statistics.median(host) if host else None,
            "wall_per_step_ms": statistics.median(walls), "round_medians_ms": per_round,
            "grown": grown}


def build_row(case: dict, profile: dict, collected: dict) -> dict:
    """``case``: model, attention, family, hidden, kv_hidden, layers, batch, prompt, steps,
    dtype; ``collected``: rounds.run_rounds' output."""
    results, plan = collected["results"], collected["orders"]
    dims = ys.Dims(batch=case["batch"], hidden=case["hidden"], kv_hidden=case["kv_hidden"],
                   layers=case["layers"], elem_bytes=ELEM_BYTES[case["dtype"]],
                   rope=case.get("family", "llama") != "opt")
    rates = rates_of(profile, case["dtype"])
    past = ys.median_past(case["prompt"], case["steps"])
    kv_link = ys.kv_link_ms(dims, past, rates)
    hf_bound = ys.hf_bound_ms(dims, past, rates)
    contenders, absent, raw = _collect(results, plan)
    ref_name = next((n for n in ct.RESIDENTS if n in raw and raw[n].get("tokens")), None)
    ref = raw[ref_name] if ref_name else None
    explained = fl.explained_agreement(ref.get("first_ties") or [], len(ref["tokens"][0])) \
        if ref and ref.get("first_ties") is not None else None
    residents = [contenders[n]["median_ms"] for n in ct.RESIDENTS if n in contenders]
    resident_ms = min(residents) if residents else None
    t_star, t_star_l = ys.t_star(dims, past, rates, resident_ms) if resident_ms else (None, None)
    split = (raw.get(ct.KVPR) or raw.get(ct.KVPR_GENERATE) or {}).get("split") or []
    full_kv = ys.kv_bytes(dims, past)
    for name, c in contenders.items():
        tokens = raw[name].get("tokens")
        c["token_agreement"] = agreement(tokens, ref["tokens"]) if ref else None
        c["explained_agreement"] = explained
        if name in ct.OFFLOADED:
            _offloaded_bytes(c, name, raw[name], dims, past, rates, full_kv)
        if name in ct.RESIDENT_SHARES:
            _share_yardsticks(c, ct.RESIDENT_SHARES[name], dims, past, rates, resident_ms)
        if name in ct.COUNTED:
            c["kv_bytes_counted_per_step"] = raw[name].get("kv_bytes_counted_per_step")
            c["kv_bytes_expected_per_step"] = expected_kv_per_step(
                name, raw[name].get("split"), dims, case["prompt"], case["steps"],
                raw[name].get("cpu_split") or ())
        if raw[name].get("trace"):   # a few steps profiled after the window (step_trace.py)
            c["trace"] = trace_summary(raw[name]["trace"])
        if raw[name].get("predicted_ms"):   # the cost model's step for the split it ran
            c["predicted_ms"] = raw[name]["predicted_ms"]
            c["measured_over_predicted"] = c["median_ms"] / c["predicted_ms"]
        c["flags"] = contender_flags(name, c, kv_link=kv_link, hf_bound=hf_bound["overlapped"],
                                     resident_ms=resident_ms, t_star=t_star,
                                     resident_bytes=(raw[name]["weight_bytes"] + full_kv
                                                     if "weight_bytes" in raw[name] else None),
                                     mem_read=rates.mem_read_bytes_per_s)
        if name in ct.RESIDENTS and "weight_bytes" in raw[name]:
            c["bound_ms"] = ys.resident_bound_ms(raw[name]["weight_bytes"], dims, past, rates)
    _cross_flags(contenders)
    row = {"model": case["model"], "attention": case["attention"], "layers": case["layers"],
           "batch": case["batch"], "prompt": case["prompt"], "t_star_ms": t_star,
           "t_star_l": t_star_l, "kv_link_ms": kv_link, "hf_bound_ms": hf_bound,
           "median_past": past, "split": split, "reference": ref_name,
           "contenders": contenders, "absent": absent, "orders": plan}
    row["headline"] = headline(row, resident_ms)
    return row


def _collect(results: dict, plan: list) -> tuple[dict, dict, dict]:
    """(contender -> its summarised numbers with order and rounds, absent -> why, contender ->
    its first good raw result) of one case's runs."""
    contenders, absent, raw = {}, {}, {}
    for name, runs in results.items():
        stats = summarize(runs)
        if stats is None:
            absent[name] = "; ".join(sorted({r.get("reason", "") for r in runs})) or "no result"
            continue
        raw[name] = next(r for r in runs if r.get("status") == "ok")
        stats["order"] = plan[0].index(name) + 1 if name in plan[0] else 0
        stats["rounds"] = [{"round": r.get("round"), "order": r.get("order"),
                            "status": r.get("status"), "pid": r.get("pid"),
                            "counters_grown": r.get("counters", {}).get("grown", [])}
                           for r in runs]
        contenders[name] = stats
    return contenders, absent, raw


def _offloaded_bytes(c: dict, name: str, raw: dict, dims: ys.Dims, past: int, rates: ys.Rates,
                     full_kv: float) -> None:
    """An offloaded contender's H2D bytes per step and their floor over the measured link: the
    split it ran (its CPU share's rows left out) for kvpr, the full K,V for the others."""
    own = raw.get("split") if name in (ct.KVPR, ct.KVPR_GENERATE, ct.KVPR_CPU) else None
    moved = step_h2d_bytes(own, past, batch=dims.batch, hidden=dims.hidden,
                           kv_hidden=dims.kv_hidden, elem_bytes=dims.elem_bytes,
                           cpu_ratios=raw.get("cpu_split") or ()) if own else full_kv
    c["h2d_bytes_per_step"] = moved
    c["floor_ms"] = ys.floor_ms(moved, rates)
    if own:   # the split this contender ran (and its CPU share, where it had one)
        c["split"] = list(own)
        c["cpu_split"] = list(raw.get("cpu_split") or [])


def trace_summary(trace: dict) -> dict:
    """The numbers of a contender's traced steps that go into the row: per step, the compute
    stream's idle time and its long gaps; the share of H2D time under kernels."""
    stats = trace.get("stats") or {}
    idle = stats.get("compute_idle")
    steps = trace.get("steps") or 1
    out = {"steps": trace.get("steps"), "json": trace.get("json"), "png": trace.get("png"),
           "h2d_overlap": stats.get("h2d_overlap"), "note": trace.get("note", "")}
    if idle:
        out.update(compute_idle_ms_per_step=idle["idle_us"] / steps / 1e3,
                   compute_busy_ms_per_step=idle["busy_us"] / steps / 1e3,
                   long_gaps_per_step=idle["long_gaps"] / steps,
                   long_gap_ms_per_step=idle["long_gap_us"] / steps / 1e3,
                   max_gap_ms=idle["max_gap_us"] / 1e3)
    return out


def _share_yardsticks(c: dict, share: float, dims: ys.Dims, past: int, rates: ys.Rates,
                      resident_ms: float | None) -> None:
    """A resident-share contender's bytes, floor and own T* (yardsticks.py share_*), and its
    step over that T* (the target: at most 1.10)."""
    c["resident_share"] = share
    c["h2d_bytes_per_step"] = ys.share_kv_bytes(dims, past, share)
    c["floor_ms"] = ys.floor_ms(c["h2d_bytes_per_step"], rates)
    if resident_ms:
        c["t_star_ms"] = ys.share_t_star_ms(dims, past, share, rates, resident_ms)
        c["over_t_star"] = c["median_ms"] / c["t_star_ms"]


def expected_kv_per_step(name: str, split, dims: ys.Dims, prompt: int, steps: int,
                         cpu_split=()) -> float | None:
    """The K,V bytes per step the contender's rule loads, averaged over the steps' past lengths
    (prompt .. prompt + steps - 1) as the counted decode averages them (``cpu_split``: each
    layer's share attended on the CPU, never loaded); None where unknown."""
    pasts = range(prompt, prompt + steps)
    if name in ct.RESIDENT_SHARES:
        share = ct.RESIDENT_SHARES[name]
        return sum(ys.share_kv_bytes(dims, p, share) for p in pasts) / steps
    if name == ct.KVPR_RATIO0:
        return sum(ys.kv_bytes(dims, p) for p in pasts) / steps
    if not split:
        return None
    kv_tok = 2 * dims.batch * dims.kv_hidden * dims.elem_bytes
    cpu = list(cpu_split) or [0.0] * len(split)
    return sum((p - split_tokens(r, p) - min(split_tokens(u, p), p - split_tokens(r, p)))
               * kv_tok for p in pasts for r, u in zip(split, cpu)) / steps


def contender_flags(name: str, c: dict, *, kv_link: float, hf_bound: float,
                    resident_ms: float | None, t_star: float | None,
                    resident_bytes: float | None = None, mem_read: float | None = None
                    ) -> list[str]:
    """The flags of one contender from its statistics and the row's yardsticks."""
    out = []
    med = c["median_ms"]
    if fl.host_bound(c.get("host_ms"), med):
        out.append(fl.HOST_BOUND)
    if fl.spread(c["p10_ms"], med, c["p90_ms"]):
        out.append(fl.SPREAD)
    rounds = c.get("round_medians_ms", [])
    if len(rounds) < 2:
        out.append(fl.ONE_ROUND)
    elif fl.rounds_differ(rounds):
        out.append(fl.ROUNDS_DIFFER)
    if fl.event_vs_wall(med, c.get("wall_per_step_ms")):
        out.append(fl.EVENT_VS_WALL)
    out += [f"{fl.NOT_CLEAN}:{key}" for key in c.get("grown", [])]
    if name in (ct.HF_GENERATE, ct.HF_LOOP) and fl.over_bytes_bound(med, hf_bound):
        out.append(fl.OVER_BYTES_BOUND)
    if name == ct.KVPR_RATIO0 and fl.ratio0_slow(med, kv_link, resident_ms):
        out.append(fl.RATIO0_SLOW)
    if (name in ct.OFFLOADED or name in ct.RESIDENT_SHARES) \
            and fl.below_floor(med, c.get("floor_ms")):
        out.append(fl.BELOW_FLOOR)
    if fl.bytes_off(c.get("kv_bytes_counted_per_step"), c.get("kv_bytes_expected_per_step")):
        out.append(fl.BYTES_OFF)
    if name in ct.RESIDENTS and fl.resident_slow(med, resident_bytes, mem_read):
        out.append(fl.RESIDENT_SLOW)
    if name in (ct.KVPR, ct.KVPR_GENERATE) and fl.t_star_order(None, t_star, med)[1]:
        out.append(fl.T_STAR_ORDER)
    if name in ct.RESIDENT_SHARES and fl.t_star_order(None, c.get("t_star_ms"), med)[1]:
        out.append(fl.T_STAR_ORDER)   # faster than its own placement allows
    if fl.tokens_low(c.get("token_agreement"), c.get("explained_agreement")):
        out.append(fl.TOKENS)
    return out


def _cross_flags(contenders: dict) -> None:
    """Flags that compare two contenders: HF's loop figure against its generate figure."""
    gen, loop = contenders.get(ct.HF_GENERATE), contenders.get(ct.HF_LOOP)
    if gen and loop and fl.generate_vs_loop(gen["median_ms"], loop["median_ms"]):
        loop["flags"].append(fl.GENERATE_VS_LOOP)


def headline(row: dict, resident_ms: float | None) -> dict:
    """{key: {"value": ratio or None, "withheld": why}}; a side's flags withhold the ratio."""
    cs = row["contenders"]
    res_name = next((n for n in ct.RESIDENTS if n in cs
                     and cs[n]["median_ms"] == resident_ms), None)
    out = {}
    asked = ct.KVPR_CPU in cs or ct.KVPR_CPU in row.get("absent", {})
    for key, num, den in HEADLINES + (CPU_HEADLINES if asked else ()):
        sides = []
        for side in (num, den):
            if side == "kv_link":   # bytes over the measured rate: no flag of its own
                sides.append(("kv_link", row["kv_link_ms"], []))
            elif side == "t_star":   # T* rests on the measured resident step
                sides.append(("T*", row["t_star_ms"], cs[res_name]["flags"] if res_name else None))
            elif side == "resident":
                sides.append((res_name, resident_ms, cs[res_name]["flags"] if res_name else None))
            else:
                c = cs.get(side)
                sides.append((side, c["median_ms"] if c else None, c["flags"] if c else None))
        missing = [s[0] or "resident" for s in sides if s[1] is None or s[2] is None]
        flagged = [f"{s[0]}: {', '.join(s[2])}" for s in sides if s[2]]
        if missing or flagged:
            why = "; ".join(([f"missing {', '.join(map(str, missing))}"] if missing else [])
                            + flagged)
            out[key] = {"value": None, "withheld": why}
        else:
            out[key] = {"value": sides[0][1] / sides[1][1], "withheld": ""}
    return out
