"""The record-spec codec: per-token record shapes and dtypes as the ops' schemas carry them.

A load of per-token records takes three flat int lists (schemas have no list-of-dtype or
list-of-shape type): every record's shape concatenated, each record's rank, each dtype's code in
``DTYPES``. ``record_specs`` encodes them from example tensors, ``split_specs`` decodes them into
``(shape, dtype)`` pairs (the ops, the lowered graph and the column cut call it).
"""
from __future__ import annotations

import torch

# Record dtypes travel as small ints (schemas have no list-of-dtype type).
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.bool)


def record_specs(likes) -> tuple[list, list[int], list[int]]:
    """(flat shapes, ranks, dtype codes) describing per-token records shaped like ``likes``."""
    shapes, ranks, codes = [], [], []
    for t in likes:
        shapes.extend(t.shape)
        ranks.append(t.dim())
        codes.append(DTYPES.index(t.dtype))
    return shapes, ranks, codes


def split_specs(shapes, ranks, codes) -> list[tuple[tuple, torch.dtype]]:
    """The ``(shape, dtype)`` of each record, from the flat form ``record_specs`` makes."""
    out, i = [], 0
    for r, c in zip(ranks, codes):
        out.append((tuple(shapes[i:i + r]), DTYPES[c]))
        i += r
    return out
