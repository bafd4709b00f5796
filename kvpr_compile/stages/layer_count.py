"""Stage ``count_layers``: a graph that holds only some of its cache's layers is reported, with a
warning once. Dynamo splits a decoder into several graphs at a graph break (e.g. a custom
attention passing ``is_causal=(past == 0)``, a SymBool under dynamic shapes); each graph then
hoists loads only among its own layers, so the layers after a break get no layer-ahead
prefetch: exact, but slow without a word.

The cache's layer count is read at compile time from the store behind the graph's example
handle (handles.py), so the compiled step pays nothing for the check."""
from __future__ import annotations

from torch import fx

from .. import dynamo_watch
from .. import report as rep
from ..ops.nodes import args_of
from ..runtime import handles
from .compilation import Compilation


def count_layers(c: Compilation) -> None:
    if not c.scan.sites:
        return
    store = example_store(c.graph, args_of(c.scan.sites[0].cache_node).handle, c.example_inputs)
    layers = sorted({site.layer for site in c.scan.sites})
    if store is None or len(layers) >= store.num_layers:
        return
    rep.graph_holds_some_layers(c.report, layers, store.num_layers,
                                dynamo_watch.recent_graph_break())


def example_store(graph: fx.Graph, handle, example_inputs):
    """The store behind the example value of ``handle`` (a graph input), or None when the
    example is not a live store's handle (e.g. a fake tensor)."""
    if not isinstance(handle, fx.Node) or handle.op != "placeholder":
        return None
    index = [n for n in graph.nodes if n.op == "placeholder"].index(handle)
    if index >= len(example_inputs):
        return None
    example = example_inputs[index]
    store = handles.by_handle_id(id(example))
    if store is not None and store.handle is example:
        return store
    try:   # a copy of the handle: its uid names the store
        return handles.lookup(example, whole=False)
    except Exception:  # noqa: BLE001 - a fake or symbolic example: nothing to read
        return None
