"""The sizes the planners need, read from a graph's first rewritable site (example values,
so reading them adds no guards)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.nodes import args_of
from ..passes.graph_utils import example_value, hint


@dataclass(frozen=True)
class GraphDims:
    batch_size: int        # the batch seen first: the graph stays dynamic in it
    hidden_size: int       # X's width
    kv_hidden_size: int    # KV heads * head dim
    dtype: torch.dtype
    device: torch.device


def graph_dims(slices: dict) -> GraphDims:
    cache_node, sl = next(iter(slices.items()))
    k_new, x = example_value(args_of(cache_node).k), example_value(sl.x)
    b, hkv, _, d = k_new.shape
    # hints, not int(): the graph stays dynamic in batch (the plan uses the batch seen first)
    return GraphDims(batch_size=hint(b), hidden_size=hint(x.shape[-1]),
                     kv_hidden_size=hint(hkv) * hint(d), dtype=x.dtype, device=x.device)
