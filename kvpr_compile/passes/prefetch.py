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
"""
from __future__ import annotations

import torch
from torch import fx

LOAD_ROLES = ("split", "load_tokens", "load_kv")
ASSEMBLE = torch.ops.kvpr.assemble.default


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
