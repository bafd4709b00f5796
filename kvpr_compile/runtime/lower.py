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
- ``prefetch_next`` goes on CPU (nothing to prefetch) and is a direct call on CUDA;
- ``cpu_attend`` is a direct call (synchronous on CPU, in flight on CUDA until its wait).

Nodes this pass does not recognise keep their custom op (correct, only slower). The copy also
drops casts to the dtype a tensor already has (``x.to(torch.float32)`` on fp32, four per layer of
an HF Llama's RMSNorms): ``Tensor.to`` returns its input then, so one call per cast is saved.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..ops.nodes import (ASSEMBLE, CACHE_UPDATE, CPU_ATTEND, LOAD_KV, LOAD_TOKENS,
                         PREFETCH_NEXT, WAIT, LOAD_ROLES, args_of, role_of)
from ..ops.nodes import STORE_TOKENS as STORE
from ..ops.specs import split_specs
from . import cuda_runtime, direct

KVPR_OPS = {LOAD_TOKENS, LOAD_KV, WAIT, STORE, ASSEMBLE, CACHE_UPDATE, PREFETCH_NEXT, CPU_ATTEND}


def _device_of(node: fx.Node):
    """The compute device of a kvpr node: its device argument, or that of what it reads."""
    a = args_of(node)
    if node.target in (LOAD_TOKENS, LOAD_KV, PREFETCH_NEXT):
        return a.device
    if node.target is CPU_ATTEND:
        return a.q.meta["example_value"].device
    if node.target is WAIT:
        t = a.tensors[0]
        src = t.args[0] if t.op == "call_function" and t.target is operator.getitem else t
        if isinstance(src, fx.Node) and src.target in (LOAD_TOKENS, LOAD_KV):
            return _device_of(src)
        if isinstance(src, fx.Node) and src.target is CPU_ATTEND:
            return args_of(src).q.meta["example_value"].device
        return t.meta["example_value"].device
    k = a.k if node.target in (STORE, CACHE_UPDATE) else a.k_new
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


def _op_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target in KVPR_OPS]


def lower(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose kvpr steps call direct.py (see the module docstring)."""
    graph = _copy(gm)
    if not _op_nodes(graph):
        return gm
    steps = _Steps(graph)
    fused = steps.fuse_stores(_op_nodes(graph))
    left = _op_nodes(graph)
    on_stream = {n: _on_stream(n) for n in left}   # decided before any load is replaced
    folded = {n for n in left if n.target is WAIT and _folds_into(args_of(n).tensors, fused)}
    for node in left:
        _LOWER[node.target](steps, node, on_stream[node], node in folded)
    _drop_identity_casts(graph)
    graph.lint()
    return fx.GraphModule(gm, graph)


def _tensors(asm) -> tuple:
    """An assemble's K,V operands: recomputed, loaded, new."""
    return asm.k_rec, asm.v_rec, asm.k_load, asm.v_load, asm.k_new, asm.v_new


def _residency(asm) -> dict:
    """The assemble's resident prefix, sliding-window start and CPU range as keywords (none
    when the graph keeps none resident, reads the whole past and attends to nothing on the
    CPU, so such graphs lower as before)."""
    words = {"residency": asm.residency()} if asm.resident_num else {}
    if not (isinstance(asm.start, int) and asm.start == 0):
        words["start"] = asm.start
    if not (isinstance(asm.cpu_len, int) and asm.cpu_len == 0):
        words["cpu_len"] = asm.cpu_len
    return words


class _Steps:
    """The graph being lowered: one ``resolve`` per cache handle, and the node replacements."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.first_op = next(n for n in graph.nodes if n.op != "placeholder")
        self.stores: dict[fx.Node, fx.Node] = {}

    def store_of(self, handle: fx.Node) -> fx.Node:
        if handle not in self.stores:
            with self.graph.inserting_before(self.first_op):
                self.stores[handle] = self.graph.call_function(direct.resolve, (handle,))
        return self.stores[handle]

    def replace(self, node: fx.Node, target, args, kwargs=None) -> fx.Node:
        with self.graph.inserting_before(node):
            new = self.graph.call_function(target, tuple(args), kwargs or {})
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        return new

    def specs(self, node: fx.Node, shapes, ranks, codes):
        """The decoded record specs: now when their sizes are plain ints, else a graph call."""
        if all(isinstance(s, int) for s in shapes):
            return split_specs(shapes, ranks, codes)
        with self.graph.inserting_before(node):
            return self.graph.call_function(split_specs, (shapes, ranks, codes))

    def fuse_stores(self, nodes: list[fx.Node]) -> set[fx.Node]:
        """A layer's store and assemble as one call at the assemble, where only loads sit
        between them; returns the fused calls."""
        fused: set[fx.Node] = set()
        pending: dict[tuple, fx.Node] = {}   # (handle, layer) -> store_tokens not yet paired
        for node in nodes:
            if node.target is STORE:
                st = args_of(node)
                pending[(st.handle, st.layer)] = node
            elif node.target is ASSEMBLE:
                asm = args_of(node)
                store_node = pending.pop((asm.handle, asm.layer), None)
                if store_node is None:
                    continue
                st = args_of(store_node)
                if not (st.k is asm.k_new and st.v is asm.v_new) \
                        or not _only_loads_between(store_node, node):
                    continue   # lowered one by one
                args = (self.store_of(asm.handle), asm.layer, st.pos, st.inputs, st.tdims,
                        *_tensors(asm), direct.links_of(st.shared))
                if not _on_stream(node):
                    target = direct.cpu_store_assemble
                else:
                    target = direct.stream_store_assemble
                    args += _staged(asm.k_new, asm.v_new, st.inputs)
                fused.add(self.replace(node, target, args, _residency(asm)))
                self.graph.erase_node(store_node)
        return fused

    def load_tokens(self, node, on_stream: bool, folded: bool) -> None:
        a = args_of(node)
        specs = self.specs(node, a.shapes, a.ranks, a.dtypes)
        store = self.store_of(a.handle)
        start = () if isinstance(a.start, int) and a.start == 0 else (a.start,)
        if on_stream:
            self.replace(node, direct.stream_load_tokens,
                         (store, a.layer, a.end, specs, a.device, bool(a.owned), *start))
        else:
            self.replace(node, direct.cpu_load_tokens,
                         (store, a.layer, a.end, specs, a.device, *start))

    def load_kv(self, node, on_stream: bool, folded: bool) -> None:
        a = args_of(node)
        args = (self.store_of(a.handle), a.layer, a.start, a.end, a.batch, a.heads, a.head_dim,
                a.dtype, a.device)
        if on_stream:
            self.replace(node, direct.stream_load_kv, args + (bool(a.owned),))
        else:
            self.replace(node, direct.cpu_load_kv, args)

    def wait(self, node, on_stream: bool, folded: bool) -> None:
        if not on_stream or folded:   # CPU loads are synchronous; a folded wait is in its call
            self.graph.erase_node(node)
        else:
            self.replace(node, direct.stream_wait, (args_of(node).tensors,))

    def store_tokens(self, node, on_stream: bool, folded: bool) -> None:
        a = args_of(node)
        args = (self.store_of(a.handle), a.layer, a.pos, a.k, a.v, a.inputs, a.tdims,
                direct.links_of(a.shared))
        if on_stream:
            self.replace(node, direct.stream_store, args + _staged(a.k, a.v, a.inputs))
        else:
            self.replace(node, direct.cpu_store, args)

    def assemble(self, node, on_stream: bool, folded: bool) -> None:
        a = args_of(node)
        target = direct.stream_assemble if on_stream else direct.cpu_assemble
        self.replace(node, target, (self.store_of(a.handle), a.layer, *_tensors(a)),
                     _residency(a))

    def prefetch_next(self, node, on_stream: bool, folded: bool) -> None:
        if not on_stream:   # CPU loads are views: nothing to prefetch
            self.graph.erase_node(node)
            return
        a = args_of(node)
        specs = self.specs(node, a.shapes, a.ranks, a.dtypes)
        self.replace(node, direct.stream_prefetch_next,
                     (self.store_of(a.handle), a.layer, a.past, a.new, a.num, a.den, specs,
                      a.batch, a.heads, a.head_dim, a.dtype, a.device, a.residency(),
                      (a.cpu_num, a.cpu_den)))

    def cpu_attend(self, node, on_stream: bool, folded: bool) -> None:
        a = args_of(node)
        self.replace(node, direct.cpu_attend, (self.store_of(a.handle), *tuple(a)[1:]))

    def cache_update(self, node, on_stream: bool, folded: bool) -> None:
        a = args_of(node)
        target = direct.stream_cache_update if on_stream else direct.cpu_cache_update
        self.replace(node, target, (self.store_of(a.handle), a.k, a.v, a.layer, a.pos, a.start))


_LOWER = {LOAD_TOKENS: _Steps.load_tokens, LOAD_KV: _Steps.load_kv, WAIT: _Steps.wait,
          STORE: _Steps.store_tokens, ASSEMBLE: _Steps.assemble,
          PREFETCH_NEXT: _Steps.prefetch_next, CACHE_UPDATE: _Steps.cache_update,
          CPU_ATTEND: _Steps.cpu_attend}


def _drop_identity_casts(graph: fx.Graph) -> None:
    """``t.to(dtype)`` where ``t`` already has ``dtype`` is ``t`` itself: use ``t``."""
    for node in list(graph.nodes):
        if node.op != "call_method" or node.target != "to" or node.kwargs or len(node.args) != 2:
            continue
        src, dtype = node.args
        value = src.meta.get("example_value") if isinstance(src, fx.Node) else None
        if (isinstance(dtype, torch.dtype) and isinstance(value, torch.Tensor)
                and value.dtype == dtype):
            node.replace_all_uses_with(src)
            graph.erase_node(node)


def _only_loads_between(first: fx.Node, last: fx.Node) -> bool:
    """Whether every node strictly between ``first`` and ``last`` is a (hoisted) load."""
    node = first.next
    while node is not last:
        if role_of(node) not in LOAD_ROLES:
            return False
        node = node.next
    return True


def _staged(k_new, v_new, inputs) -> tuple:
    """(True,) when the graph writes a store source in place: the D2H copy must read copies."""
    return (True,) if any(_written_in_place(t) for t in (k_new, v_new, *inputs)) else ()


INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                     operator.setitem}


def _written_in_place(node) -> bool:
    """Whether the graph writes ``node``'s tensor in place (``x.add_(...)``, ``x += ...``,
    ``x[i] = ...``, a mutating op); views of it are not followed."""
    if not isinstance(node, fx.Node):
        return False
    for user in node.users:
        if not user.args or user.args[0] is not node:
            continue
        if (user.op == "call_method" and user.target.endswith("_")
                and not user.target.startswith("_")):
            return True
        if user.op == "call_function":
            schema = getattr(user.target, "_schema", None)
            if user.target in INPLACE_FUNCTIONS or (schema is not None and schema.is_mutable):
                return True
            if (getattr(user.target, "__name__", "").endswith("_")
                    and not user.target.__name__.startswith("_")):
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
