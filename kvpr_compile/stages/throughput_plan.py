"""The throughput LP asked about one graph: its plan for the example batch, and the check that
a GPU budget holds the working set of the micro-batches a call runs."""
from __future__ import annotations

from ..plan.cost_model import REPRESENTATIVE_SEQ_LEN
from .dims import GraphDims


def plan_columns(dims: GraphDims, num_layers: int, *, profile, ratio: float | None,
                 micro_batches: int | None, gpu_budget_bytes: float | None):
    """The throughput plan for the graph's example batch (ratios forced or planned; a
    micro-batch count capped at the batch)."""
    from ..plan.resolve import resolve_profile
    from ..plan.throughput_lp import plan_throughput
    return plan_throughput(resolve_profile(profile, device=dims.device), num_layers=num_layers,
                           batch_size=dims.batch_size, seq_len=REPRESENTATIVE_SEQ_LEN,
                           hidden_size=dims.hidden_size, kv_hidden_size=dims.kv_hidden_size,
                           dtype=dims.dtype,
                           micro_batches=(None if micro_batches is None
                                          else min(micro_batches, dims.batch_size)),
                           gpu_budget_bytes=gpu_budget_bytes, ratio=ratio)


def budget_check(dims: GraphDims, num_layers: int, *, profile, gpu_budget_bytes: float | None):
    """A function (sizes, store) raising ValueError when the budget cannot hold the working set
    of these micro-batches at the store's capacity; None without a budget."""
    budget = gpu_budget_bytes
    if budget is None:
        return None
    passed: set = set()

    def check(sizes, store) -> None:
        if (tuple(sizes), store.max_seq_len) in passed:
            return
        from ..plan import cost_model as cm
        from ..plan.resolve import resolve_profile
        from ..plan.throughput_lp import ASSEMBLED, HIDDEN_COPIES, step_shape, working_set_bytes
        shape = step_shape(resolve_profile(profile, device=dims.device), num_layers=num_layers,
                           micro_batches=sizes, seq_len=store.max_seq_len,
                           hidden_size=dims.hidden_size, kv_hidden_size=dims.kv_hidden_size,
                           dtype=dims.dtype)
        need = working_set_bytes(shape, 0)
        if need > budget:
            p = shape.bytes_per_element
            kv = cm.kv_bytes_per_token(max(sizes), dims.kv_hidden_size, p) * (store.max_seq_len + 1)
            raise ValueError(
                f"kvpr: options['gpu_budget_bytes']={budget!r} is below the throughput working set "
                f"{int(need)} bytes for micro-batches {list(sizes)}: two layers' weights "
                f"{int(2 * shape.layer_weight_bytes)}, the batch's hidden states "
                f"{int(HIDDEN_COPIES * sum(sizes) * dims.hidden_size * p)}, two micro-batch K,V "
                f"slots and {ASSEMBLED} assembled K,V of {int(kv)} each ({store.max_seq_len + 1} "
                f"positions)")
        passed.add((tuple(sizes), store.max_seq_len))
    return check
