"""The CPU split of an explicit ``q @ k^T -> per-score ops -> softmax -> @ v`` attention (HF's
eager attention, Gemma2's softcapping, gpt-fast style decoders).

The per-score ops between the two matmuls are a straight chain of elementwise ops: scaling by
constants, ``tanh`` (softcapping), casts, and masks (``+ mask``, ``masked_fill(mask, value)``)
whose tensors have a column per key (or one for all). The chain is copied into a small graph
``scores(s, *masks)`` that the CPU part runs on its own scores with each mask sliced to its key
columns (ops/attention.py ``register_scores``): the same ops, in the same order, so the two
parts score alike. The device part keeps the graph's own ops; its scores get the CPU's columns
(zeros in the assembled K,V) at -inf right before the softmax, and their log-sum-exp is taken
there (``scores_without``). The merge replaces the ``@ v`` result.

Refused (the layer keeps cpu share 0): anything else between the matmuls (a concatenation of
sink logits, a softmax over another dim, a reduction), dropout that is active, and K or V
reaching the matmuls through more than layout (attention_chain.py).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from ..ops.attention import merge_partials, mask_range, register_scores, scores_without
from ..ops.errors import Unsupported
from .attention_chain import chain_from, probe_layout
from .graph_utils import example_value, hint, is_matmul, is_softmax

_SCALARS = {"mul", "div", "__mul__", "__truediv__", "__rmul__", operator.mul, operator.truediv,
            torch.mul, torch.div}
_MASKS = {"add", "__add__", "__radd__", operator.add, torch.add, "masked_fill",
          torch.masked_fill}
_UNARY = {"tanh", torch.tanh, "float", "to", "type_as"}
_CASTS = {"to", "float", "type_as", "half", "bfloat16"}


@dataclass
class ManualParts:
    qk: fx.Node
    softmax: fx.Node
    pv: fx.Node
    chain: list          # the per-score ops, qk excluded, in order
    masks: list          # their tensor operands (nodes), in order of first use
    scores: int          # the registered CPU copy of the chain


def _tensor_operands(node: fx.Node, prev: fx.Node) -> list:
    return [a for a in (*node.args, *node.kwargs.values())
            if isinstance(a, fx.Node) and a is not prev
            and isinstance(example_value(a), torch.Tensor)]


def _score_op(node: fx.Node, prev: fx.Node, keys: int) -> list:
    """The mask operands of one allowed per-score op (``[]`` for a scalar or unary op)."""
    target = node.target
    tensors = _tensor_operands(node, prev)
    computed = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)
                and a is not prev and a not in tensors]
    if computed:
        raise Unsupported(f"{node.name} scores with {computed[0].name}, computed in the graph")
    if target in _UNARY and (target != "type_as" or node.args[0] is prev):
        return []
    if target in _SCALARS and not tensors:
        return []
    if target in _MASKS and len(tensors) == 1 and (node.args[0] is prev):
        mask = example_value(tensors[0])
        if mask.dim() <= 4 and hint(mask.shape[-1]) in (1, keys):
            return tensors
        raise Unsupported(f"{tensors[0].name} has no column per key")
    raise Unsupported(f"{node.name} ({getattr(target, '__name__', target)}) between the "
                      f"attention's matmuls is not a per-score op the CPU part repeats")


def _dropout_off(node: fx.Node) -> bool:
    if node.target not in (F.dropout, torch.dropout, "dropout"):
        return False
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    if isinstance(p, fx.Node) or isinstance(training, fx.Node) or (p != 0 and training):
        raise Unsupported("attention dropout is active (training): the split would draw "
                          "other masks")
    return True


def _scores_graph(chain: list, masks: list) -> fx.GraphModule:
    """``scores(s, *masks)``: the chain copied with its input and mask operands as inputs."""
    graph = fx.Graph()
    env = {chain[0].args[0]: graph.placeholder("scores")}
    env.update({m: graph.placeholder(f"mask{i}") for i, m in enumerate(masks)})
    for node in chain:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[chain[-1]])
    return fx.GraphModule(torch.nn.Module(), graph)


def plan_manual(qk: fx.Node, k_get: fx.Node, v_get: fx.Node) -> ManualParts:
    """The checked parts of the attention whose ``q @ k^T`` is ``qk`` (module docstring)."""
    probe_layout(chain_from(qk.args[1], k_get), k_get, example_value(k_get), "K", transposed=True)
    keys = hint(example_value(qk).shape[-1])
    chain, masks, node = [], [], qk
    while not is_softmax(node):
        users = list(node.users)
        if len(users) != 1:
            raise Unsupported(f"the attention scores {node.name} have {len(users)} readers")
        prev, node = node, users[0]
        if is_softmax(node):
            break
        masks += [m for m in _score_op(node, prev, keys) if m not in masks]
        chain.append(node)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dim not in (-1, 3):
        raise Unsupported(f"softmax over dim {dim}, not the keys")
    pv, prev = node, node
    while True:
        users = list(pv.users)
        if len(users) != 1:
            raise Unsupported("the attention probabilities have several readers")
        prev, pv = pv, users[0]
        if is_matmul(pv):
            break
        if not (pv.target in _CASTS or _dropout_off(pv)):
            raise Unsupported(f"{pv.name} between softmax and the value matmul")
    if pv.args[0] is not prev or chain_from(pv.args[1], v_get) is None:
        raise Unsupported("the value matmul does not read this cache read's V")
    probe_layout(chain_from(pv.args[1], v_get), v_get, example_value(v_get), "V")
    scores = register_scores(_scores_graph(chain, masks)) if chain else -1
    return ManualParts(qk, node, pv, chain, masks, scores)


def key_columns(call, start, past, first):
    """The CPU range [start, past) as key columns of the assembled K,V, which begin at ``first``
    (a sliding window's first position, else 0)."""
    if isinstance(first, int) and first == 0:
        return start, past
    return tuple(p - first if isinstance(p, int) and isinstance(first, int)
                 else call(operator.sub, (p, first), "split") for p in (start, past))


def apply_manual(graph: fx.Graph, parts: ManualParts, handle, layer, start, past,
                 call, first=0) -> None:
    """Rewrite the checked attention: the CPU part from ``qk``'s query, the device part's
    scores without the CPU's columns, and the merge in place of the ``@ v`` result. The CPU
    attends to store positions [start, past); key columns begin at ``first`` (a sliding
    window's first position, else 0)."""
    q = parts.qk.args[0]
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = [n for n in (q, start, first, *parts.masks) if isinstance(n, fx.Node)]
    latest = max(inputs, key=order.__getitem__)
    with graph.inserting_before(latest.next):
        columns = key_columns(call, start, past, first)
    made = [c for c in columns if isinstance(c, fx.Node) and c not in (start, past)]
    anchor = made[-1] if made else latest
    cpu_masks = []
    for m in parts.masks:
        with graph.inserting_after(anchor):
            anchor = call(mask_range, (m, *columns), "cpu_attention")
        cpu_masks.append(anchor)
    with graph.inserting_after(anchor):
        cpu = call(torch.ops.kvpr.cpu_attend.default,
                   (handle, layer, q, start, past, None, 1.0, parts.scores, cpu_masks),
                   "cpu_attention")
    scores = parts.softmax.args[0]
    with graph.inserting_before(parts.softmax):
        kept = call(scores_without, (scores, *columns), "attention")
        masked, lse_d = (call(operator.getitem, (kept, i), "attention") for i in (0, 1))
    parts.softmax.replace_input_with(scores, masked)
    out_d = parts.pv
    dtype = example_value(out_d).dtype
    with graph.inserting_after(out_d):
        o_c = call(operator.getitem, (cpu, 0), "cpu_attention")
    with graph.inserting_after(o_c):
        lse_c = call(operator.getitem, (cpu, 1), "cpu_attention")
    with graph.inserting_after(lse_c):
        wait = call(torch.ops.kvpr.wait.default, ([o_c, lse_c],), "wait")
    with graph.inserting_after(wait):
        merged = call(merge_partials, (out_d, lse_d, o_c, lse_c, dtype), "attention")
    out_d.replace_all_uses_with(merged, delete_user_cb=lambda user: user is not merged)
