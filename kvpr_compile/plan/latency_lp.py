"""The latency LP: a python-mip LP (CBC) over the cost model -> recompute/resident/CPU tokens per
layer for one decode step of the whole batch.

LP (coefficients A, R, K, D, M, rest from cost_model; R counts the recompute's GEMMs and its
elementwise passes, M the assemble; time unit = one token's K,V transfer, so the per-token
coefficients are O(1)); per layer i:
  variables  l_i in [0, s] recomputed tokens, r_i in [0, s] resident tokens (0 without a budget),
             and the finish times of the layer's five tasks (cost_model's task graph):
             x_i load X[:l], c_i recompute, k_i load K,V[l+r:], a_i assemble + attention +
             rest of the layer, d_i append of the new tokens (D2H)
  subject to l_i + r_i <= s
             x_i >= A(l_i) + (link predecessor: k_0 for i = 1, d_{i-2} for i >= 2)
             x_i >= A(l_i) + c_{i-1}   overlap="row" (paper: after layer i-1's recompute)
             x_i >= A(l_i) + a_{i-2}   overlap="stream" (two device slots)
             c_i >= x_i + R(l_i);   c_i >= a_{i-1} + R(l_i)
             k_i >= x_i + K(l_i, r_i)
             a_i >= c_i + M + rest; a_i >= k_i + M + rest
             d_i >= a_i + D;        d_i >= k_{i+1} + D   (d_{L-1} >= d_{L-2} + D instead)
  CPU share  only with a host attention rate (cost_model's CPU co-attention, cpu_terms.py): u_i
             in [1, s] tokens attended on the host (C, F, G, post: its per-token and fixed
             time, the GPU's saving per token, ATT's part after the merge), h_i its finish:
             l_i + r_i + u_i <= s;  k_i >= x_i + K(l_i, r_i + u_i)
             a_i >= c_i + M + rest - G*u_i;  a_i >= k_i + M + rest - G*u_i
             h_i >= a_{i-1} + F + C*u_i (the query; 0 for i = 0);  h_i >= h_{i-1} + F + C*u_i
             a_i >= h_i + post
             This LP is solved next to the one without a CPU share (u_i = 0, no task, so no
             round trip paid) and the faster integer plan kept: a CPU share in every layer or
             in none, as the layers are alike.
  phase 1    minimise d_{L-1} (the step's end)
  phase 2    keep d_{L-1} <= phase-1 optimum, minimise sum_i a_i + 1e-4 * sum_i (l_i - r_i)
             (among equally fast plans: finish each layer early, recompute no more than needed,
             e.g. l = 0 when h = 2*h_kv makes shipping X a wash, keep as much resident as fits;
             + 1e-4 * sum_i u_i: attend on the host no more than needed)
  budget B   x_slot >= l_i for all i;
             sum_i r_i * 2*b*h_kv*p + 2*b*h*p * x_slot <= B - 3 * 2*b*(s+n)*h_kv*p
             (double-buffered K,V slots, one assembled K,V and X staging slots, plus
             resident prefixes)
Each "finish = max(preds) + duration" of the task graph is one row per predecessor: the max()
linearised, exact because minimising the end pushes every binding row tight. Steady state this is
the paper's t_i >= A_i + R_i, t_i >= A_i + K_i (+ D on the link, with the previous layer's rest
hidden under this layer's X load). For fixed l, r the optimum is exactly the longest path of
taskgraph's graph and cost_model.finish_times(...).total; the plan reports that number at the
floored integer l_i, r_i, u_i (tests check LP == finish_times == longest path, CPU tasks too).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import mip
import torch

from . import cost_model as cm
from .cpu_terms import check_rate, check_round_trip, with_cpu_terms
from .latency_plan import Plan
from .mip_solve import solve
from .profile import HardwareProfile, dtype_key

__all__ = ["Plan", "plan_split"]

TIE_EPS = 1e-4        # phase-2 cost per recomputed token, in LP time units (see above)
MAKESPAN_SLACK = 1e-9 # relative slack when phase 2 keeps phase 1's optimum


@dataclass
class _SplitLP:
    """The LP of one step: its model, the l_i and r_i variables, the attention finishes a_i."""

    model: mip.Model
    recompute: list        # l_i
    resident: list         # r_i
    attention: list        # a_i
    end: object            # d_{L-1}, the step's end
    unit: float            # seconds per LP time unit (one token position's K,V transfer)
    cpu: list              # u_i (empty: no CPU share)


def plan_split(profile: HardwareProfile, *, num_layers: int, batch_size: int, seq_len: int,
               hidden_size: int, kv_hidden_size: int, dtype: torch.dtype | str,
               gpu_budget_bytes: float | None = None, new_tokens: int = 1,
               mlp_params: int | None = None, overlap: str = cm.DEFAULT_OVERLAP,
               cpu_attention_bytes_per_s: float | None = None,
               cpu_round_trip_s: float | None = None, no_resident: tuple = ()) -> Plan:
    """Solve the LP above and return the integer plan (r_i floored, l_i and u_i rounded).

    gpu_budget_bytes: device memory for the KV path (staging slots, one assembled K,V,
    resident prefixes); None
    means no resident prefix and no memory check. new_tokens=0 drops the append, the
    rest-of-layer compute and the device-memory terms (the paper's bare model). overlap: "row"
    (the paper's) or "stream" (deeper pipelining), see cost_model. cpu_attention_bytes_per_s:
    the host's attention rate (bytes of K,V per second; None: the profile's for ``dtype``, and
    no CPU share where it has none; 0: no CPU share); cpu_round_trip_s: the query/result round
    trip (None: the profile's, else 0, noted in the plan). no_resident: the layers (0-based)
    that can keep nothing resident (r_i = 0: a sliding window's past moves, a resident prefix
    does not), so the budget goes to the others. ValueError on invalid sizes or rates or when
    the budget cannot hold the double-buffered working set.
    """
    cm.check_overlap(overlap)
    _check_sizes(num_layers=num_layers, batch_size=batch_size, seq_len=seq_len,
                 hidden_size=hidden_size, kv_hidden_size=kv_hidden_size, new_tokens=new_tokens)
    rate, trip, note = _host_terms(profile, dtype, cpu_attention_bytes_per_s, cpu_round_trip_s)
    c = cm.layer_coefficients(profile, batch_size=batch_size, seq_len=seq_len,
                              hidden_size=hidden_size, kv_hidden_size=kv_hidden_size, dtype=dtype,
                              new_tokens=new_tokens, mlp_params=mlp_params)
    fixed_ws = cm.working_set_bytes(c, x_tokens=0, new_tokens=new_tokens)
    _check_budget(gpu_budget_bytes, fixed_ws, seq_len + new_tokens, batch_size)
    started = time.perf_counter()
    no_resident = frozenset(no_resident)
    best = _solve(c, num_layers, overlap, gpu_budget_bytes, fixed_ws, cpu=False,
                  no_resident=no_resident)
    if rate:
        c = with_cpu_terms(c, profile, batch_size=batch_size, hidden_size=hidden_size,
                           kv_hidden_size=kv_hidden_size, dtype=dtype,
                           cpu_attention_bytes_per_s=rate, round_trip_s=trip,
                           new_tokens=new_tokens, mlp_params=mlp_params)
        shared = _solve(c, num_layers, overlap, gpu_budget_bytes, fixed_ws, cpu=True,
                        no_resident=no_resident)
        if _step(c, shared, overlap) < _step(c, best, overlap) * (1 - MAKESPAN_SLACK):
            best = shared
        else:
            slow = (f"no CPU share: a host attending at {rate / 1e9:.3g} GB/s does not make "
                    f"this step faster")
            note = f"{slow}; {note}" if note else slow
    solve_s = time.perf_counter() - started
    makespan, recompute, resident, cpu = best
    return _make_plan(profile, c, recompute, resident, cpu, overlap=overlap,
                      lp_objective_s=makespan, solve_s=solve_s,
                      batch_size=batch_size, hidden_size=hidden_size,
                      kv_hidden_size=kv_hidden_size, dtype=dtype,
                      gpu_budget_bytes=gpu_budget_bytes, new_tokens=new_tokens,
                      cpu_rate=rate, cpu_round_trip_s=trip, cpu_note=note)


def _host_terms(profile: HardwareProfile, dtype, rate, trip) -> tuple[float | None, float, str]:
    """(the host attention rate to plan with or None, the round trip in seconds, a note for
    the plan saying where they come from or why there is no CPU share)."""
    rate = check_rate(rate)
    trip = check_round_trip(trip)
    key = dtype_key(dtype)
    if rate is None:
        rate = profile.cpu_attention_rate(key)
        if rate is None:
            return None, 0.0, (f"no CPU share: the profile has no host attention rate for "
                               f"{key}; measure one with kvpr profile --host (kvpr plan "
                               f"also takes --cpu-attention-gbps)")
    if rate == 0:
        return None, 0.0, "no CPU share: a host attention rate of 0"
    if trip is None:
        trip = profile.round_trip_s
        if trip is None:
            return rate, 0.0, "round trip not measured: counted as 0"
    return rate, trip, ""


def _solve(c: cm.LayerCoefficients, num_layers: int, overlap: str, budget: float | None,
           fixed_ws: float, cpu: bool, no_resident: frozenset = frozenset()
           ) -> tuple[float, list[int], list[int], list[int]]:
    """(the LP's optimum in seconds, and its whole-token l_i, r_i, u_i) with or without a CPU
    share; the layers in ``no_resident`` keep nothing resident."""
    lp = _build_lp(c, num_layers, overlap, budget, fixed_ws, cpu, no_resident)
    makespan = _solve_two_phases(lp)
    return (makespan * lp.unit, *_whole_tokens(lp, c, overlap, budget, fixed_ws))


def _step(c: cm.LayerCoefficients, solved, overlap: str) -> float:
    _, recompute, resident, cpu = solved
    return cm.step_time(c, recompute, resident, overlap, cpu)


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_sizes(*, new_tokens: int, **sizes: int) -> None:
    for name, value in sizes.items():
        _check_int(name, value)
    _check_int("new_tokens", new_tokens, minimum=0)


def _check_budget(budget: float | None, fixed_ws: float, positions: int, batch_size: int) -> None:
    """ValueError unless ``budget`` (None: no budget) holds the double-buffered working set."""
    if budget is None:
        return
    if not (isinstance(budget, (int, float)) and math.isfinite(budget)):
        raise ValueError(f"gpu_budget_bytes must be a finite number, got {budget!r}")
    if budget < fixed_ws:
        raise ValueError(
            f"nothing fits: gpu_budget_bytes={budget:.4g} cannot hold the "
            f"double-buffered working set of {fixed_ws:.4g} bytes (2 slots of K,V and one "
            f"assembled K,V for {positions} positions at batch {batch_size}); raise the "
            f"budget or lower batch/seq_len")


def _build_lp(c: cm.LayerCoefficients, num_layers: int, overlap: str, budget: float | None,
              fixed_ws: float, cpu: bool = False,
              no_resident: frozenset = frozenset()) -> _SplitLP:
    """The variables and rows of the module docstring (the objective is set per phase)."""
    model = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    model.verbose = 0
    # Time unit: one token position's K,V transfer, so per-token coefficients are O(1) and the
    # tie-break terms sit well above CBC's tolerances.
    unit = c.kv_s_per_token
    a_u, k_u = c.x_s_per_token / unit, 1.0
    g_u, d_u, rest_u = c.recompute_s_per_token / unit, c.store_s / unit, c.attention_s / unit
    s, L = c.seq_len, num_layers
    ls = [model.add_var(f"l_{i}", lb=0.0, ub=s) for i in range(L)]
    rs = [model.add_var(f"r_{i}", lb=0.0,
                        ub=s if budget is not None and i not in no_resident else 0.0)
          for i in range(L)]
    fx, fc, fk, fa, fd = ([model.add_var(f"{kind}_{i}", lb=0.0) for i in range(L)]
                          for kind in ("x", "c", "k", "a", "d"))
    us = [model.add_var(f"u_{i}", lb=1.0, ub=s) for i in range(L)] if cpu else []
    for i in range(L):
        l, r = ls[i], rs[i]
        u = us[i] if cpu else 0.0
        model += l + r + u <= s, f"tokens_{i}"
        if i == 1:
            model += fx[i] >= fk[0] + a_u * l, f"x_link_{i}"
        elif i >= 2:
            model += fx[i] >= fd[i - 2] + a_u * l, f"x_link_{i}"
        if overlap == "row":
            model += fx[i] >= (fc[i - 1] if i else 0.0) + a_u * l, f"x_window_{i}"
        else:
            model += fx[i] >= (fa[i - 2] if i >= 2 else 0.0) + a_u * l, f"x_window_{i}"
        model += fc[i] >= fx[i] + g_u * l, f"c_data_{i}"
        if i:
            model += fc[i] >= fa[i - 1] + g_u * l, f"c_gpu_{i}"
        model += fk[i] >= fx[i] + k_u * (s - l - r - u), f"k_link_{i}"
        att = rest_u - c.gpu_kv_s_per_token / unit * u
        model += fa[i] >= fc[i] + att, f"a_gpu_{i}"
        model += fa[i] >= fk[i] + att, f"a_data_{i}"
        model += fd[i] >= fa[i] + d_u, f"d_data_{i}"
        if i + 1 < L:
            model += fd[i] >= fk[i + 1] + d_u, f"d_link_{i}"
        else:
            model += fd[i] >= (fd[i - 1] if i else fk[0]) + d_u, f"d_link_{i}"
    if cpu:
        _cpu_rows(model, c, unit, us, fa)
    if budget is not None:
        x = model.add_var("x_slot", lb=0.0, ub=s)
        for i, l in enumerate(ls):
            model += x >= l, f"x_slot_{i}"
        model += (mip.xsum(c.kv_bytes_per_token * r for r in rs)
                  + 2 * c.x_bytes_per_token * x <= budget - fixed_ws), "budget"
    return _SplitLP(model, ls, rs, fa, fd[L - 1], unit, us)


def _cpu_rows(model: mip.Model, c: cm.LayerCoefficients, unit: float, us: list, fa: list) -> None:
    """The host's task per layer (module docstring, "CPU share"): after the query, after the
    previous layer's host task, before the part of ATT after the merge."""
    cpu_u, fixed_u, post_u = c.cpu_s_per_token / unit, c.cpu_fixed_s / unit, c.post_merge_s / unit
    fh = [model.add_var(f"h_{i}", lb=0.0) for i in range(len(us))]
    for i, u in enumerate(us):
        model += fh[i] >= (fa[i - 1] if i else 0.0) + fixed_u + cpu_u * u, f"h_query_{i}"
        if i:
            model += fh[i] >= fh[i - 1] + fixed_u + cpu_u * u, f"h_host_{i}"
        model += fa[i] >= fh[i] + post_u, f"a_merge_{i}"


def _solve_two_phases(lp: _SplitLP) -> float:
    """Phase 1: the step's end. Phase 2, holding that: finish every layer as early as possible,
    recompute no more and keep no less resident than needed (one plan among equally fast
    ones). Returns phase 1's optimum in LP time units."""
    model = lp.model
    model.objective = mip.minimize(lp.end)
    solve(model)
    makespan = lp.end.x
    model += lp.end <= makespan * (1 + MAKESPAN_SLACK) + MAKESPAN_SLACK, "keep_makespan"
    model.objective = mip.minimize(mip.xsum(lp.attention)
                                   + TIE_EPS * (mip.xsum(lp.recompute) - mip.xsum(lp.resident)
                                                + mip.xsum(lp.cpu)))
    solve(model)
    return makespan


def _whole_tokens(lp: _SplitLP, c: cm.LayerCoefficients, overlap: str, budget: float | None,
                  fixed_ws: float) -> tuple[list[int], list[int], list[int]]:
    """(l_i, r_i, u_i) in whole tokens: resident prefixes floored (the budget stays met), the
    CPU share floored (at least 1 where the LP has one), recompute floored or ceiled
    (whichever the model prefers) within the layer and the budget's X staging slots, then the
    CPU share likewise."""
    s = c.seq_len
    resident = [min(int(math.floor(r.x + 1e-6)), s) for r in lp.resident]
    cpu = [min(max(int(math.floor(u.x + 1e-6)), 1), s - r) for u, r in zip(lp.cpu, resident)]
    cpu = cpu or [0] * len(resident)
    x_cap = s
    if budget is not None:
        left = budget - fixed_ws - c.kv_bytes_per_token * sum(resident)
        x_cap = max(0, min(s, int(left // (2 * c.x_bytes_per_token))))
    recompute = _round_recompute(c, [l.x for l in lp.recompute], resident, cpu, min(s, x_cap),
                                 overlap)
    if lp.cpu:
        cpu = _round_cpu(c, [u.x for u in lp.cpu], recompute, resident, cpu, overlap)
    return recompute, resident, cpu


def _round_recompute(c: cm.LayerCoefficients, values: list[float], resident: list[int],
                     cpu: list[int], cap: int, overlap: str) -> list[int]:
    """Floor or ceil each layer's LP l_i, keeping the faster (by the cost model; the makespan is
    convex in each l_i, so its integer optimum is next to the LP's)."""
    room = [min(c.seq_len - r - u, cap) for r, u in zip(resident, cpu)]
    lows = [min(max(int(math.floor(v + 1e-6)), 0), top) for v, top in zip(values, room)]
    return _round_up_where_faster(values, lows, room,
                                  lambda l: cm.step_time(c, l, resident, overlap, cpu))


def _round_cpu(c: cm.LayerCoefficients, values: list[float], recompute: list[int],
               resident: list[int], lows: list[int], overlap: str) -> list[int]:
    """The CPU share's floor or ceil per layer, as _round_recompute does for l_i."""
    room = [c.seq_len - r - l for r, l in zip(resident, recompute)]
    return _round_up_where_faster(values, lows, room,
                                  lambda u: cm.step_time(c, recompute, resident, overlap, u))


def _round_up_where_faster(values: list[float], lows: list[int], room: list[int],
                           step_time) -> list[int]:
    """One pass in layer order from the floors ``lows``: a layer's value is ceiled (within its
    ``room``) where ``step_time`` of the whole split gets shorter."""
    chosen = list(lows)
    for i, value in enumerate(values):
        high = min(int(math.ceil(value - 1e-6)), room[i])
        if high <= chosen[i]:
            continue
        trial = chosen[:i] + [high] + chosen[i + 1:]
        if step_time(trial) < step_time(chosen):
            chosen = trial
    return chosen


def _make_plan(profile: HardwareProfile, c: cm.LayerCoefficients, recompute: list[int],
               resident: list[int], cpu: list[int], *, overlap: str, lp_objective_s: float,
               solve_s: float, batch_size: int, hidden_size: int, kv_hidden_size: int, dtype,
               gpu_budget_bytes: float | None, new_tokens: int, cpu_rate: float | None,
               cpu_round_trip_s: float, cpu_note: str) -> Plan:
    """The Plan of an integer split: the cost model's times and bytes, against ratio 0."""
    s, num_layers = c.seq_len, len(recompute)
    times, tail = cm.step_times(c, recompute, resident, overlap, cpu)
    zeros = [0] * num_layers
    base_times, base_tail = cm.step_times(c, zeros, zeros, overlap)
    return Plan(
        ratios=[l / s for l in recompute],
        recompute_tokens=recompute,
        resident_tokens=resident,
        predicted_step_s=sum(times) + tail,
        baseline_step_s=sum(base_times) + base_tail,
        profile_name=profile.name,
        profile_source=profile.source,
        h2d_bytes_per_s=profile.h2d_bytes_per_s,
        d2h_bytes_per_s=profile.d2h_bytes_per_s,
        layer_times_s=times,
        baseline_layer_times_s=base_times,
        tail_s=tail,
        h2d_bytes=[c.h2d_bytes(l, r, u) for l, r, u in zip(recompute, resident, cpu)],
        d2h_bytes=[c.store_bytes] * num_layers,
        baseline_h2d_bytes=c.h2d_bytes(0, 0),
        link_limit_s=cm.link_time(c, profile, recompute, resident, cpu),
        baseline_link_limit_s=cm.link_time(c, profile, zeros, zeros),
        lp_objective_s=lp_objective_s,
        solve_s=solve_s,
        num_layers=num_layers,
        batch_size=batch_size,
        seq_len=s,
        hidden_size=hidden_size,
        kv_hidden_size=kv_hidden_size,
        dtype=dtype_key(dtype),
        gpu_budget_bytes=gpu_budget_bytes,
        working_set_bytes=cm.working_set_bytes(c, max(recompute), new_tokens),
        overlap=overlap,
        coefficients=c,
        cpu_tokens=cpu,
        cpu_ratios=[u / s for u in cpu],
        cpu_attention_bytes_per_s=cpu_rate,
        cpu_round_trip_s=cpu_round_trip_s if cpu_rate else None,
        cpu_note=cpu_note,
    )
