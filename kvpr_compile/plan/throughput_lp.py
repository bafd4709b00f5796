"""Throughput planner: python-mip LP over the throughput schedule's task graph -> recompute
length per layer, for each candidate micro-batch split; the split is chosen by enumeration under
a device-memory budget.

For a fixed split (b_1..b_m rows), every task t of `throughput_graph` gets a finish-time variable
f_t >= 0 and one row per predecessor u:  f_t >= f_u + duration_t(l_layer(t)), with durations
linear in the layer's l in [0, s]. Phase 1 minimises the step's end (max over tasks, one more
variable); phase 2 holds it and minimises the recomputed tokens (no more recompute than pays).
As in latency_lp.py the max() of the task graph is linearised exactly, so for fixed l the optimum
is the DAG's longest path (`throughput_graph.makespan`), which the tests check.

Split choice: the even split of the effective batch into m micro-batches (sizes differ by at most
one row), for the fewest m whose working set fits the budget and for 2m and 4m; the fastest plan
wins (ties: fewer micro-batches). Working set on the device: two layers' weights, the hidden
states of the whole effective batch, per micro-batch cache slot (two of them, shared by all
micro-batches: see runtime/column_runner.py) K,V for s+1 positions plus X for l, and the K,V one
micro-batch's attention reads (the assemble writes recomputed ++ loaded ++ new into fresh
memory).
The ratio-0 plan of the same split is the baseline (a FlexGen-style schedule with a pinned
cache); the link limit is every byte the step moves over the measured bandwidths.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import mip
import torch

from . import cost_model as cm
from .profile import HardwareProfile
from .mip_solve import solve
from . import throughput_graph as tg
from .micro_batch_words import in_words
from .throughput_graph import even_split  # noqa: F401  (re-exported: the planner's split)

ASSEMBLED = 1       # micro-batch K,V outputs of the assemble alive at once (read by attention)
HIDDEN_COPIES = 4   # hidden states of the effective batch kept on the device
                    # (in, out, residual, norm)


@dataclass
class ThroughputPlan:
    micro_batches: list[int]
    recompute_tokens: list[int]
    ratios: list[float]
    predicted_step_s: float
    baseline_step_s: float           # the same split at ratio 0 (weights and full K,V streamed)
    link_limit_s: float
    baseline_link_limit_s: float
    working_set_bytes: int
    gpu_budget_bytes: float | None
    effective_batch: int
    num_layers: int
    seq_len: int
    profile_name: str
    candidates: list[dict] = field(default_factory=list)   # every split tried: m, step, fits
    solve_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.effective_batch / self.predicted_step_s

    @property
    def baseline_tokens_per_s(self) -> float:
        return self.effective_batch / self.baseline_step_s

    @property
    def speedup(self) -> float:
        return self.baseline_step_s / self.predicted_step_s

    def __str__(self) -> str:
        return (f"throughput plan [{self.profile_name}, batch {self.effective_batch} as "
                f"{in_words(self.micro_batches)}, s={self.seq_len}, "
                f"{self.num_layers} layers]: recompute ratio {min(self.ratios):.3f}.."
                f"{max(self.ratios):.3f}; predicted {self.tokens_per_s:.1f} tokens/s vs "
                f"{self.baseline_tokens_per_s:.1f} at ratio 0 ({self.speedup:.2f}x); link limit "
                f"{self.link_limit_s * 1e3:.2f} ms/step, "
                f"predicted {self.predicted_step_s * 1e3:.2f}")

    def to_dict(self) -> dict:
        return asdict(self)


def working_set_bytes(shape: tg.StepShape, x_tokens: int) -> int:
    p, b = shape.bytes_per_element, max(shape.micro_batches)
    hidden = HIDDEN_COPIES * sum(shape.micro_batches) * shape.hidden * p
    kv = cm.kv_bytes_per_token(b, shape.kv_hidden, p) * (shape.seq_len + 1)
    slot = kv + cm.x_bytes_per_token(b, shape.hidden, p) * x_tokens
    return 2 * shape.layer_weight_bytes + hidden + 2 * slot + ASSEMBLED * kv


def solve_split(shape: tg.StepShape) -> tuple[list[float], float]:
    """LP optimum for one split: (continuous l per layer, makespan in seconds)."""
    spec, preds = tg.tasks(shape), {}
    for u, v, _ in tg.edges(shape):
        preds.setdefault(v, []).append(u)
    unit = spec[("w", 0)][1] or 1.0   # seconds per LP time unit: one layer's weight copy
    model = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    model.verbose = 0
    ls = [model.add_var(f"l_{j}", lb=0.0, ub=shape.seq_len) for j in range(shape.num_layers)]
    f = {t: model.add_var(lb=0.0) for t in spec}
    end = model.add_var("end", lb=0.0)
    for t, (_, const, per_token, layer) in spec.items():
        dur = const / unit + (per_token / unit) * ls[layer]
        model += f[t] >= dur
        for u in preds.get(t, ()):
            model += f[t] >= f[u] + dur
        model += end >= f[t]
    model.objective = mip.minimize(end)
    solve(model)
    best = end.x
    model += end <= best * (1 + 1e-9) + 1e-9
    model.objective = mip.minimize(mip.xsum(ls))
    solve(model)
    return [l.x for l in ls], best * unit


def _integer(shape: tg.StepShape, values: list[float]) -> list[int]:
    """Floor or ceil each layer's l (whichever the DAG prefers), one pass in layer order."""
    chosen = [min(max(int(math.floor(v + 1e-6)), 0), shape.seq_len) for v in values]
    for j, v in enumerate(values):
        high = min(int(math.ceil(v - 1e-6)), shape.seq_len)
        if high > chosen[j]:
            trial = chosen[:j] + [high] + chosen[j + 1:]
            if tg.makespan(shape, trial) < tg.makespan(shape, chosen):
                chosen = trial
    return chosen


def candidate_counts(batch: int, floor_bytes, budget: float | None) -> list[int]:
    """Micro-batch counts worth planning: the fewest that fit the budget (found by bisection on
    the working set, which shrinks as m grows), then 2x and 4x that (finer pipelining may hide the
    first loads; more costs device-memory passes over the weights). All of them when none fits,
    so the error can name the smallest working set."""
    lo, hi = 1, batch
    if budget is not None and floor_bytes(hi) > budget:
        return [batch]
    while budget is not None and lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if floor_bytes(mid) <= budget else (mid + 1, hi)
    return sorted({min(lo * f, batch) for f in (1, 2, 4)})


def step_shape(profile: HardwareProfile, *, num_layers: int, micro_batches, seq_len: int,
               hidden_size: int, kv_hidden_size: int, dtype, mlp_params: int | None = None,
               device_mem_bytes_per_s: float | None = None) -> tg.StepShape:
    """device_mem_bytes_per_s overrides the profile's read rate (mem_read_bytes_per_s)."""
    p = cm.bytes_per_element(dtype)
    mem = device_mem_bytes_per_s or profile.mem_read_bytes_per_s
    return tg.StepShape(
        num_layers=num_layers, micro_batches=tuple(micro_batches), seq_len=seq_len,
        hidden=hidden_size, kv_hidden=kv_hidden_size, bytes_per_element=p,
        layer_weight_bytes=cm.layer_params(hidden_size, kv_hidden_size, mlp_params) * p,
        mlp_params=mlp_params, h2d_bytes_per_s=profile.h2d_bytes_per_s,
        d2h_bytes_per_s=profile.d2h_bytes_per_s, flops_per_s=profile.flops(dtype),
        device_mem_bytes_per_s=mem, copy_bytes_per_s=profile.mem_copy_bytes_per_s)


def plan_throughput(profile: HardwareProfile, *, num_layers: int, batch_size: int, seq_len: int,
                    hidden_size: int, kv_hidden_size: int, dtype: torch.dtype | str,
                    micro_batches: int | None = None, gpu_budget_bytes: float | None = None,
                    mlp_params: int | None = None, device_mem_bytes_per_s: float | None = None,
                    ratio: float | None = None) -> ThroughputPlan:
    """Plan the throughput schedule. ``micro_batches`` fixes m (else `candidate_counts`);
    ``ratio`` forces l = floor(ratio * s) in every layer (no LP). ValueError naming the numbers
    when nothing fits the budget."""
    for name, value in (("num_layers", num_layers), ("batch_size", batch_size),
                        ("seq_len", seq_len), ("hidden_size", hidden_size),
                        ("kv_hidden_size", kv_hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    def shape_for(m):
        return step_shape(profile, num_layers=num_layers, micro_batches=even_split(batch_size, m),
                          seq_len=seq_len, hidden_size=hidden_size, kv_hidden_size=kv_hidden_size,
                          dtype=dtype, mlp_params=mlp_params,
                          device_mem_bytes_per_s=device_mem_bytes_per_s)

    started, best, tried = time.perf_counter(), None, []
    for m in [micro_batches] if micro_batches is not None else candidate_counts(
            batch_size, lambda m: working_set_bytes(shape_for(m), 0), gpu_budget_bytes):
        shape = shape_for(m)
        floor_ws = working_set_bytes(shape, 0)
        if gpu_budget_bytes is not None and floor_ws > gpu_budget_bytes:
            tried.append({"micro_batches": m, "fits": False, "working_set_bytes": floor_ws})
            continue
        if ratio is not None:
            tokens = [int(math.floor(ratio * seq_len))] * num_layers
        else:
            tokens = _integer(shape, solve_split(shape)[0])
        if gpu_budget_bytes is not None:   # X staging slots must fit too
            cap = int((gpu_budget_bytes - floor_ws) // (2 * cm.x_bytes_per_token(
                max(shape.micro_batches), hidden_size, shape.bytes_per_element)))
            tokens = [min(l, cap, seq_len) for l in tokens]
        step = tg.makespan(shape, tokens)
        tried.append({"micro_batches": m, "fits": True, "step_s": step,
                      "working_set_bytes": working_set_bytes(shape, max(tokens))})
        if best is None or step < best[2] * (1 - 1e-9):
            best = (shape, tokens, step)
    if best is None:
        smallest = min(t["working_set_bytes"] for t in tried)
        raise ValueError(
            f"nothing fits: gpu_budget_bytes={gpu_budget_bytes:.4g} is below the smallest working "
            f"set {smallest:.4g} bytes (two layers' weights, the batch's hidden states and two "
            f"micro-batch K,V slots for {seq_len + 1} positions)")
    shape, tokens, step = best
    zeros = [0] * num_layers
    return ThroughputPlan(
        micro_batches=list(shape.micro_batches), recompute_tokens=tokens,
        ratios=[l / seq_len for l in tokens], predicted_step_s=step,
        baseline_step_s=tg.makespan(shape, zeros),
        link_limit_s=tg.link_limit_s(shape, tokens),
        baseline_link_limit_s=tg.link_limit_s(shape, zeros),
        working_set_bytes=working_set_bytes(shape, max(tokens)),
        gpu_budget_bytes=gpu_budget_bytes, effective_batch=batch_size, num_layers=num_layers,
        seq_len=seq_len, profile_name=profile.name, candidates=tried,
        solve_s=time.perf_counter() - started)

