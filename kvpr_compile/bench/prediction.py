"""The task-graph prediction of a decode step, printed next to the measured time.

Same cost model and schedule as the scheduler (``taskgraph.build_task_graph``), evaluated for the
split each kvpr run actually used and the median cached length of its timed steps; with the
measured profile on CUDA it says how far the runtime is from what the schedule promises.
"""
from __future__ import annotations

import statistics
from typing import Sequence

import torch

from ..plan import cost_model as cm
from ..plan.taskgraph import build_task_graph, predicted_step_time
from .limits import split_tokens


def predicted_ms(profile, ratios: Sequence[float], pasts: Sequence[int], *, batch: int,
                 hidden: int, kv_hidden: int, dtype: torch.dtype, overlap: str | None,
                 cpu_ratios: Sequence[float] = ()) -> float:
    """``cpu_ratios``: the share of each layer's past attended on the host (none where empty),
    timed with the profile's host rate and round trip (plan/cpu_terms.py)."""
    past = int(statistics.median(pasts))
    c = cm.layer_coefficients(profile, batch_size=batch, seq_len=past, hidden_size=hidden,
                              kv_hidden_size=kv_hidden, dtype=dtype)
    l_tokens = [split_tokens(r, past) for r in ratios]
    cpu = [min(split_tokens(u, past), past - l) for u, l in zip(cpu_ratios, l_tokens)] \
        if any(cpu_ratios) else None
    rate = profile.cpu_attention_rate(dtype)
    if cpu is not None and rate:
        from ..plan.cpu_terms import with_cpu_terms
        c = with_cpu_terms(c, profile, batch_size=batch, hidden_size=hidden,
                           kv_hidden_size=kv_hidden, dtype=dtype, cpu_attention_bytes_per_s=rate,
                           round_trip_s=profile.round_trip_s or 0.0)
    graph = build_task_graph(c, l_tokens, overlap=overlap or cm.DEFAULT_OVERLAP,
                             cpu_tokens=cpu if rate else None)
    return predicted_step_time(graph) * 1e3
