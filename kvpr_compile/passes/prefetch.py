"""Layer-ahead prefetch placement: issue a layer's loads while an earlier layer computes.

``rewrite.py`` inserts each layer's loads right before that layer's own use, so the copy could
only start once the layer is reached. ``hoist_loads`` moves the load nodes of the site ``distance``
sites later in graph order (its ``split_len``, ``kvpr.load_tokens``, ``kvpr.load_kv`` and their
getitems: ``meta["custom"]["kvpr_role"]`` in ``LOAD_ROLES``) to just before this site's
``kvpr.assemble``. The ``kvpr.wait`` of each layer stays where it is, right before the first use.

The runtime needs ``distance + 1`` device slots (slots.py): with the default distance 1, layer
i+1's loads fill the slot that layer i-1's assemble freed, while layer i reads the other one.

Loads take only the cache handle, the layer index, ``past`` / ``l`` and constants, so they can
move; a load group whose inputs are not all defined before the new position stays put.

``prefetch_next_call`` does the same across calls: the first site's loads of the next call
(its past is this call's past plus this call's new tokens) are asked for right after the last
site's assemble, by one ``kvpr.prefetch_next`` with the first site's own load arguments; the
runtime decides whether the next call uses them (runtime/next_call.py). Latency schedule only
(the column runner issues its loads itself), not for loads into owned tensors (inductor). The
window of a sliding first layer is the store's (``windows``, from the cache): the runtime starts
the next call's loads at that call's window, whether or not this call's past reached it. A
first site with a resident prefix passes its rule (the assemble's, and ``kvpr_ratio_of_rest``
from the loads): the next call's loads start after that call's resident prefix. A first site
with a CPU share passes it (from its K,V load's end, a ``cpu_start`` of the past): the next
call's K,V load stops where that call's CPU range starts.
"""
from __future__ import annotations

from torch import fx

from ..ops.nodes import ASSEMBLE, LOAD_KV, LOAD_ROLES, LOAD_TOKENS, PREFETCH_NEXT, args_of
from ..ops.split import cpu_start, ratio_fraction, split_len
from .graph_utils import example_value, size_arg


def _custom(node: fx.Node) -> dict:
    return node.meta.get("custom") or {}


def _sites(graph: fx.Graph) -> list[tuple[fx.Node, list[fx.Node]]]:
    """(assemble node, load nodes in graph order) per rewritten site, in graph order."""
    loads: dict[int, list[fx.Node]] = {}
    assembles: dict[int, list[fx.Node]] = {}
    for node in graph.nodes:
        c = _custom(node)
        if "kvpr_layer" not in c:
            continue
        layer = c["kvpr_layer"]
        if c.get("kvpr_role") in LOAD_ROLES:
            loads.setdefault(layer, []).append(node)
        elif node.target is ASSEMBLE:
            assembles.setdefault(layer, []).append(node)
    sites = []
    for layer, nodes in assembles.items():
        if len(nodes) != 1:   # the same layer read twice in one graph: ambiguous, leave it
            continue
        sites.append((nodes[0], loads.get(layer, [])))
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(sites, key=lambda s: order[s[0]])


def hoist_loads(graph: fx.Graph, distance: int = 1) -> int:
    """Move each site's loads ``distance`` sites earlier (before that site's assemble).

    Returns how many sites' loads were moved. Idempotent; leaves the graph linted."""
    if distance < 1:
        return 0
    sites = _sites(graph)
    # Positions are numbered once (renumbering per site made this quadratic in layers); a moved
    # group takes positions in (anchor - 1, anchor), which keeps every comparison below exact:
    # the node before the anchor has a position <= anchor - 1.
    order: dict[fx.Node, float] = {n: i for i, n in enumerate(graph.nodes)}
    moved = 0
    for (anchor, _), (_, group) in zip(sites, sites[distance:]):
        if not group:
            continue
        members = set(group)
        inputs = {i for n in group for i in n.all_input_nodes if i not in members}
        if any(order[i] >= order[anchor] for i in inputs):
            continue   # something a load needs is computed later: leave the group where it is
        if all(order[n] < order[anchor] for n in group):
            continue   # already issued early enough
        for k, node in enumerate(group, 1):
            anchor.prepend(node)
            order[node] = order[anchor] - 1 + k / (len(group) + 1)
        moved += 1
    graph.lint()
    return moved


def _cpu_rule(kv_end, assemble, share: float) -> tuple:
    """(the site's past, (num, den) of its CPU share) from its K,V load's end: a ``cpu_start``
    node (past, num, den, taken, first) on a symbolic past, else the ints end and the assemble's
    ``cpu_len``; (None, ()) where neither is there. (On a sliding layer the runtime finds the
    window's first position itself.)"""
    if isinstance(kv_end, fx.Node) and kv_end.target is cpu_start:
        return kv_end.args[0], (kv_end.args[1], kv_end.args[2])
    if isinstance(kv_end, int) and isinstance(assemble.cpu_len, int):
        frac = ratio_fraction(share)
        return kv_end + assemble.cpu_len, (frac.numerator, frac.denominator)
    return None, ()


def prefetch_next_call(graph: fx.Graph) -> bool:
    """Ask for the first site's loads of the next call after the last site's assemble (see the
    module docstring). Returns whether the step was added; idempotent; leaves the graph linted."""
    sites = _sites(graph)
    if not sites or any(n.target is PREFETCH_NEXT for n in graph.nodes):
        return False
    first, group = sites[0]
    kv = next((n for n in group if n.target is LOAD_KV), None)
    tokens = next((n for n in group if n.target is LOAD_TOKENS), None)
    load = None if kv is None else args_of(kv)
    if load is None or load.owned:   # owned loads: inductor runs the graph
        return False
    handle, layer, l, past = load.handle, load.layer, load.start, load.end
    resident = args_of(first)
    cpu = ()
    if _custom(kv).get("kvpr_cpu"):   # the loads stop where the CPU's range starts
        past, cpu = _cpu_rule(load.end, resident, _custom(kv)["kvpr_cpu"])
        if past is None:
            return False
    residency = ((resident.resident_num, resident.resident_den, resident.resident_cap,
                  bool(_custom(kv).get("kvpr_ratio_of_rest")))
                 if resident.resident_num or cpu else ())   # num 0: nothing resident
    if tokens is None:
        num, den, specs = 0, 1, ([], [], [])
    else:
        if isinstance(l, fx.Node) and l.target is split_len and not resident.resident_num:
            num, den = l.args[1], l.args[2]
        else:   # a static past: l is an int, the ratio is the site's
            frac = ratio_fraction(_custom(kv)["kvpr_ratio"])
            num, den = frac.numerator, frac.denominator
        token_load = args_of(tokens)
        specs = token_load.shapes, token_load.ranks, token_load.dtypes
    k_new = args_of(first).k_new
    with graph.inserting_before(sites[-1][0].next):
        new = size_arg(graph, example_value(k_new).shape[2], k_new, 2)
        node = graph.call_function(PREFETCH_NEXT, (handle, layer, past, new, num, den, *specs,
                                                   load.batch, load.heads, load.head_dim,
                                                   load.dtype, load.device, *residency,
                                                   *cpu))
    node.meta["custom"] = {**_custom(kv), "kvpr_role": "prefetch_next"}
    graph.lint()
    return True
