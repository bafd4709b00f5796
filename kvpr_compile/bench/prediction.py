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
                 hidden: int, kv_hidden: int, dtype: torch.dtype, overlap: str | None) -> float:
    past = int(statistics.median(pasts))
    c = cm.layer_coefficients(profile, batch_size=batch, seq_len=past, hidden_size=hidden,
                              kv_hidden_size=kv_hidden, dtype=dtype)
    graph = build_task_graph(c, [split_tokens(r, past) for r in ratios],
                             overlap=overlap or cm.DEFAULT_OVERLAP)
    return predicted_step_time(graph) * 1e3
