"""The K/V half of a cache's CPU store: one K and one V buffer per layer, in host memory.

Layout: ``k[layer]``, ``v[layer]`` are ``(max_seq_len, batch, num_kv_heads, head_dim)``,
sequence-major, so a layer's token range ``[a:b)`` is one contiguous block (one copy per load).
``written[layer]``: positions ``[0, written)`` were ever written (what a split into micro-batch
parts must copy, store_parts.py). Pinned, writes are asynchronous copies on the caller's stream.

Fast path (host time per decode step): on the CPU, K,V are written and read through
``(batch, heads, seq, head_dim)`` views made once (``remake_views``), one indexing call per
tensor, and nothing is moved when a read's ``device`` is None.

``changes`` counts every change of what these buffers hold (the store's ``writes`` adds it up).
"""
from __future__ import annotations

import torch

from . import host_memory, traffic
from .geometry import CacheGeometry


class KVStorage:
    def __init__(self, geometry: CacheGeometry):
        self.geometry = geometry
        self.pin = geometry.pinned
        self.changes = 0
        self.written = [0] * geometry.num_layers
        self.allocate()

    def allocate(self) -> None:
        """Fresh zeroed K and V buffers for every layer (made, or merged back from parts)."""
        g = self.geometry
        self.k = [host_memory.alloc(g.kv_shape, g.dtype, self.pin) for _ in range(g.num_layers)]
        self.v = [host_memory.alloc(g.kv_shape, g.dtype, self.pin) for _ in range(g.num_layers)]
        self.remake_views()

    def release(self) -> None:
        """Drop the buffers (the store was split: its micro-batch parts hold the data)."""
        empty = torch.empty(0, dtype=self.geometry.dtype)
        self.k = [empty] * self.geometry.num_layers
        self.v = [empty] * self.geometry.num_layers
        self.remake_views()

    def remake_views(self) -> None:
        """The (b, h, seq, d) views of the current buffers, one indexing call per read or write."""
        self.k_bhsd = [t.permute(1, 2, 0, 3) if t.dim() == 4 else t for t in self.k]
        self.v_bhsd = [t.permute(1, 2, 0, 3) if t.dim() == 4 else t for t in self.v]
        self.changes += 1

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' k, v ``(b, hkv, n, d)`` at positions ``[pos, pos + n)``."""
        n = k.shape[2]
        self.changes += 1
        self.written[layer] = max(self.written[layer], pos + n)
        if self.pin:   # D2H from a side stream: the copy must not block
            self.k[layer][pos:pos + n].copy_(k.permute(2, 0, 1, 3), non_blocking=True)
            self.v[layer][pos:pos + n].copy_(v.permute(2, 0, 1, 3), non_blocking=True)
        else:
            self.k_bhsd[layer][:, :, pos:pos + n] = k
            self.v_bhsd[layer][:, :, pos:pos + n] = v

    def read(self, layer: int, start: int, end: int, device: torch.device | None):
        """K, V for positions ``[start, end)`` as ``(b, hkv, end - start, d)`` on ``device``
        (None: views of the buffers, nothing moved)."""
        if traffic.ON:
            traffic.note("kv", self.k[layer][start:end], self.v[layer][start:end])
        if device is None:
            return self.k_bhsd[layer][:, :, start:end], self.v_bhsd[layer][:, :, start:end]
        k = self.k[layer][start:end].to(device, non_blocking=self.pin)
        v = self.v[layer][start:end].to(device, non_blocking=self.pin)
        return k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
