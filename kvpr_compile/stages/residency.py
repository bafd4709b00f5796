"""How much of each layer's past a latency-schedule graph keeps resident on the device: forced
by ``resident_ratio``, or what ``gpu_budget_bytes`` leaves after the working set.

The budget is device memory the step may use for the cache: the two load slots of K,V (sized,
as the runtime sizes them, for the cache's ``max_seq_len``), two X slots where the layer
recomputes, and one layer's assembled K,V (what attention reads); what is left holds resident
rows. Where the split is planned, the latency LP places them: it is solved at the cache's full
length under the budget and chooses r_i with l_i per layer (``planned_rule``; a resident token
of an early layer shortens the step more than one of a late layer, whose load hides under the
compute before it, and X slots compete with resident rows for the same bytes). Where the ratio
is forced or there is no link to plan for, the same number of tokens is kept in every layer
(``resident_rule``: each layer's token costs the same bytes and the same link time).

``"auto"`` (the default, ``None``, on CUDA) is the device's free memory at compile time (the
first compiled call) less ``AUTO_MARGIN``: the larger of ``AUTO_MARGIN_FRACTION`` of it and
``AUTO_MARGIN_MIN_BYTES``, for activations, logits and the allocator's rounding; a number
overrides it. On a CPU device nothing is resident unless a number
or ``resident_ratio`` asks for it.

The cache's capacity is read from the example call's cache (its store, through the handle); a
graph reused by a cache of another capacity keeps the tokens computed here, and
``budget_guard.py`` checks at the call that the larger working set still fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ops.nodes import args_of
from ..passes.graph_utils import example_value, hint
from ..runtime.handles import lookup
from .compilation import Compilation

AUTO_MARGIN_FRACTION = 0.10
AUTO_MARGIN_MIN_BYTES = 1 << 30
SLOTS = 2          # double-buffered load slots (runtime/slots.py)
ASSEMBLED = 1      # one layer's assembled K,V alive while attention reads it


def free_device_bytes(device: torch.device) -> int:
    """``torch.cuda.mem_get_info``'s free bytes of ``device`` (a seam for tests)."""
    return int(torch.cuda.mem_get_info(device)[0])


def auto_budget(device: torch.device) -> float | None:
    """The "auto" budget of ``device`` (module docstring); None on a CPU device."""
    if device.type != "cuda":
        return None
    free = free_device_bytes(device)
    if free <= 0:
        raise ValueError(f"kvpr: options['gpu_budget_bytes']='auto': {device} reports "
                         f"{free} bytes free; pass a number of bytes or resident_ratio=0")
    return max(0.0, free - max(AUTO_MARGIN_FRACTION * free, AUTO_MARGIN_MIN_BYTES))


def handle_index(c: Compilation, cache_node) -> int | None:
    """Which graph input is the cache's handle (None: it is not one)."""
    handle = args_of(cache_node).handle
    placeholders = [n for n in c.graph.nodes if n.op == "placeholder"]
    if handle in placeholders and placeholders.index(handle) < len(c.example_inputs):
        return placeholders.index(handle)
    return None


def store_of(c: Compilation, cache_node):
    """The example call's cache store, when its handle is a graph input."""
    index = handle_index(c, cache_node)
    if index is not None:
        value = c.example_inputs[index]
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            try:
                return lookup(value)
            except Exception:  # noqa: BLE001 - not a live cache's handle: no capacity known
                return None
    return None


def working_set(positions: int, batch: int, kv_hidden: int, hidden: int, element: int,
                recompute: bool) -> dict[str, int]:
    """The step's device bytes outside resident rows, by part."""
    kv = 2 * batch * kv_hidden * element * positions
    parts = {"K,V slots": SLOTS * kv, "assembled K,V": ASSEMBLED * kv}
    if recompute:
        parts["X slots"] = SLOTS * batch * hidden * element * positions
    return parts


@dataclass(frozen=True)
class BudgetContext:
    """What a budget is checked and split against: the resolved budget, the positions the
    cache holds (its ``max_seq_len``; the runtime sizes its slots for one more), the K,V bytes
    of one token of one layer and the step's working set outside resident rows, by part."""

    budget: float
    max_seq_len: int
    per_token: int
    parts: dict
    sizing: tuple = ()   # working_set's (batch, kv_hidden, hidden, element, recompute)
    handle_index: int | None = None   # the graph input that is the cache's handle

    @property
    def need(self) -> int:
        return sum(self.parts.values())


def budget_context(c: Compilation, recompute: bool) -> BudgetContext | None:
    """The graph's budget (``gpu_budget_bytes``, "auto" resolved) against its working set, with
    X slots when ``recompute``; None on a CPU device with no number given. ValueError, before
    anything is written, when the budget is below the working set."""
    budget = c.options.gpu_budget_bytes
    node, sl = next(iter(c.slices.items()))
    k = example_value(args_of(node).k)
    if budget is None or budget == "auto":
        budget = auto_budget(k.device)
    if budget is None:
        return None
    store = store_of(c, node)
    b, kv_heads, _, d = (hint(s) for s in k.shape)
    if store is not None:
        positions = store.max_seq_len
    else:
        from ..plan.cost_model import REPRESENTATIVE_SEQ_LEN
        positions = REPRESENTATIVE_SEQ_LEN
    sizing = (b, kv_heads * d, hint(example_value(sl.x).shape[-1]), k.element_size(), recompute)
    parts = working_set(positions + 1, *sizing)
    ctx = BudgetContext(budget, positions, 2 * b * kv_heads * d * k.element_size(), parts, sizing,
                        handle_index(c, node))
    c.latency_budget = ctx
    if budget < ctx.need:
        named = ", ".join(f"{name} {n}" for name, n in parts.items())
        raise ValueError(f"kvpr: options['gpu_budget_bytes']={budget!r} is below the latency "
                         f"working set of {ctx.need} bytes ({named}; batch {b}, "
                         f"{positions + 1} positions)")
    return ctx


def resident_rule(c: Compilation, layers: list[int]) -> dict:
    """layer -> (resident share, cap in tokens (-1: none), whether the ratio applies to the
    past not resident), {} for none: the same cap in every layer (what is left of the budget,
    split evenly). A budget alone keeps the whole past up to the cap, and the layer's ratio
    then recomputes that share of the rest. (A planned split takes the LP's per-layer caps
    instead: ``planned_rule``.)"""
    share = c.options.resident_ratio
    if share == 0.0:
        return {}
    ctx = budget_context(c, recompute=any(c.ratios[layer] > 0 for layer in layers))
    if ctx is None:   # CPU, nothing asked: only a forced share
        return {layer: (share, -1, False) for layer in layers} if share else {}
    positions = ctx.max_seq_len
    cap = min(int((ctx.budget - ctx.need) // (ctx.per_token * len(layers))), positions)
    if share is None:   # the budget decides: the whole past up to the cap
        return {layer: (1.0, cap, True) for layer in layers}
    return {layer: (share, min(cap, math.floor(share * positions)), False) for layer in layers}


def planned_rule(layers: list[int], plan) -> tuple[dict, dict]:
    """(layer -> ratio, layer -> residency rule) of a latency plan solved at the cache's full
    length under the budget: layer i keeps its past up to r_i tokens resident and recomputes
    l_i / (s - r_i) of the rest, so at the full length it does exactly what the LP chose."""
    s = plan.seq_len
    ratios, rules = {}, {}
    for layer, l, r in zip(layers, plan.recompute_tokens, plan.resident_tokens):
        ratios[layer] = l / (s - r) if s > r else 0.0
        rules[layer] = (1.0, r, True)
    return ratios, rules


def describe(rule: tuple, k_new) -> str:
    """The report's words for a layer's residency ``rule`` (share, cap, of_rest) at the batch
    and dtype of ``k_new`` (the graph's new K): what is resident and its device bytes."""
    share, cap, of_rest = rule
    b, kv_heads, _, d = (hint(s) for s in k_new.shape)
    per_token = 2 * b * kv_heads * d * k_new.element_size()
    which = "the past" if share == 1.0 else f"floor({share:g} * past)"
    if cap < 0:
        return f"resident: {which} on the device ({per_token} bytes per token)"
    rest = "; the ratio applies to the rest" if of_rest else ""
    return (f"resident: {which} up to {cap} tokens on the device ({cap * per_token} bytes)"
            f"{rest}")
