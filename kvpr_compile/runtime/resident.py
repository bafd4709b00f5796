"""The resident prefix of a cache: each layer's K,V rows ``[0, filled)`` kept in device memory.

A step whose graph asks for ``r`` resident rows (ops/split.py ``resident_len``) reads
K,V ``[0, r)`` from here instead of loading them: only ``[r, past)`` crosses the link. The rows
are a *copy*: the CPU store keeps every token (write-through), so ``k_cpu``/``v_cpu``, ``reset``,
uncompiled steps and the throughput schedule see the whole cache as before, and the device rows
are dropped whenever the store changes other than by a compiled step's append (``truncate``,
``clear``; KVStore calls them).

Per layer: ``k[layer]``, ``v[layer]``, ``(capacity, batch, kv_heads, head_dim)``, sequence-major
like the store, allocated once per cache on the compute device at the first step that asks for
a resident share (the capacity is fixed by the graph's rule, ``resident_capacity``; a graph with
another rule reallocates, starting empty); ``filled[layer]``: rows ``[0, filled)`` equal the
store's. The assemble appends each step's new tokens while they fit (``append``) and, where a
step asks for rows not held (after ``clear``, or the first step after an uncompiled prefill),
copies every row of the past it can hold from the store once (``fill_from``: up to
``min(past, capacity)``, so the appends continue from there; counted as ``"resident"``
traffic). ``copy`` is how rows are copied: the CUDA runtime passes its stream-ordered copy (on
the compute stream, after the layer's stores landed).
"""
from __future__ import annotations

import torch

from ..ops.split import resident_capacity
from . import traffic


class ResidentRows:
    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.filled = [0] * num_layers
        self.rule: list[tuple | None] = [None] * num_layers   # (num, den, cap) allocated for

    def clear(self) -> None:
        """Nothing held any more (the store changed behind the rows); buffers are kept."""
        self.filled = [0] * len(self.filled)

    def truncate(self, layer: int, pos: int) -> None:
        """The store's rows from ``pos`` on were written by something else: drop them here."""
        self.filled[layer] = min(self.filled[layer], pos)

    def nbytes(self) -> int:
        """Device bytes of the allocated rows."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def buffers(self, store, layer: int, rule: tuple, device) -> tuple | None:
        """The layer's (K, V) buffers for ``rule`` = (num, den, cap), allocated at the first call
        (or when the rule changes); None when the rule keeps nothing resident."""
        capacity = resident_capacity(store.max_seq_len, *rule) if rule[0] else 0
        if capacity <= 0:
            return None
        k = self.k[layer]
        if self.rule[layer] != rule or k is None:
            shape = (capacity, store.batch_size, store.num_kv_heads, store.head_dim)
            self.k[layer] = torch.empty(shape, dtype=store.dtype, device=device)
            self.v[layer] = torch.empty(shape, dtype=store.dtype, device=device)
            self.rule[layer], self.filled[layer] = rule, 0
        return self.k[layer], self.v[layer]

    def fill_from(self, store, layer: int, r: int, past: int, copy) -> None:
        """Where rows ``[0, r)`` are not all held: rows ``[filled, min(past, capacity))`` copied
        from the store (``copy(dst, src)``), so the prefix is held and later appends continue it."""
        start = self.filled[layer]
        if start >= r:
            return
        end = min(past, self.k[layer].shape[0])
        src_k, src_v = store.k[layer][start:end], store.v[layer][start:end]
        if traffic.ON: traffic.note("resident", src_k, src_v)  # noqa: E701
        copy(self.k[layer][start:end], src_k)
        copy(self.v[layer][start:end], src_v)
        self.filled[layer] = end

    def rows(self, layer: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[0, r)`` as ``(b, heads, r, d)`` views of the device rows (no copy)."""
        return (self.k[layer][:r].permute(1, 2, 0, 3), self.v[layer][:r].permute(1, 2, 0, 3))

    def append(self, layer: int, pos: int, k_new, v_new, copy) -> None:
        """The new tokens ``(b, heads, n, d)`` at ``[pos, pos + n)``, as far as the rows reach and
        only where they continue the held prefix."""
        k = self.k[layer]
        if k is None or pos > self.filled[layer]:
            return
        end = min(pos + k_new.shape[2], k.shape[0])
        if end <= pos:
            return
        n = end - pos
        copy(k[pos:end], k_new[:, :, :n].permute(2, 0, 1, 3))
        copy(self.v[layer][pos:end], v_new[:, :, :n].permute(2, 0, 1, 3))
        self.filled[layer] = max(self.filled[layer], end)


def resident_rows(store, layer: int, residency, past: int, copy):
    """The layer's resident K,V ``[0, r)`` as views of its device rows (filled from the store
    with ``copy`` where not held), or None when the graph keeps nothing resident.
    ``residency``: the assemble's (r, num, den, cap)."""
    r, num, den, cap = residency
    rows = store.resident
    if not num or rows.buffers(store, layer, (num, den, cap), store.device) is None:
        return None
    rows.fill_from(store, layer, r, past, copy)
    return rows.rows(layer, r)


def plain_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """The synchronous path's row copy."""
    dst.copy_(src)
