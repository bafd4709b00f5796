"""Lower a rewritten graph for execution: ``kvpr::`` op nodes become direct calls (direct.py).

``lower(gm)`` returns a new GraphModule (the rewritten ``gm`` itself, with its custom ops, stays
as it is: the report shows it, and inductor gets it under ``inner="inductor"``). In the copy:

- one ``resolve(handle)`` per cache at the top of the graph; every kvpr step takes the store;
- ``load_tokens`` gets its record specs decoded once, here (when their sizes are plain ints);
- a layer's ``store_tokens`` and ``assemble`` become one call, at the assemble's place (only
  other layers' loads sit between them, and those never read what the store writes);
- on CUDA the store's D2H copy reads runtime-owned copies of its sources when the graph writes one
  of them in place (``store_tokens_staged``); otherwise holding them is enough;
- on CPU every ``wait`` goes (loads are synchronous); on CUDA the wait for K,V[l:] folds into
  that call (K,V[l:] has no other reader), the wait for X stays where it is;
- ``prefetch_next`` goes on CPU (nothing to prefetch) and is a direct call on CUDA.

Nodes this pass does not recognise keep their custom op (correct, only slower). The copy also
drops casts to the dtype a tensor already has (``x.to(torch.float32)`` on fp32, four per layer of
an HF Llama's RMSNorms): ``Tensor.to`` returns its input then, so one call per cast is saved.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from . import cuda_runtime, direct
from .ops import _split_specs

kvpr = torch.ops.kvpr
LOAD_TOKENS, LOAD_KV, WAIT = kvpr.load_tokens.default, kvpr.load_kv.default, kvpr.wait.default
STORE, ASSEMBLE, CACHE_UPDATE = kvpr.store_tokens.default, kvpr.assemble.default, kvpr.cache_update.default
PREFETCH_NEXT = kvpr.prefetch_next.default
KVPR_OPS = {LOAD_TOKENS, LOAD_KV, WAIT, STORE, ASSEMBLE, CACHE_UPDATE, PREFETCH_NEXT}


def _device_of(node: fx.Node):
    """The compute device of a kvpr node: its device argument, or that of what it reads."""
    if node.target is LOAD_TOKENS:
        return node.args[6]
    if node.target is LOAD_KV:
        return node.args[8]
    if node.target is PREFETCH_NEXT:
        return node.args[13]
    if node.target is WAIT:
        t = node.args[0][0]
        src = t.args[0] if t.op == "call_function" and t.target is operator.getitem else t
        if isinstance(src, fx.Node) and src.target in (LOAD_TOKENS, LOAD_KV):
            return _device_of(src)
        return t.meta["example_value"].device
    k = node.args[3] if node.target is STORE else node.args[1] if node.target is CACHE_UPDATE \
        else node.args[6]
    return k.meta["example_value"].device


def _on_stream(node: fx.Node) -> bool:
    """Whether the node's device runs on the CUDA runtime (streams) rather than synchronously."""
    return cuda_runtime.handles(_device_of(node))


def _kv_load_of(node) -> fx.Node | None:
    """The load_kv node whose output ``node`` (a getitem) is, if it is one."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        if isinstance(src, fx.Node) and src.target is LOAD_KV:
            return src
    return None


def _copy(gm: fx.GraphModule) -> fx.Graph:
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return graph


def lower(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose kvpr steps call direct.py (see the module docstring)."""
    graph = _copy(gm)
    nodes = [n for n in graph.nodes if n.op == "call_function" and n.target in KVPR_OPS]
    if not nodes:
        return gm
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    stores: dict[fx.Node, fx.Node] = {}

    def store_of(handle: fx.Node) -> fx.Node:
        if handle not in stores:
            with graph.inserting_before(first_op):
                stores[handle] = graph.call_function(direct.resolve, (handle,))
        return stores[handle]

    def replace(node: fx.Node, target, args) -> fx.Node:
        with graph.inserting_before(node):
            new = graph.call_function(target, tuple(args))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return new

    # a layer's store and assemble: one call at the assemble, where only loads sit between them
    fused: set[fx.Node] = set()
    pending_store: dict[tuple, fx.Node] = {}   # (handle, layer) -> store_tokens not yet paired
    for node in nodes:
        if node.target is STORE:
            pending_store[(node.args[0], node.args[1])] = node
        elif node.target is ASSEMBLE:
            handle, layer, *tensors = node.args
            store_node = pending_store.pop((handle, layer), None)
            if store_node is None or not (store_node.args[3] is tensors[4] and store_node.args[4] is tensors[5]) \
                    or not _only_loads_between(store_node, node):
                continue   # lowered one by one below
            _, _, pos, _, _, inputs, tdims, *shared = store_node.args
            args = (store_of(handle), layer, pos, inputs, tdims, *tensors, _links(shared))
            if not _on_stream(node):
                target = direct.cpu_store_assemble
            else:
                target = direct.stream_store_assemble
                args += _staged(tensors[4], tensors[5], inputs)
            fused.add(replace(node, target, args))
            graph.erase_node(store_node)
    nodes = [n for n in graph.nodes if n.op == "call_function" and n.target in KVPR_OPS]   # left
    on_stream = {n: _on_stream(n) for n in nodes}   # decided before any load is replaced
    folded = {n for n in nodes if n.target is WAIT and _folds_into(n.args[0], fused)}
    for node in nodes:
        if node.target is LOAD_TOKENS:
            handle, layer, end, shapes, ranks, codes, device, *owned = node.args
            specs = (_split_specs(shapes, ranks, codes) if all(isinstance(s, int) for s in shapes)
                     else None)
            if specs is None:
                with graph.inserting_before(node):
                    specs = graph.call_function(_split_specs, (shapes, ranks, codes))
            if on_stream[node]:
                replace(node, direct.stream_load_tokens,
                        (store_of(handle), layer, end, specs, device, bool(owned and owned[0])))
            else:
                replace(node, direct.cpu_load_tokens, (store_of(handle), layer, end, specs, device))
        elif node.target is LOAD_KV:
            handle, layer, start, end, b, h, d, dtype, device, *owned = node.args
            if on_stream[node]:
                replace(node, direct.stream_load_kv, (store_of(handle), layer, start, end, b, h, d,
                                                      dtype, device, bool(owned and owned[0])))
            else:
                replace(node, direct.cpu_load_kv, (store_of(handle), layer, start, end, b, h, d,
                                                   dtype, device))
        elif node.target is WAIT:
            tensors = node.args[0]
            if not on_stream[node] or node in folded:
                graph.erase_node(node)
            else:
                replace(node, direct.stream_wait, (tensors,))
        elif node.target is STORE:
            handle, layer, pos, k_new, v_new, inputs, tdims, *shared = node.args
            args = (store_of(handle), layer, pos, k_new, v_new, inputs, tdims, _links(shared))
            if on_stream[node]:
                replace(node, direct.stream_store, args + _staged(k_new, v_new, inputs))
            else:
                replace(node, direct.cpu_store, args)
        elif node.target is ASSEMBLE:
            handle, layer, *tensors = node.args
            target = direct.stream_assemble if on_stream[node] else direct.cpu_assemble
            replace(node, target, (store_of(handle), layer, *tensors))
        elif node.target is PREFETCH_NEXT:
            if not on_stream[node]:   # CPU loads are views: nothing to prefetch
                graph.erase_node(node)
                continue
            handle, layer, past, new, num, den, shapes, ranks, codes, *rest = node.args
            specs = (_split_specs(shapes, ranks, codes) if all(isinstance(s, int) for s in shapes)
                     else None)
            if specs is None:
                with graph.inserting_before(node):
                    specs = graph.call_function(_split_specs, (shapes, ranks, codes))
            replace(node, direct.stream_prefetch_next,
                    (store_of(handle), layer, past, new, num, den, specs, *rest))
        elif node.target is CACHE_UPDATE:
            handle, k, v, layer, pos = node.args
            target = direct.stream_cache_update if on_stream[node] else direct.cpu_cache_update
            replace(node, target, (store_of(handle), k, v, layer, pos))
    _drop_identity_casts(graph)
    graph.lint()
    return fx.GraphModule(gm, graph)


def _drop_identity_casts(graph: fx.Graph) -> None:
    """``t.to(dtype)`` where ``t`` already has ``dtype`` is ``t`` itself: use ``t``."""
    for node in list(graph.nodes):
        if node.op != "call_method" or node.target != "to" or node.kwargs or len(node.args) != 2:
            continue
        src, dtype = node.args
        value = src.meta.get("example_value") if isinstance(src, fx.Node) else None
        if isinstance(dtype, torch.dtype) and isinstance(value, torch.Tensor) and value.dtype == dtype:
            node.replace_all_uses_with(src)
            graph.erase_node(node)


def _links(shared: list) -> tuple:
    """The store_tokens node's optional ``shared`` argument as the store's ``links``."""
    return direct.links_of(shared[0] if shared else None)


def _only_loads_between(first: fx.Node, last: fx.Node) -> bool:
    """Whether every node strictly between ``first`` and ``last`` is a (hoisted) load."""
    node = first.next
    while node is not last:
        role = (node.meta.get("custom") or {}).get("kvpr_role")
        if role not in ("split", "load_tokens", "load_kv"):
            return False
        node = node.next
    return True


def _staged(k_new, v_new, inputs) -> tuple:
    """(True,) when the graph writes a store source in place: the D2H copy must read copies."""
    return (True,) if any(_written_in_place(t) for t in (k_new, v_new, *inputs)) else ()


INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _written_in_place(node) -> bool:
    """Whether the graph writes ``node``'s tensor in place (``x.add_(...)``, ``x += ...``,
    ``x[i] = ...``, a mutating op); views of it are not followed."""
    if not isinstance(node, fx.Node):
        return False
    for user in node.users:
        if not user.args or user.args[0] is not node:
            continue
        if user.op == "call_method" and user.target.endswith("_") and not user.target.startswith("_"):
            return True
        if user.op == "call_function":
            schema = getattr(user.target, "_schema", None)
            if user.target in INPLACE_FUNCTIONS or (schema is not None and schema.is_mutable):
                return True
            if getattr(user.target, "__name__", "").endswith("_") and not user.target.__name__.startswith("_"):
                return True
    return False


def _folds_into(tensors, fused: set) -> bool:
    """A wait on exactly K,V[l:] of one load whose only other reader is a fused store+assemble
    call, which waits for them itself."""
    loads = {_kv_load_of(t) for t in tensors}
    if len(tensors) != 2 or len(loads) != 1 or None in loads:
        return False
    readers = {u for t in tensors for u in t.users if u.target is not WAIT}
    return len(readers) == 1 and next(iter(readers)) in fused
