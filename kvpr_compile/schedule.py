"""The backend's ``schedule`` option: ``"latency"`` (default: the rewritten graph runs as one
step) or ``"throughput"`` (the batch as micro-batches in column order, runtime/column_runner.py).

Throughput options, checked by ``parse`` (ValueError naming the value):
- ``micro_batches``: an int >= 1, or None (default): the throughput planner's split for the
  graph's example batch (plan/throughput_lp.py); larger than a call's batch: ValueError naming
  both, before anything is written (a planned count is capped at the batch instead);
- ``gpu_budget_bytes``: device memory the step may use; a budget below the working set (two
  layers' weights, the batch's hidden states, two micro-batch K,V slots) is a ValueError naming
  the numbers, at planning or before the first step writes anything.
Without a forced ``ratio`` the per-layer ratios come from the throughput planner too.
"""
from __future__ import annotations

SCHEDULES = ("latency", "throughput")
OPTIONS = {"schedule", "micro_batches", "gpu_budget_bytes"}
REPRESENTATIVE_SEQ = 4096   # the length the planner plans at (as the latency scheduler)


def parse(options: dict) -> None:
    schedule = options.setdefault("schedule", "latency")
    if schedule not in SCHEDULES:
        raise ValueError(f"kvpr: options['schedule'] must be one of {SCHEDULES}, got {schedule!r}")
    m = options.setdefault("micro_batches", None)
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"kvpr: options['micro_batches'] must be an int >= 1 or None, got {m!r}")
    budget = options.setdefault("gpu_budget_bytes", None)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not budget > 0):
        raise ValueError(f"kvpr: options['gpu_budget_bytes'] must be a positive number, got {budget!r}")
    if schedule == "latency":
        for name in ("micro_batches", "gpu_budget_bytes"):
            if options[name] is not None:
                raise ValueError(f"kvpr: options['{name}'] applies to schedule='throughput' only "
                                 f"(schedule is {schedule!r})")


def dims(slices) -> dict:
    """The planner's dims from the graph's first rewritten site (example sizes, no guards)."""
    from .passes.graph_utils import example_value, hint
    cache_node, sl = next(iter(slices.items()))
    k_new, x = example_value(cache_node.args[1]), example_value(sl.x)
    b, hkv, _, d = k_new.shape
    return dict(batch_size=hint(b), hidden_size=hint(x.shape[-1]), kv_hidden_size=hint(hkv) * hint(d),
                dtype=x.dtype, device=x.device)


def plan(options: dict, slices, num_layers: int):
    """The throughput plan for the graph's example batch (ratios forced or planned)."""
    from .plan.resolve import resolve_profile
    from .plan.throughput_lp import plan_throughput
    d = dims(slices)
    profile = resolve_profile(options.get("profile"), device=d["device"])
    return plan_throughput(profile, num_layers=num_layers, batch_size=d["batch_size"],
                           seq_len=REPRESENTATIVE_SEQ, hidden_size=d["hidden_size"],
                           kv_hidden_size=d["kv_hidden_size"], dtype=d["dtype"],
                           micro_batches=(None if options["micro_batches"] is None
                                          else min(options["micro_batches"], d["batch_size"])),
                           gpu_budget_bytes=options["gpu_budget_bytes"], ratio=options.get("ratio"))


def budget_check(options: dict, slices, num_layers: int):
    """A function (sizes, store) raising ValueError when the budget cannot hold the working set
    of these micro-batches at the store's capacity; None without a budget. Called before the
    rewrite (it reads the slices' example values)."""
    budget = options["gpu_budget_bytes"]
    if budget is None:
        return None
    d = dims(slices)
    passed: set = set()

    def check(sizes, store) -> None:
        if (tuple(sizes), store.max_seq_len) in passed:
            return
        from .plan import cost_model as cm
        from .plan.resolve import resolve_profile
        from .plan.throughput_lp import ASSEMBLED, HIDDEN_COPIES, step_shape, working_set_bytes
        shape = step_shape(resolve_profile(options.get("profile"), device=d["device"]),
                           num_layers=num_layers, micro_batches=sizes, seq_len=store.max_seq_len,
                           hidden_size=d["hidden_size"], kv_hidden_size=d["kv_hidden_size"],
                           dtype=d["dtype"])
        need = working_set_bytes(shape, 0)
        if need > budget:
            p = shape.bytes_per_element
            kv = cm.kv_bytes_per_token(max(sizes), d["kv_hidden_size"], p) * (store.max_seq_len + 1)
            raise ValueError(
                f"kvpr: options['gpu_budget_bytes']={budget!r} is below the throughput working set "
                f"{int(need)} bytes for micro-batches {list(sizes)}: two layers' weights "
                f"{int(2 * shape.layer_weight_bytes)}, the batch's hidden states "
                f"{int(HIDDEN_COPIES * sum(sizes) * d['hidden_size'] * p)}, two micro-batch K,V "
                f"slots and {ASSEMBLED} assembled K,V of {int(kv)} each ({store.max_seq_len + 1} "
                f"positions)")
        passed.add((tuple(sizes), store.max_seq_len))
    return check
