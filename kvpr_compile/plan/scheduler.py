"""Split planner: a python-mip LP (CBC) over the cost model -> recompute/resident tokens per layer.

LP (coefficients A, R, K, D, M, rest from cost_model; R counts the recompute's GEMMs and its
elementwise passes, M the assemble; time unit = one token's K,V transfer, so the per-token
coefficients are O(1)); per layer i:
  variables  l_i in [0, s] recomputed tokens, r_i in [0, s] resident tokens (0 without a budget),
             and the finish times of the layer's five tasks (cost_model's schedule):
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
  phase 1    minimise d_{L-1} (the step's end)
  phase 2    keep d_{L-1} <= phase-1 optimum, minimise sum_i a_i + 1e-4 * sum_i (l_i - r_i)
             (among equally fast plans: finish each layer early, recompute no more than needed,
             e.g. l = 0 when h = 2*h_kv makes shipping X a wash, keep as much resident as fits)
  budget B   x_slot >= l_i for all i;
             sum_i r_i * 2*b*h_kv*p + 2*b*h*p * x_slot <= B - 2 * 2*b*(s+n)*h_kv*p
             (double-buffered K,V slots and X staging slots, plus resident prefixes)
Each "finish = max(preds) + duration" of the schedule is one row per predecessor: the max()
linearised, exact because minimising the end pushes every binding row tight. Steady state this is
the paper's t_i >= A_i + R_i, t_i >= A_i + K_i (+ D on the link, with the previous layer's rest
hidden under this layer's X load). For fixed l, r the optimum is exactly the longest path of
taskgraph's graph and cost_model.schedule(...).total; the plan reports that number at the floored
integer l_i, r_i (tests check LP == schedule == longest path).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import mip
import torch

from . import cost_model as cm
from .profile import HardwareProfile, dtype_key
from .resolve import resolve_profile

TIE_EPS = 1e-4        # phase-2 cost per recomputed token, in LP time units (see below)
MAKESPAN_SLACK = 1e-9 # relative slack when phase 2 keeps phase 1's optimum
REPRESENTATIVE_SEQ_LEN = 4096


@dataclass
class Plan:
    """Per-layer split chosen by `plan_split` and its predicted cost (seconds, bytes)."""

    ratios: list[float]                 # l_i / s
    recompute_tokens: list[int]         # l_i
    resident_tokens: list[int]          # r_i (a GPU-resident prefix)
    predicted_step_s: float             # cost model at the integer plan
    baseline_step_s: float              # same model, ratio 0, nothing resident (full-KV prefetch)
    profile_name: str
    profile_source: str = ""
    h2d_bytes_per_s: float = 0.0
    d2h_bytes_per_s: float = 0.0
    layer_times_s: list[float] = field(default_factory=list)
    baseline_layer_times_s: list[float] = field(default_factory=list)
    tail_s: float = 0.0                 # after the last attention (the last append)
    h2d_bytes: list[int] = field(default_factory=list)
    d2h_bytes: list[int] = field(default_factory=list)
    baseline_h2d_bytes: int = 0         # per layer
    link_limit_s: float = 0.0           # plan's bytes over bandwidth
    baseline_link_limit_s: float = 0.0  # full K,V bytes over bandwidth
    lp_objective_s: float = 0.0         # LP optimum (continuous l, r)
    solve_s: float = 0.0                # wall time of build + solve
    num_layers: int = 0
    batch_size: int = 0
    seq_len: int = 0
    hidden_size: int = 0
    kv_hidden_size: int = 0
    dtype: str = ""
    gpu_budget_bytes: float | None = None
    working_set_bytes: int = 0
    overlap: str = cm.DEFAULT_OVERLAP
    coefficients: cm.LayerCoefficients | None = None

    @property
    def speedup(self) -> float:
        return self.baseline_step_s / self.predicted_step_s

    def __str__(self) -> str:
        ratios = self.ratios or [0.0]
        resident = (f", {sum(self.resident_tokens)} tokens resident"
                    if any(self.resident_tokens) else "")
        return (f"plan [{self.profile_name}, {self.overlap} schedule, b={self.batch_size}, "
                f"s={self.seq_len}, h={self.hidden_size}, h_kv={self.kv_hidden_size}, "
                f"{self.dtype}]: recompute ratio {min(ratios):.3f}..{max(ratios):.3f} over "
                f"{self.num_layers} layers{resident}; predicted {self.predicted_step_s * 1e3:.2f} "
                f"ms/step vs full-KV prefetch {self.baseline_step_s * 1e3:.2f} ms "
                f"({self.speedup:.2f}x)")

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _quiet_stdout():
    """CBC/Clp print LP status lines on fd 1 even with verbose=0 (python-mip issue #359 and
    kin); point fd 1 at /dev/null for the solve. Process-wide for those milliseconds."""
    try:
        sys.stdout.flush()
    except (AttributeError, OSError, ValueError):
        pass
    try:
        saved = os.dup(1)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solve(model: mip.Model) -> None:
    with _quiet_stdout():
        status = model.optimize()
    if status != mip.OptimizationStatus.OPTIMAL:
        raise ValueError(f"the split LP has no optimal solution (status {status.name})")


def _round_recompute(c: cm.LayerCoefficients, values: list[float], resident: list[int],
                     cap: int, overlap: str) -> list[int]:
    """Floor or ceil each layer's LP value, one pass in layer order, keeping the faster (by the
    cost model; the makespan is convex in each l_i, so its integer optimum is next to the LP's)."""
    lows = [min(max(int(math.floor(v + 1e-6)), 0), c.seq_len - r, cap)
            for v, r in zip(values, resident)]
    chosen = list(lows)
    for i, (value, r) in enumerate(zip(values, resident)):
        high = min(int(math.ceil(value - 1e-6)), c.seq_len - r, cap)
        if high <= chosen[i]:
            continue
        trial = chosen[:i] + [high] + chosen[i + 1:]
        if cm.step_time(c, trial, resident, overlap) < cm.step_time(c, chosen, resident, overlap):
            chosen = trial
    return chosen


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def plan_split(profile: HardwareProfile, *, num_layers: int, batch_size: int, seq_len: int,
               hidden_size: int, kv_hidden_size: int, dtype: torch.dtype | str,
               gpu_budget_bytes: float | None = None, new_tokens: int = 1,
               mlp_params: int | None = None, overlap: str = cm.DEFAULT_OVERLAP) -> Plan:
    """Solve the LP above and return the integer plan (r_i floored, l_i rounded; see below).

    gpu_budget_bytes: device memory for the KV path (staging slots + resident prefixes); None
    means no resident prefix and no memory check. new_tokens=0 drops the append, the
    rest-of-layer compute and the device-memory terms (the paper's bare model). overlap: "row" (the paper's schedule) or
    "stream" (deeper pipelining), see cost_model. ValueError on invalid sizes or when the budget
    cannot hold the double-buffered working set.
    """
    cm.check_overlap(overlap)
    for name, value in (("num_layers", num_layers), ("batch_size", batch_size),
                        ("seq_len", seq_len), ("hidden_size", hidden_size),
                        ("kv_hidden_size", kv_hidden_size)):
        _check_int(name, value)
    _check_int("new_tokens", new_tokens, minimum=0)
    c = cm.layer_coefficients(profile, batch_size=batch_size, seq_len=seq_len,
                              hidden_size=hidden_size, kv_hidden_size=kv_hidden_size, dtype=dtype,
                              new_tokens=new_tokens, mlp_params=mlp_params)
    s = seq_len
    fixed_ws = cm.working_set_bytes(c, x_tokens=0, new_tokens=new_tokens)
    if gpu_budget_bytes is not None:
        if not (isinstance(gpu_budget_bytes, (int, float)) and math.isfinite(gpu_budget_bytes)):
            raise ValueError(f"gpu_budget_bytes must be a finite number, got {gpu_budget_bytes!r}")
        if gpu_budget_bytes < fixed_ws:
            raise ValueError(
                f"nothing fits: gpu_budget_bytes={gpu_budget_bytes:.4g} cannot hold the "
                f"double-buffered working set of {fixed_ws:.4g} bytes (2 slots of K,V for "
                f"{s + new_tokens} positions at batch {batch_size}); raise the budget or lower "
                f"batch/seq_len")

    started = time.perf_counter()
    model = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    model.verbose = 0
    # Time unit: one token position's K,V transfer, so per-token coefficients are O(1) and the
    # tie-break terms sit well above CBC's tolerances.
    unit = c.kv_s_per_token
    a_u, k_u = c.x_s_per_token / unit, 1.0
    g_u, d_u, rest_u = c.recompute_s_per_token / unit, c.store_s / unit, c.attention_s / unit
    has_budget = gpu_budget_bytes is not None
    L = num_layers
    ls = [model.add_var(f"l_{i}", lb=0.0, ub=s) for i in range(L)]
    rs = [model.add_var(f"r_{i}", lb=0.0, ub=s if has_budget else 0.0) for i in range(L)]
    fx, fc, fk, fa, fd = ([model.add_var(f"{kind}_{i}", lb=0.0) for i in range(L)]
                          for kind in ("x", "c", "k", "a", "d"))
    for i in range(L):
        l, r = ls[i], rs[i]
        model += l + r <= s, f"tokens_{i}"
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
        model += fk[i] >= fx[i] + k_u * (s - l - r), f"k_link_{i}"
        model += fa[i] >= fc[i] + rest_u, f"a_gpu_{i}"
        model += fa[i] >= fk[i] + rest_u, f"a_data_{i}"
        model += fd[i] >= fa[i] + d_u, f"d_data_{i}"
        if i + 1 < L:
            model += fd[i] >= fk[i + 1] + d_u, f"d_link_{i}"
        else:
            model += fd[i] >= (fd[i - 1] if i else fk[0]) + d_u, f"d_link_{i}"
    if has_budget:
        x = model.add_var("x_slot", lb=0.0, ub=s)
        for i, l in enumerate(ls):
            model += x >= l, f"x_slot_{i}"
        model += (mip.xsum(c.kv_bytes_per_token * r for r in rs)
                  + 2 * c.x_bytes_per_token * x <= gpu_budget_bytes - fixed_ws), "budget"
    # Phase 1: the step's end. Phase 2, holding that: finish every layer as early as possible,
    # recompute no more and keep no less resident than needed (one plan among equally fast ones).
    model.objective = mip.minimize(fd[L - 1])
    _solve(model)
    makespan = fd[L - 1].x
    model += fd[L - 1] <= makespan * (1 + MAKESPAN_SLACK) + MAKESPAN_SLACK, "keep_makespan"
    model.objective = mip.minimize(mip.xsum(fa) + TIE_EPS * (mip.xsum(ls) - mip.xsum(rs)))
    _solve(model)
    solve_s = time.perf_counter() - started

    # Whole tokens: resident prefixes floored (the budget stays met), recompute floored or ceiled
    # (whichever the model prefers) within the layer and the budget's X staging slots.
    resident = [min(int(math.floor(r.x + 1e-6)), s) for r in rs]
    x_cap = s
    if has_budget:
        left = gpu_budget_bytes - fixed_ws - c.kv_bytes_per_token * sum(resident)
        x_cap = max(0, min(s, int(left // (2 * c.x_bytes_per_token))))
    recompute = _round_recompute(c, [l.x for l in ls], resident, min(s, x_cap), overlap)
    lp_objective_s = makespan * unit

    times, tail = cm.step_times(c, recompute, resident, overlap)
    zeros = [0] * num_layers
    base_times, base_tail = cm.step_times(c, zeros, zeros, overlap)
    name = dtype_key(dtype)
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
        h2d_bytes=[c.h2d_bytes(l, r) for l, r in zip(recompute, resident)],
        d2h_bytes=[c.store_bytes] * num_layers,
        baseline_h2d_bytes=c.h2d_bytes(0, 0),
        link_limit_s=cm.link_time(c, profile, recompute, resident),
        baseline_link_limit_s=cm.link_time(c, profile, zeros, zeros),
        lp_objective_s=lp_objective_s,
        solve_s=solve_s,
        num_layers=num_layers,
        batch_size=batch_size,
        seq_len=seq_len,
        hidden_size=hidden_size,
        kv_hidden_size=kv_hidden_size,
        dtype=name,
        gpu_budget_bytes=gpu_budget_bytes,
        working_set_bytes=cm.working_set_bytes(c, max(recompute), new_tokens),
        overlap=overlap,
        coefficients=c,
    )


@functools.lru_cache(maxsize=256)
def _cached_plan(name: str, source: str, h2d: float, d2h: float, flops: float, mem_copy: float,
                 mem_read: float, dtype: str, batch_size: int, hidden_size: int,
                 kv_hidden_size: int, num_layers: int, overlap: str) -> Plan:
    profile = HardwareProfile(name=name, device_name=name, h2d_bytes_per_s=h2d,
                              d2h_bytes_per_s=d2h, flops_per_s={dtype: flops}, torch_version="",
                              date="", source=source, mem_copy_bytes_per_s=mem_copy,
                              mem_read_bytes_per_s=mem_read)
    return plan_split(profile, num_layers=num_layers, batch_size=batch_size,
                      seq_len=REPRESENTATIVE_SEQ_LEN, hidden_size=hidden_size,
                      kv_hidden_size=kv_hidden_size, dtype=dtype, overlap=overlap)


def plan_for(profile: HardwareProfile, batch_size: int, hidden_size: int, kv_hidden_size: int,
             dtype: torch.dtype | str, num_layers: int, overlap: str = cm.DEFAULT_OVERLAP
             ) -> Plan:
    """The plan at a representative s (4096), cached on the profile's name, source and rates (link,
    GEMM, device memory) and
    on the dims (shared: treat it as read-only)."""
    key = dtype_key(dtype)
    return _cached_plan(profile.name, profile.source, float(profile.h2d_bytes_per_s),
                        float(profile.d2h_bytes_per_s), float(profile.flops(dtype)),
                        float(profile.mem_copy_bytes_per_s), float(profile.mem_read_bytes_per_s), key,
                        int(batch_size), int(hidden_size), int(kv_hidden_size), int(num_layers),
                        cm.check_overlap(overlap))


def ratio_for(profile: HardwareProfile, batch_size: int, hidden_size: int, kv_hidden_size: int,
              dtype: torch.dtype | str, num_layers: int, overlap: str = cm.DEFAULT_OVERLAP
              ) -> list[float]:
    """Per-layer l/s at a representative s (4096), cached (see plan_for).

    Under the model l*/s hardly depends on s: the append D (about a token) and the weight reads
    of rest (constant in s) are the only terms not proportional to s, so one solve serves every
    sequence length (llama-7b, b=16, 8 layers on h100-pcie5: 0.77 at s=1024, 0.80 at 4096).
    """
    return list(plan_for(profile, batch_size, hidden_size, kv_hidden_size, dtype, num_layers,
                         overlap).ratios)


def choose_ratios(options: dict | None, *, num_layers: int, batch_size: int, hidden_size: int,
                  kv_hidden_size: int, dtype: torch.dtype | str, device=None
                  ) -> tuple[list[float], str, Plan | None]:
    """The backend's entry. Returns (per-layer ratios, where they come from, the Plan or None).

    options["ratio"] (a number in [0, 1]) forces one ratio for every layer: "forced", no plan.
    Otherwise options["profile"] is resolved (see resolve_profile) and the scheduler's ratios at
    a representative length are returned with a description naming the profile and its source.
    options["overlap"] picks the schedule model ("row" default, or "stream"; see cost_model).
    Other keys are ignored (gpu_budget_bytes too: a resident prefix is not a ratio)."""
    options = options or {}
    ratio = options.get("ratio")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ValueError(f"options['ratio'] must be a number in [0, 1], got {ratio!r}")
        if not 0.0 <= float(ratio) <= 1.0:  # also rejects NaN
            raise ValueError(f"options['ratio'] must be in [0, 1], got {ratio!r}")
        return [float(ratio)] * num_layers, "forced", None
    overlap = cm.check_overlap(options.get("overlap", cm.DEFAULT_OVERLAP))
    profile = resolve_profile(options.get("profile"), device=device)
    plan = plan_for(profile, batch_size, hidden_size, kv_hidden_size, dtype, num_layers, overlap)
    label = "preset" if profile.source.startswith("preset: ") else profile.source
    return list(plan.ratios), f"profile {profile.name} ({label}), {overlap} schedule", plan
