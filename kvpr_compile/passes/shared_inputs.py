"""Side inputs that several layers of one graph compute alike, so that the store keeps them once.

RoPE's cos/sin are made once per forward and fed to every layer (each layer may still apply its
own ``unsqueeze``): storing them per layer repeats the same rows L times. Two side inputs are the
same here when the graph computes them with the same ops from the same nodes, with the same token
dim, shape and dtype: a structural number per node (``structure``), given in one pass over the
graph in order. Placeholders, attributes, modules, impure nodes, nodes written in place and nodes
computed from no node at all (``arange``, ``randn``: they could differ call by call) are each
their own structure, so two layers share only what provably holds the same values.

``shared_links`` picks, for each group, the first storing layer in graph order as the owner; the
other layers of the group link to its record: ``(index, owner, owner_index)`` (see store.py
``links``). Layers whose side inputs differ (another rope scaling, partial rotary) keep their own.
"""
from __future__ import annotations

import operator

from torch import fx

from .graph_utils import example_value

_IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _written_in_place(node: fx.Node) -> bool:
    for user in node.users:
        if not user.args or user.args[0] is not node:
            continue
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        schema = getattr(user.target, "_schema", None)
        if (isinstance(name, str) and name.endswith("_") and not name.startswith("_")) \
                or user.target in _IN_PLACE or (schema is not None and schema.is_mutable):
            return True
    return False


def structure(graph: fx.Graph) -> dict[fx.Node, int]:
    """A number per node: equal numbers mean the same computation of the same inputs."""
    ids: dict[fx.Node, int] = {}
    interned: dict[tuple, int] = {}

    def arg(a):
        if isinstance(a, fx.Node):
            return ("n", ids[a])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(arg(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple(sorted((k, arg(v)) for k, v in a.items())))
        if isinstance(a, slice):
            return ("slice", arg(a.start), arg(a.stop), arg(a.step))
        try:
            hash(a)
        except TypeError:
            return ("id", id(a))
        return (type(a).__name__, a)

    for node in graph.nodes:
        own = (node.op not in ("call_function", "call_method") or not node.all_input_nodes
               or node.is_impure() or _written_in_place(node))
        key = ("own", len(ids)) if own else (node.op, node.target, arg(node.args), arg(node.kwargs))
        ids[node] = interned.setdefault(key, len(interned))
    return ids


def _record(node: fx.Node) -> tuple:
    value = example_value(node)
    return tuple(str(size) for size in value.shape), value.dtype   # sizes may be symbols


def shared_links(graph: fx.Graph, storing: list[tuple[int, object]]) -> dict[int, tuple]:
    """For ``storing`` = [(layer, RecomputeSlice)] in graph order (the layers that store
    recompute inputs in this graph): ``{layer: ((index, owner, owner_index), ...)}`` for the
    layers that read some side input from an earlier layer's record."""
    if len(storing) < 2:
        return {}
    ids = structure(graph)
    owners: dict[tuple, tuple[int, int]] = {}
    links: dict[int, tuple] = {}
    for layer, sl in storing:
        mine = []
        for index in range(1, len(sl.token_inputs)):   # index 0 is X: never shared
            node = sl.token_inputs[index]
            key = (ids[node], sl.tdims[index], _record(node))
            owner = owners.setdefault(key, (layer, index))
            if owner[0] != layer:
                mine.append((index, *owner))
        if mine:
            links[layer] = tuple(mine)
    return links
