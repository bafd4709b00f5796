"""Extract the recompute slice of an attention site: X (the K/V projection input) and the nodes
that turn X into the new tokens' K and V (projection, bias, head reshapes, fused-QKV split, RoPE
or any other position-dependent step).

Inputs of the slice other than X are classified as
- *constants*: parameters/buffers and values computed from them alone (weights, biases, inverse
  frequencies), or non-tensor shape values; passed to the recompute unchanged. A computed value
  that lines up with K's token axis (a position table sliced with Python ints) is not one: it is
  a per-token side input in every graph;
- *per-token side inputs*: anything else (RoPE cos/sin, ...); stored per token next to X, exactly
  as the program computed them, so recomputing K for positions 0..l-1 uses those positions' values.

X is found by walking back from V (which has no positional step in any common architecture) to
the first projection with a parameter weight; the walk stops there and never crosses into earlier
layers. Where V sums several projections (LoRA adapters: ``base(x) + B(A(x)) * s``), X is the
input the others are computed from. The slice itself is everything between X and the cache read's
K and V.
"""
from __future__ import annotations

import networkx as nx
import torch
from torch import fx

from ..ops.errors import Unsupported
from ..ops.nodes import args_of
from .batch_tokens import batch_over_tokens
from .one_token import check_batched, one_token_slice
from .prune_projection import prune_fused_projection
from .slices import RecomputeSlice, same
from .token_dims import token_dims
from .graph_utils import (between, example_value, reachable, is_cache_update, is_call, is_sdpa,
                          is_softmax, einsum_operands, is_einsum, projection_args)


def is_tensor_node(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(example_value(node), torch.Tensor)


def _is_shape_value(val) -> bool:
    if isinstance(val, (tuple, list, torch.Size)):
        return all(_is_shape_value(v) for v in val)
    return isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool)


def _carries_tensor(node) -> bool:
    """A tensor, or a tuple of tensors such as the result of split()."""
    val = example_value(node) if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) or (
        isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val))


def _projection_input(node: fx.Node, params: set):
    """The activation operand if ``node`` is a projection with a parameter weight (``linear``,
    ``addmm``, ``x @ W``, or a two-operand ``einsum`` with one parameter operand)."""
    if is_einsum(node):
        operands = einsum_operands(node)
        acts = [a for a in operands if isinstance(a, fx.Node) and a not in params]
        if len(operands) == 2 and len(acts) == 1 and any(a in params for a in operands):
            return acts[0]
        return None
    layout = projection_args(node)
    if layout is None:
        return None
    act, weight = node.args[layout[0]], node.args[layout[1]]
    if (isinstance(weight, fx.Node) and weight in params
            and isinstance(act, fx.Node) and act not in params):
        return act
    return None


def _unflatten_x(act: fx.Node) -> fx.Node:
    """GPT-2 style projections see X flattened to (b*n, h): use the 3-D tensor behind the view."""
    val = example_value(act)
    if val is not None and val.dim() == 2 and (
            (act.op == "call_method" and act.target in ("view", "reshape"))
            or is_call(act, {torch.reshape})):
        src = act.args[0]
        if is_tensor_node(src) and example_value(src).dim() == 3:
            return src
    return act


def _find_x(nxg: nx.DiGraph, v_new: fx.Node, params: set) -> fx.Node:
    found, stack, seen = set(), [v_new], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        act = _projection_input(node, params)
        if act is not None:
            found.add(_unflatten_x(act))
            continue
        if node.op == "placeholder" or is_cache_update(node) or is_sdpa(node) or is_softmax(node):
            raise Unsupported(f"no K/V projection with a parameter weight found above V "
                              f"(reached {node.op} {node.name})")
        stack.extend(i for i in node.all_input_nodes if i not in params and _carries_tensor(i))
    if len(found) > 1:
        # several projections (LoRA: base(x) + B(A(x)) * s): X is the one the others are
        # computed from; whatever lies between is part of the slice and checked there
        roots = [c for c in found if all(o is c or o in nx.descendants(nxg, c) for o in found)]
        if len(roots) == 1:
            return roots[0]
    if len(found) != 1:
        raise Unsupported(f"V does not come from exactly one projection input (found {len(found)}: "
                          f"{', '.join(sorted(c.name for c in found))})")
    return found.pop()


_RANDOM = {"rand", "randn", "rand_like", "randn_like", "randint", "bernoulli", "multinomial",
           "normal", "uniform_", "normal_", "bernoulli_"}


def _name(node: fx.Node) -> str:
    return (node.target if isinstance(node.target, str)
            else getattr(node.target, "__name__", str(node.target)))


def _random(node: fx.Node) -> bool:
    name = _name(node)
    if "dropout" in name:  # F.dropout(x, p, training, inplace): random only when training
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        return bool(training) and p != 0
    return name in _RANDOM


def _signature(side: fx.Node, members: set) -> str:
    """How a side input is made (the op chain above it) and used (its consumers in the slice)."""
    chain, node = [], side
    for _ in range(8):
        chain.append(_name(node))
        ins = [i for i in node.all_input_nodes if is_tensor_node(i)]
        if node.op not in ("call_function", "call_method") or not ins:
            break
        node = ins[0]
    uses = sorted(f"{_name(u)}:{u.args.index(side) if side in u.args else -1}"
                  for u in members if side in u.all_input_nodes)   # not side.users: all layers
    val = example_value(side)
    return "|".join(chain) + "/" + ",".join(uses) + f"/{val.dtype}/{val.dim()}"


def _side_tdim(node: fx.Node, n, traced: dict) -> int:
    """Token dim of a side input in a multi-token graph; -1 if it has none (broadcast)."""
    shape = example_value(node).shape
    if node in traced:  # aligned with the cache's token axis through the slice's ops
        d = traced[node]
        if same(shape[d], n):
            return d
        if same(shape[d], 1):
            return -1
    dims = [i for i, s in enumerate(shape) if same(s, n)]
    if len(dims) > 1:
        raise Unsupported(f"side input {node.name} {tuple(shape)} has several dims of the token "
                          f"count {n}; its token dim is ambiguous")
    return dims[0] if dims else -1


def extract_slice(nxg: nx.DiGraph, cache_node: fx.Node, params: set) -> RecomputeSlice:
    update = args_of(cache_node)
    k_new, v_new = update.k, update.v
    if not (is_tensor_node(k_new) and is_tensor_node(v_new)):
        raise Unsupported("K/V passed to the cache are not graph tensors")
    kv = example_value(k_new)
    b, n = kv.shape[0], kv.shape[2]
    x = _find_x(nxg, v_new, params)
    xv = example_value(x)
    if xv is None or xv.dim() != 3 or not same(xv.shape[0], b) or not same(xv.shape[1], n):
        raise Unsupported(f"projection input {x.name} is not (batch, tokens, hidden) "
                          f"(got {None if xv is None else tuple(xv.shape)})")
    order = nxg.graph.get("order") or {nd: i for i, nd in enumerate(x.graph.nodes)}
    members = _members(nxg, x, k_new, v_new, order)
    nodes = sorted(members, key=order.__getitem__)
    for nd in nodes:
        _check_member(nd)
    sides, consts = _inputs(nodes, members, x, params)
    single = isinstance(n, int) and n == 1
    traced = token_dims([k_new, v_new], members | set(sides) | set(consts), order)
    _per_token_tables(sides, consts, traced)
    # Records are matched across graphs (prefill stores, decode loads) by position: order them
    # by how they are made and used, not by where the tracer happened to put them.
    sides.sort(key=lambda sd: (_signature(sd, members), order[sd]))
    tdims = [-1 if single else 1] + [-1 if single else _side_tdim(s, n, traced) for s in sides]
    sl = RecomputeSlice(x, [x, *sides], tdims, consts, nodes, single)
    if single:
        _batch(sl, _build_module(sl, k_new, v_new))
    elif isinstance(update.pos, int) and update.pos == 0:
        sl.past_note = "multi-token graph on an empty past: stores X, nothing to recompute"
    else:   # chunked prefill, speculative verification, a chat's next turn: recompute the past
        _batch_past(sl, n, traced, k_new, v_new, kv)
    return sl


def _members(nxg: nx.DiGraph, x: fx.Node, k_new: fx.Node, v_new: fx.Node, order: dict) -> set:
    """The nodes below X and above K or V. Every path from X to K/V lies between them in graph
    order, so both walks stay in that range: the work per site is the size of the layer's
    region, not of the graph (whole-graph walks per site made compiling quadratic in layers)."""
    lo, hi = order[x], max(order[k_new], order[v_new])
    below_x = reachable(nxg, x, between(nxg, lo, hi), hi - lo)
    if k_new not in below_x or v_new not in below_x:
        raise Unsupported(f"K is not computed from the V projection's input {x.name}")
    members = {k_new, v_new}
    for out in (k_new, v_new):
        members |= reachable(nxg, out, below_x.__contains__, hi - lo, reverse=True)
    return members


def _check_member(nd: fx.Node) -> None:
    """Unsupported where recomputing ``nd`` would not reproduce it (or it is not an op)."""
    bad = (nd.op not in ("call_function", "call_method") or is_cache_update(nd) or is_sdpa(nd)
           or (nd.op == "call_method" and nd.target.endswith("_")
               and not nd.target.startswith("_"))
           or str(getattr(nd.target, "namespace", "")) == "kvpr")
    if bad:
        raise Unsupported(f"recompute slice contains {nd.op} {nd.target} ({nd.name})")
    if _random(nd):
        raise Unsupported(f"recompute slice draws random numbers ({nd.name}): recomputing "
                          "would not reproduce the stored K/V")


def _inputs(nodes: list, members: set, x: fx.Node, params: set) -> tuple[list, list]:
    """(side inputs, constants) the slice reads besides X: parameters and non-tensors are
    constants, other tensors are per-token side inputs (RoPE's cos/sin)."""
    sides, consts = [], []
    for nd in nodes:
        for inp in nd.all_input_nodes:
            if inp in members or inp is x or inp in sides or inp in consts:
                continue
            if not _carries_tensor(inp) and not _is_shape_value(example_value(inp)):
                raise Unsupported(f"recompute slice reads {inp.name}, neither a tensor nor a size")
            (consts if inp in params or not is_tensor_node(inp) else sides).append(inp)
    return sides, consts


def _per_token_tables(sides: list, consts: list, traced) -> None:
    """A value computed from parameters alone that lines up with K's token axis is a position
    table sliced with Python ints (``freqs_cis[start:start + n]``): constant in this graph,
    per-token in the next one. Moved to the side inputs, stored per token like any, so that
    every graph of the program keeps the same records (and a decode graph specialised on one
    position still recomputes other positions with their own values)."""
    for c in [c for c in consts if c in traced and c.op != "placeholder" and is_tensor_node(c)]:
        consts.remove(c)
        sides.append(c)


def _batch_past(sl: RecomputeSlice, n, traced, k_new: fx.Node, v_new: fx.Node, kv) -> None:
    """A graph that adds several tokens on a past: the slice specialised to one token; where
    that fails, the exact whole-past load (``sl.module`` None) and the note says why."""
    try:
        _batch(sl, one_token_slice(sl, n, traced, k_new, v_new))
        check_batched(sl.module, sl, kv)
        sl.past_note = "multi-token graph: recomputes K,V[:l] of the past"
    except Exception as err:  # noqa: BLE001 - any failure keeps the exact whole-past load
        sl.module, sl.narrowed = None, False
        why = err if isinstance(err, Unsupported) else f"{type(err).__name__}: {err}"
        sl.past_note = f"multi-token graph: stores X, loads the whole past ({why})"


def _batch(sl: RecomputeSlice, per_token: fx.GraphModule) -> None:
    """The one-token slice, narrowed to the K/V columns where fused, with a leading axis of l."""
    sl.narrowed = prune_fused_projection(per_token)
    sl.module = batch_over_tokens(per_token, len(sl.token_inputs))


def _build_module(sl: RecomputeSlice, k_new: fx.Node, v_new: fx.Node) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, t in enumerate(sl.token_inputs):
        env[t] = g.placeholder(f"token_input_{i}")
    for i, c in enumerate(sl.consts):
        env[c] = g.placeholder(f"const_{i}")
    for node, ph in env.items():   # ranks of inputs decide how the batcher aligns broadcasts
        if "example_value" in node.meta:
            ph.meta["example_value"] = node.meta["example_value"]
    for nd in sl.nodes:
        env[nd] = g.node_copy(nd, lambda a: env[a])
    g.output((env[k_new], env[v_new]))
    return fx.GraphModule(torch.nn.Module(), g, class_name="KVRecomputeSlice")
