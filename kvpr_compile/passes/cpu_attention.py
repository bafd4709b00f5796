"""Split one layer's attention by key range: the device attends to what it holds, the CPU to the
past's last c tokens where they lie (the store), merged exactly by log-sum-exp.

Before (after the rewrite of the cache read, rewrite.py):

    k_all, v_all = kvpr.assemble(...)        # resident ++ recomputed ++ loaded ++ new
    out = sdpa(q, chain(k_all), chain(v_all), attn_mask=mask, scale=s)

After, with start = past - c (ops/split.py ``cpu_start``; the loads stop at ``start`` and the
assemble holds zeros in [start, past), so every layout op after it sees the length it saw):

    o_c, lse_c = kvpr.cpu_attend(handle, layer, q, start, past, mask[..., start:past], s)
    o_d, lse_d = partial_attention(q, chain(k_all), chain(v_all), mask_out(mask, [start, past)), s)
                 # (or fused_attention, the device's fused kernel, where one applies)
    kvpr.wait([o_c, lse_c])
    out = merge_partials(o_d, lse_d, o_c, lse_c, q.dtype)          (ops/attention.py)

Why the tail of the past: r and l, the load's start and every rule before it stay as they were
(a cache at cpu share 0 runs the same graph); the loads stay one contiguous block [r + l, start)
and so does the CPU's range, and the range moves forward with the past, as a sliding window
would keep it. The zeros cost device memory traffic (c rows written and read once), not link
bytes; they let the layout ops between the cache read and attention (``repeat_kv``'s
``expand(b, h, n_rep, S, d)`` with S baked in) run unchanged.

``plan_split`` decides, before anything is rewritten, whether the split is exact; otherwise the
layer keeps cpu share 0 and the reason goes into the report. Exact means: one attention reads
the cache read's K; for SDPA no dropout, no ``is_causal`` on a past, a constant scale, a mask
absent or with a key column per key (or one for all); a matmul -> softmax -> matmul attention
only per-score ops the CPU part can repeat (cpu_attention_manual.py); and K and V reaching it
from the cache read through layout ops only (attention_chain.py: the chain run on a probe must
equal the cache's K/V with each head repeated, in a dtype no narrower).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import fx

from ..ops.attention import mask_out, mask_range, merge_partials, partial_attention
from ..ops.device_kernel import device_kernel
from ..ops.fused_attention import fused_attention
from ..ops.errors import Unsupported
from ..ops.split import cpu_start, ratio_fraction
from .attention_chain import chain_from, probe_layout
from .cpu_attention_manual import ManualParts, apply_manual, key_columns, plan_manual
from .graph_utils import example_value, hint, is_matmul, is_sdpa

ops = torch.ops.kvpr
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")


@dataclass
class CpuSplit:
    """A layer's attention, checked to split exactly: what ``apply`` rewrites (its operands
    are read from the node then: the rewrite of the cache read replaces some)."""
    frac: Fraction
    attention: fx.Node
    scale: float
    dtype: torch.dtype
    manual: ManualParts | None = None   # a matmul -> softmax -> matmul attention's parts
    device_fused: str | None = None   # SDPA: "" if the device part runs the fused kernel, else why

    def start(self, call, past, taken, first=0):
        """The CPU range's first position (a graph node of role ``split`` on a symbolic past);
        ``first``: a sliding window's first position (the share is of the window)."""
        args = (past, self.frac.numerator, self.frac.denominator, taken, first)
        if all(isinstance(a, int) for a in (past, taken, first)):
            return cpu_start(*args)
        return call(cpu_start, args, "split")


def _users_getitem(cache_node: fx.Node, index: int):
    return next((u for u in cache_node.users if u.op == "call_function"
                 and u.target is operator.getitem and u.args[1] == index), None)


def _bound_sdpa(node: fx.Node) -> dict:
    bound = dict(zip(_SDPA_ARGS, node.args))
    bound.update(node.kwargs)
    return bound


def _attention_of(cache_node: fx.Node, k_get: fx.Node) -> tuple[str, fx.Node]:
    """The one attention node that reads this cache read's K: ("sdpa", the SDPA node) or
    ("manual", the ``q @ k^T`` matmul)."""
    found = []
    for node in cache_node.graph.nodes:
        if is_sdpa(node):
            if chain_from(_bound_sdpa(node).get("key"), k_get) is not None:
                found.append(("sdpa", node))
        elif is_matmul(node) and len(node.args) == 2 \
                and chain_from(node.args[1], k_get) is not None:
            found.append(("manual", node))
    if len(found) != 1:
        raise Unsupported(f"{len(found)} attention nodes read this cache read's K (expected 1)")
    return found[0]


def _assembled(operand) -> tuple:
    """(the assemble output ``operand`` is laid out from, the layout nodes in between); the
    probe checked that they only repeat heads, which ``partial_attention`` does without a copy.
    (operand, []) where there is no such chain."""
    chain, node = [], operand
    for _ in range(32):
        if not isinstance(node, fx.Node):
            break
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and node.args[0].target is ops.assemble.default:
            return node, chain
        if node.op not in ("call_function", "call_method") or not node.args:
            break
        chain.append(node)
        node = node.args[0]
    return operand, []


def _check_query(qv, kv) -> None:
    if not isinstance(qv, torch.Tensor) or qv.dim() != 4:
        raise Unsupported("the query is not (batch, heads, tokens, head_dim)")
    if hint(qv.shape[-1]) != hint(kv.shape[-1]) or hint(qv.shape[1]) % hint(kv.shape[1]):
        raise Unsupported("query and cache heads do not match (head_dim or group size)")


def plan_split(cache_node: fx.Node, cpu_ratio: float) -> CpuSplit:
    """The checked split of the attention that reads ``cache_node``'s K,V (module docstring);
    raises Unsupported with the reason where the split would not be exact."""
    frac = ratio_fraction(cpu_ratio)   # baked into the graph like the ratio
    k_get, v_get = _users_getitem(cache_node, 0), _users_getitem(cache_node, 1)
    if k_get is None or v_get is None:
        raise Unsupported("the cache read's K or V is unused")
    kind, att = _attention_of(cache_node, k_get)
    if kind == "manual":
        qv = example_value(att.args[0])
        _check_query(qv, example_value(k_get))
        parts = plan_manual(att, k_get, v_get)
        return CpuSplit(frac, att, 1.0, qv.dtype, parts)
    bound = _bound_sdpa(att)
    q, key, value = bound.get("query"), bound.get("key"), bound.get("value")
    if chain_from(value, v_get) is None:
        raise Unsupported("the attention's V is not this cache read's V")
    dropout = bound.get("dropout_p", 0.0)
    if isinstance(dropout, fx.Node) or dropout != 0:
        raise Unsupported(f"attention dropout {dropout} (training): the split would draw "
                          "other masks")
    causal = bound.get("is_causal", False)
    if causal is not False:
        raise Unsupported("is_causal on a past (its mask is aligned to the keys' start)")
    scale = bound.get("scale")
    if isinstance(scale, fx.Node):
        raise Unsupported("the attention's scale is computed in the graph")
    qv, kv = example_value(q), example_value(k_get)
    _check_query(qv, kv)
    mask = bound.get("attn_mask")
    if mask is not None:
        mv = example_value(mask)
        if not isinstance(mask, fx.Node) or not isinstance(mv, torch.Tensor):
            raise Unsupported("the attention mask is not a tensor of the graph")
        if mv.dim() > 4 or hint(mv.shape[-1]) not in (1, hint(kv.shape[2])):
            raise Unsupported("the attention mask has no column per key")
    probe_layout(chain_from(key, k_get), k_get, kv, "K")
    probe_layout(chain_from(value, v_get), v_get, example_value(v_get), "V")
    if scale is None:
        scale = 1.0 / math.sqrt(hint(qv.shape[-1]))
    mask_shape = tuple(hint(s) for s in (mv.shape if mask is not None else kv.shape[2:3]))
    return CpuSplit(frac, att, float(scale), qv.dtype,
                    device_fused=device_kernel(qv, kv, example_value(v_get), mask_shape))


def apply(graph: fx.Graph, split: CpuSplit, handle, layer: int, start, past, annotate,
          first=0) -> None:
    """Replace the split's attention by the device part, the CPU part and the merge (module
    docstring). ``annotate(node, role)`` gives inserted nodes the rewrite's metadata. The CPU
    attends to store positions [start, past); the masks and the device part index key columns,
    which start at ``first`` on a sliding-window layer."""
    att = split.attention

    def call(target, args, role):
        node = graph.call_function(target, args)
        annotate(node, role)
        return node

    if split.manual is not None:
        apply_manual(graph, split.manual, handle, layer, start, past, call, first)
        return
    bound = _bound_sdpa(att)
    q, key, value, mask = (bound.get(n) for n in ("query", "key", "value", "attn_mask"))

    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = [n for n in (q, mask, start, first) if isinstance(n, fx.Node)]
    latest = max(inputs, key=order.__getitem__)
    with graph.inserting_before(latest.next):   # as early as its inputs allow: the CPU starts
        columns = key_columns(call, start, past, first)   # sooner
        cpu_mask = call(mask_range, (mask, *columns), "cpu_attention") \
            if mask is not None else None
        anchor = cpu_mask if cpu_mask is not None else latest
    with graph.inserting_after(anchor):
        cpu = call(ops.cpu_attend.default,
                   (handle, layer, q, start, past, cpu_mask, split.scale, -1, []),
                   "cpu_attention")
    with graph.inserting_before(att):
        o_c, lse_c = (call(operator.getitem, (cpu, i), "cpu_attention") for i in (0, 1))
        (k_dev, k_layout), (v_dev, v_layout) = _assembled(key), _assembled(value)
        dev_mask = call(mask_out, (mask, k_dev, *columns), "attention")
        device_part = fused_attention if split.device_fused == "" else partial_attention
        dev = call(device_part, (q, k_dev, v_dev, dev_mask, split.scale), "attention")
        o_d, lse_d = (call(operator.getitem, (dev, i), "attention") for i in (0, 1))
        call(ops.wait.default, ([o_c, lse_c],), "wait")
        out = call(merge_partials, (o_d, lse_d, o_c, lse_c, split.dtype), "attention")
    att.replace_all_uses_with(out)
    graph.erase_node(att)
    for node in [*k_layout, *v_layout]:   # the head repeats nothing reads any more
        if not node.users:
            graph.erase_node(node)

