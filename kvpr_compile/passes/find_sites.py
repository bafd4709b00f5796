"""Find attention sites: attention nodes (SDPA, or matmul -> softmax -> matmul) and the
offloaded-cache reads (``kvpr::cache_update``) that feed their K and V."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from ..ops.nodes import args_of
from .graph_utils import is_cache_update, is_matmul, is_sdpa, is_softmax

# Ops that only move, broadcast, cast or scale K/V between the cache read and the attention.
_LAYOUT_METHODS = {"view", "reshape", "transpose", "permute", "expand", "contiguous", "repeat",
                   "repeat_interleave", "unsqueeze", "squeeze", "flatten", "to", "float", "half",
                   "bfloat16", "type", "clone", "mul", "div", "t", "type_as"}
_LAYOUT_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.repeat_interleave,
                     torch.unsqueeze, torch.squeeze, torch.flatten, operator.getitem, torch.clone,
                     operator.mul, operator.truediv, torch.mul, torch.div, torch.t}


@dataclass
class Site:
    """One rewritable cache read."""
    cache_node: fx.Node
    layer: int


@dataclass
class SiteScan:
    sites: list[Site] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (node name, reason)


def _cache_source(node, max_hops: int = 32):
    """Follow layout ops back from an attention operand to a cache_update node, if any."""
    for _ in range(max_hops):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "call_function" and node.target is operator.getitem and isinstance(
                node.args[0], fx.Node) and is_cache_update(node.args[0]):
            return node.args[0]
        layout = (node.op == "call_method" and node.target in _LAYOUT_METHODS) or (
            node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS)
        if not layout or not node.args:
            return None
        node = node.args[0]
    return None


def _attention_kv(node: fx.Node):
    """(K operand, V operand) of an attention node, or None if it is not attention-shaped."""
    if is_sdpa(node):
        return node.kwargs.get("key", node.args[1] if len(node.args) > 1 else None), \
            node.kwargs.get("value", node.args[2] if len(node.args) > 2 else None)
    if is_softmax(node):
        scores = node.args[0]
        for _ in range(8):  # scale / mask / cast ops between QK^T and softmax
            if not isinstance(scores, fx.Node) or is_matmul(scores):
                break
            scores = scores.args[0] if scores.args else None
        if not (isinstance(scores, fx.Node) and is_matmul(scores)):
            return None
        pv = [u for u in node.users if is_matmul(u)]
        if not pv:
            cast = [u for u in node.users
                    if u.op == "call_method" and u.target in ("to", "type_as", "float")]
            pv = [w for c in cast for w in c.users if is_matmul(w)]
        if not pv:
            return None
        return scores.args[1], pv[0].args[1]
    return None


def find_sites(graph: fx.Graph) -> SiteScan:
    scan = SiteScan()
    scan.sites = [Site(node, int(args_of(node).layer)) for node in graph.nodes
                  if is_cache_update(node)]
    for node in graph.nodes:
        kv = _attention_kv(node) if node.op in ("call_function", "call_method") else None
        if kv is None:
            continue
        k_src, v_src = (_cache_source(x) for x in kv)
        if k_src is None or v_src is None:
            scan.skipped.append((node.name, "K/V are not read from an OffloadedKVCache "
                                            "(no kvpr cache_update feeds this attention)"))
        elif k_src is not v_src:
            scan.skipped.append((node.name, "K and V come from different cache reads"))
    return scan
