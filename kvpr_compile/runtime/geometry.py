"""The geometry of one offloaded cache: the sizes, dtype and device everything about it is made by.

``OffloadedKVCache`` (cache.py) takes it from the user and checks it; its store (store.py), the
store's K/V buffers (kv_storage.py) and per-token records (token_records.py), and the run-time
checks of each access (checks.py) read the same object. A micro-batch part of a store
(store_parts.py) has the same geometry over fewer rows (``with_rows``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

_SIZES = ("num_layers", "batch_size", "max_seq_len", "num_kv_heads", "head_dim")


@dataclass(frozen=True)
class CacheGeometry:
    num_layers: int
    batch_size: int
    max_seq_len: int      # positions per layer: the capacity of every buffer
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"   # where the cache computes (made a torch.device)

    def __post_init__(self) -> None:
        for name in _SIZES:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"OffloadedKVCache: {name} must be a positive int, got {value!r}")
        object.__setattr__(self, "device", torch.device(self.device))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"OffloadedKVCache: device={str(self.device)!r}, but this torch has no CUDA device "
                "(torch.cuda.is_available() is False): make the cache on the device the model "
                "runs on, e.g. device=model.device, or device=\"cpu\"")

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        """One layer's K (or V) buffer: ``(max_seq_len, batch, num_kv_heads, head_dim)``,
        sequence-major, so a token range is one contiguous block."""
        return (self.max_seq_len, self.batch_size, self.num_kv_heads, self.head_dim)

    @property
    def pinned(self) -> bool:
        """Whether the host buffers are pinned: the cache computes on CUDA, copies are async."""
        return self.device.type == "cuda"

    def with_rows(self, rows: int) -> CacheGeometry:
        """The same geometry over ``rows`` batch rows (a micro-batch part)."""
        return dataclasses.replace(self, batch_size=rows)


def _field(name: str) -> property:
    return property(lambda self: getattr(self.geometry, name), doc=f"``geometry.{name}``")


class HasGeometry:
    """The geometry's fields as read-only attributes of an object that holds ``self.geometry``
    (the cache and its store read the same sizes)."""
    num_layers = _field("num_layers")
    batch_size = _field("batch_size")
    max_seq_len = _field("max_seq_len")
    num_kv_heads = _field("num_kv_heads")
    head_dim = _field("head_dim")
    dtype = _field("dtype")
    device = _field("device")
