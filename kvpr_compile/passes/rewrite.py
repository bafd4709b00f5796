"""Rewrite one cache read into split load + recompute.

Before:  k_all, v_all = kvpr.cache_update(handle, k_new, v_new, layer, past)
After:   l            = floor(ratio * past)                       (SymInt arithmetic)
         x, sides     = kvpr.load_tokens(handle, layer, l, specs)   (X[:l] and side inputs[:l])
         k_ld, v_ld   = kvpr.load_kv(handle, layer, l, past, shape) (K,V[l:past])
         kvpr.wait([x, sides])
         k_rc, v_rc   = <slice batched over l tokens>(x, sides, consts) (K,V[:l], inlined)
         kvpr.wait([k_ld, v_ld])
         kvpr.store_tokens(handle, layer, past, k_new, v_new, [X, sides], tdims[, shared])
         k_all, v_all = kvpr.assemble(handle, layer, k_rc, v_rc, k_ld, v_ld, k_new, v_new)

With a resident share (``resident`` > 0) the order of the past stays position order: resident
[0, r), recomputed [r, r + l), loaded [r + l, past), with r = min(floor(resident * past), cap);
``load_tokens`` then reads records [r, r + l) (``start`` = r, so RoPE's stored cos/sin are those
positions'), ``load_kv`` starts at r + l and ``assemble`` takes r and the capacity rule (it reads
[0, r) from the device rows, runtime/resident.py). Nodes then carry ``kvpr_resident`` too, and
``kvpr_ratio_of_rest`` where l is a share of past - r (the cross-call prefetch reads it).

A sliding-window layer's read (``cache_update``'s ``start`` > 0: K,V ``[start, past + n)``) is
split the same way over its window alone: recomputed [start, start + l), loaded
[start + l, past), with l = floor(ratio * (past - start)); ``load_tokens`` and ``assemble`` take
``start``, and nothing of the window is kept resident (``resident`` does not apply). Nodes then
carry ``kvpr_window`` too.

With a CPU share (``cpu_split``, passes/cpu_attention.py) the loads stop at start = past - c,
the assemble leaves [start, past) out (``cpu_len``) and the attention is split: the CPU attends
to that range in the store, merged exactly with the device's part. Nodes then carry
``kvpr_cpu``.

Side inputs an earlier layer of the graph computes alike (RoPE cos/sin) are stored by that layer
only; ``shared`` names them (passes/shared_inputs.py) and the load reads the owner's record.
Graphs that add several tokens per call (chunked prefill, speculative verification) recompute
the past the same way, with the slice specialised to one token (one_token.py); where that is not
possible (``sl.module`` is None), and on an empty past, they store X and load the whole past.
Layers planned at ratio 0 (e.g. grouped-query attention, where X is not smaller than K+V) store
no X at all: no D2H traffic and no CPU memory for it.
Loads take shapes, dtypes and the device as arguments (not tensors of the layer), so a placement
pass can hoist them above earlier layers. Every inserted node carries
``meta["custom"] = {"kvpr_ratio": r, "kvpr_layer": i, "kvpr_role": ...}``.
Precondition: ``check_rewritable(cache_node)`` passed (the backend checks it before extracting).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..ops.errors import Unsupported
from ..ops.nodes import args_of
from ..ops.specs import record_specs
from ..ops.split import empty_past, ratio_fraction, resident_len, split_len
from . import cpu_attention
from .graph_utils import example_value, size_arg
from .one_token import record_shape
from .slices import RecomputeSlice

ops = torch.ops.kvpr


def check_rewritable(cache_node: fx.Node) -> None:
    for user in cache_node.users:
        if not (user.op == "call_function" and user.target is operator.getitem
                and user.args[1] in (0, 1)):
            raise Unsupported(f"cache read result used by {user.op} {user.target} ({user.name}); "
                              "expected tuple unpacking")


def _add(call, r, l):
    """r + l, as an int where both are, else a graph node (role ``split``: loads move with it)."""
    if isinstance(r, int) and r == 0:
        return l
    if isinstance(r, int) and isinstance(l, int):
        return r + l
    return call(operator.add, (r, l), "split")


def _window_length(call, past, start):
    """past - start: an int where both are, or where their example values' difference is one
    (a window past its first ``w`` tokens: ``past - (past - w + 1)`` is ``w - 1``); else a graph
    node (role ``split``)."""
    if isinstance(past, int) and isinstance(start, int):
        return past - start
    values = [example_value(v) if isinstance(v, fx.Node) else v for v in (past, start)]
    if all(isinstance(v, (int, torch.SymInt)) for v in values):
        diff = values[0] - values[1]
        known = diff if isinstance(diff, int) else diff.node.maybe_as_int()
        if known is not None:
            return int(known)
    return call(operator.sub, (past, start), "split")


def _annotation(ratio: float, layer: int, role: str) -> dict:
    return {"kvpr_ratio": ratio, "kvpr_layer": layer, "kvpr_role": role}


def _inline(graph: fx.Graph, module: fx.GraphModule, inputs: list, ratio: float, layer: int):
    """Copy the batched recompute graph in at the insertion point; returns its (K, V) outputs."""
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    val_map: dict = dict(zip(placeholders, inputs))
    out = graph.graph_copy(module.graph, val_map)
    for old, new in val_map.items():
        if old.op != "placeholder" and isinstance(new, fx.Node):
            new.meta["custom"] = _annotation(ratio, layer, "recompute")
    return out


def _assemble_tail(keep: bool, windowed: bool, r, rule: tuple, start, cpu_len: list) -> list:
    """The assemble's optional arguments, as far as they are needed: (resident, num, den, cap)
    with a resident prefix, a window or a CPU share, then the window's ``start``, then
    ``cpu_len``."""
    if not (keep or windowed or cpu_len):
        return []
    out = [r if keep else 0, *rule]
    if windowed or cpu_len:
        out.append(start if windowed else 0)
    return out + cpu_len


class _Emitter:
    """Inserts one site's nodes, each annotated with the layer's ratio, role and shares."""

    def __init__(self, graph: fx.Graph, layer: int, effective: float, resident, ratio_of_rest,
                 windowed: bool, cpu_frac):
        self.graph, self.layer, self.effective = graph, layer, effective
        self.resident, self.ratio_of_rest = resident, ratio_of_rest
        self.windowed, self.cpu_frac = windowed, cpu_frac

    def annotate(self, node: fx.Node, role: str) -> None:
        node.meta["custom"] = _annotation(self.effective, self.layer, role)
        if self.resident is not None:
            node.meta["custom"]["kvpr_resident"] = float(self.resident)
            if self.ratio_of_rest:
                node.meta["custom"]["kvpr_ratio_of_rest"] = True
        if self.windowed:
            node.meta["custom"]["kvpr_window"] = True
        if self.cpu_frac is not None:
            node.meta["custom"]["kvpr_cpu"] = float(self.cpu_frac)

    def call(self, target, args, role: str) -> fx.Node:
        node = self.graph.call_function(target, args)
        self.annotate(node, role)
        return node

    def items(self, node: fx.Node, count: int, role: str) -> list:
        return [self.call(operator.getitem, (node, i), role) for i in range(count)]


def _resident_prefix(call, keep: bool, rfrac, resident_cap: int, past):
    """(capacity rule (num, den, cap), r): the resident prefix [0, r) of the past."""
    if not keep:
        return (0, 1, -1), 0
    rule = (rfrac.numerator, rfrac.denominator, resident_cap)
    r = resident_len(past, *rule) if isinstance(past, int) else \
        call(resident_len, (past, *rule), "split")
    return rule, r


def _recompute_len(call, frac, past, start, r, windowed: bool, of_rest: bool):
    """l: the share ``frac`` of the window (past - start), of the past not resident (past - r,
    a budget's share) or of the whole past."""
    rest = past
    if windowed:
        rest = _window_length(call, past, start)
    elif of_rest:
        rest = past - r if isinstance(past, int) and isinstance(r, int) else \
            call(operator.sub, (past, r), "split")
    return split_len(rest, frac.numerator, frac.denominator) if isinstance(rest, int) else \
        call(split_len, (rest, frac.numerator, frac.denominator), "split")


def _record_shapes(graph: fx.Graph, sl: RecomputeSlice, is_complex: list) -> list:
    """Each stored per-token input's record shape, as ints or size nodes (a complex input
    stored as its real view: one more trailing dim of 2)."""
    return [size_arg(graph, size, t, i) if i >= 0 else 2
            for t, c, d in zip(sl.token_inputs, is_complex, sl.tdims)
            for i, size in [*enumerate(record_shape(example_value(t), d)),
                            *([(-1, 2)] if c else [])]]


def _stored_inputs(call, sl: RecomputeSlice, links: tuple, is_complex: list, keep_x: bool):
    """``store_tokens``' per-token arguments: the inputs this layer stores (a complex one as
    its real view), their token dims, and the linked nodes an earlier layer stores for it (only
    where there are some). A layer planned at ratio 0 never reads X: nothing is stored."""
    if not keep_x:
        return [], []
    linked = {index for index, _, _ in links}
    own = [i for i in range(len(sl.token_inputs)) if i not in linked]
    stored = [call(torch.view_as_real, (sl.token_inputs[i],), "store") if is_complex[i]
              else sl.token_inputs[i] for i in own]
    shared = [n for link in links for n in link] if linked else []
    return [stored, [sl.tdims[i] for i in own], *([shared] if shared else [])]


def rewrite_site(graph: fx.Graph, cache_node: fx.Node, sl: RecomputeSlice, ratio: float,
                 owned_loads: bool = False, links: tuple = (), resident: float = 0.0,
                 resident_cap: int = -1, ratio_of_rest: bool = False,
                 cpu_split: cpu_attention.CpuSplit | None = None) -> float:
    """Rewrite in place; returns the ratio that applies in this graph (0 where nothing is
    recomputed). ``links``: side inputs an earlier layer stores for this one
    (passes/shared_inputs.py): not stored here, loaded from the owner's record. ``resident``:
    the fraction of the past kept on the device (r = min(floor(resident * past), resident_cap),
    ``resident_cap`` < 0: no cap); the recompute then covers [r, r + l), the load [r + l, past).
    ``ratio_of_rest``: l = floor(ratio * (past - r)) instead of floor(ratio * past) (a budget's
    share: everything resident up to the cap, the ratio applied to what is not). ``cpu_split``:
    the checked split of the layer's attention (passes/cpu_attention.py ``plan_split``), whose
    share of the past (of the window, on a sliding layer) the CPU attends to."""
    handle, k_new, v_new, layer, past, start = args_of(cache_node)
    windowed = not (isinstance(start, int) and start == 0)
    kv = example_value(k_new)
    frac, rfrac = ratio_fraction(ratio), ratio_fraction(resident)
    if rfrac + frac > 1 and not ratio_of_rest:
        raise ValueError(f"kvpr: layer {layer}: ratio {ratio} + resident_ratio {resident} > 1")
    recompute = sl.module is not None and frac > 0
    effective = float(frac) if recompute else 0.0
    keep = rfrac > 0 and resident_cap != 0 and not windowed
    if isinstance(past, int) and past == 0:
        cpu_split = None   # an empty past: nothing for the CPU
    emit = _Emitter(graph, layer, effective, rfrac if keep else None, ratio_of_rest, windowed,
                    None if cpu_split is None else cpu_split.frac)
    call, items = emit.call, emit.items

    # complex inputs (e.g. RoPE as a complex rotation) are stored as their real view
    is_complex = [example_value(t).is_complex() for t in sl.token_inputs]
    _, ranks, codes = record_specs([torch.view_as_real(example_value(t)) if c else example_value(t)
                                    for t, c in zip(sl.token_inputs, is_complex)])
    with graph.inserting_before(cache_node):
        stored = _stored_inputs(call, sl, links, is_complex, keep_x=frac > 0)
        rule, r = _resident_prefix(call, keep, rfrac, resident_cap, past)
        base = start if windowed else r   # the first position the read covers past the resident
        if recompute:
            l = _recompute_len(call, frac, past, start, r, windowed, keep and ratio_of_rest)
            end = _add(call, base, l)
            loaded = items(call(ops.load_tokens.default,
                                (handle, layer, end, _record_shapes(graph, sl, is_complex),
                                 ranks, codes, kv.device, owned_loads,
                                 *([base] if keep or windowed else [])),
                                "load_tokens"), len(sl.token_inputs), "load_tokens")
        else:
            l, end, loaded = 0, base, []
        b, heads, head_dim = (size_arg(graph, kv.shape[i], k_new, i) for i in (0, 1, 3))
        cpu_from = past if cpu_split is None else \
            cpu_split.start(call, past, end, start if windowed else 0)
        k_ld, v_ld = items(call(ops.load_kv.default,
                                (handle, layer, end, cpu_from, b, heads, head_dim, kv.dtype,
                                 kv.device, owned_loads),
                                "load_kv"), 2, "load_kv")
        if recompute:  # recompute as soon as X is in; K,V[l:] may still be on the way
            call(ops.wait.default, (loaded,), "wait")
            tokens = [call(torch.view_as_complex, (t,), "recompute") if c else t
                      for t, c in zip(loaded, is_complex)]
            k_rc, v_rc = _inline(graph, sl.module, [*tokens, *sl.consts], effective, layer)
        else:
            k_rc, v_rc = (call(empty_past, (k_new,), "recompute"),
                          call(empty_past, (v_new,), "recompute"))
        call(ops.wait.default, ([k_ld, v_ld],), "wait")
        call(ops.store_tokens.default, (handle, layer, past, k_new, v_new, *stored), "store")
        tail = []
        if cpu_split is not None:
            tail = [past - cpu_from if isinstance(cpu_from, int) else
                    call(operator.sub, (past, cpu_from), "split")]
        k_all, v_all = items(call(ops.assemble.default,
                                  (handle, layer, k_rc, v_rc, k_ld, v_ld, k_new, v_new,
                                   *_assemble_tail(keep, windowed, r, rule, start, tail)),
                                  "assemble"),
                             2, "assemble")
    for user in list(cache_node.users):
        user.replace_all_uses_with(k_all if user.args[1] == 0 else v_all)
        graph.erase_node(user)
    graph.erase_node(cache_node)
    if cpu_split is not None:
        cpu_attention.apply(graph, cpu_split, handle, layer, cpu_from, past, emit.annotate,
                            first=start if windowed else 0)
    return effective
