"""The one allocation function of a store's host buffers: K, V and the per-token records.

Everything a store (kv_storage.py, token_records.py, store_parts.py) holds in CPU memory is made
here, pinned when the cache computes on CUDA (so copies to and from the device are asynchronous).
Callers reach it as ``host_memory.alloc`` (an attribute of this module), so a test can watch every
allocation in one place.
"""
from __future__ import annotations

import torch


def alloc(shape, dtype: torch.dtype, pin: bool, zero: bool = True) -> torch.Tensor:
    """A host tensor of ``shape``; ``zero=False``: uninitialised (no memset of a large buffer
    whose rows are written before they are read)."""
    t = torch.empty(shape, dtype=dtype, pin_memory=pin)
    return t.zero_() if zero else t
