"""One store per micro-batch: the throughput schedule's layout of a cache (see store.py).

``split(store, sizes)`` gives ``store`` one part per micro-batch (rows ``[r, r + size)`` in batch
order), each a store of its own (of the store's class, over ``geometry.with_rows(size)``): K and
V ``(max_seq_len, size, kv_heads, head_dim)``, sequence-major, so what micro-batch k loads of a
layer is one contiguous block, and its own handle (the compiled column-order step gives
micro-batch k's layer segments that handle). The valid positions are copied in, the store's own
K/V buffers are released. ``merge(store)`` copies the parts back and drops them;
``KVStore.whole()`` calls it whenever the store is addressed as one.

A part knows its whole store (``part_of``): on a device its loads fill slots of the whole store's
pool (cuda_runtime.runtime), so the parts of a cache share two device slots, which the column
order hands from micro-batch to micro-batch (column_runner.py), instead of two slots per part.

Per-token records (X, side inputs) move with their rows where a record's first axis is the batch
(its size is the store's batch, or each part's), are shared where it is 1, and are dropped
otherwise: positions without records use the stored K,V (exact, not recomputed).

This module imports no store: ``store.py`` imports it (``whole`` merges), and a part is made as
an instance of its whole store's class.
"""
from __future__ import annotations

import weakref

import torch

from . import host_memory


def _sync(store) -> None:
    if store.geometry.pinned and torch.cuda.is_available():
        torch.cuda.synchronize()   # D2H writes into the parts (or the store) may be in flight


def split(store, sizes) -> list:
    """The micro-batch parts of ``store`` for row counts ``sizes`` (made once; a split with other
    sizes is merged back first)."""
    sizes = tuple(int(s) for s in sizes)
    if store.parts is not None and tuple(p.batch_size for p in store.parts) == sizes:
        return store.parts
    store.whole()
    if sum(sizes) != store.batch_size:
        raise ValueError(f"kvpr: micro-batches {list(sizes)} do not add up to the cache's batch "
                         f"({store.batch_size} rows)")
    _sync(store)
    parts, row = [], 0
    for size in sizes:
        part = type(store)(store.geometry.with_rows(size))
        part.records.links = list(store.links)   # shared records stay with their owner layer
        part.part_of = (weakref.ref(store), len(parts))   # its device slots: the store's pool
        for layer in range(store.num_layers):
            n = store.written[layer]
            part.k[layer][:n].copy_(store.k[layer][:n, row:row + size])
            part.v[layer][:n].copy_(store.v[layer][:n, row:row + size])
            part.written[layer] = n
            valid = store.token_len[layer]
            kinds = [_rows(rec, store.batch_size) for rec in store.tokens[layer]]
            records = [] if None in kinds else [
                rec[:valid, row:row + size] if kind == "per-row" else rec[:valid]
                for rec, kind in zip(store.tokens[layer], kinds)]
            if records:
                part.tokens[layer] = [_copy_rows(part, r) for r in records]
                part.token_len[layer] = valid
        parts.append(part)
        row += size
    store.parts = parts
    store.kv.release()        # released: the parts hold the data now
    store.records.release()
    store.buffers_replaced()
    return parts


def _rows(rec: torch.Tensor, batch: int) -> str | None:
    """How a stored record ``(max_seq_len, rows, ...)`` covers a batch of ``batch`` rows:
    "per-row", "shared" (one row for all) or None (no batch axis: cannot be split or merged)."""
    if rec.dim() > 1 and rec.shape[1] == batch:
        return "per-row"
    if rec.dim() > 1 and rec.shape[1] == 1:
        return "shared"
    return None


def _copy_rows(part, valid_rows: torch.Tensor) -> torch.Tensor:
    """A (max_seq_len, *record) store of ``part`` holding ``valid_rows`` at its start."""
    out = host_memory.alloc((part.max_seq_len, *valid_rows.shape[1:]), valid_rows.dtype,
                            part.geometry.pinned, zero=False)
    out[:valid_rows.shape[0]].copy_(valid_rows)
    return out


def merge(store) -> None:
    """Copy the parts back into ``store``'s whole-batch layout and drop them."""
    parts, store.parts = store.parts, None
    if parts is None:
        return
    _sync(store)
    store.kv.allocate()
    links = {tuple(p.links) for p in parts}   # shared-record links, written into the parts
    store.records.links = list(links.pop()) if len(links) == 1 else [()] * store.num_layers
    for layer in range(store.num_layers):
        n = max(p.written[layer] for p in parts)
        store.written[layer] = n
        torch.cat([p.k[layer][:n] for p in parts], dim=1, out=store.k[layer][:n])
        torch.cat([p.v[layer][:n] for p in parts], dim=1, out=store.v[layer][:n])
        valid = min(p.token_len[layer] for p in parts)
        counts = {len(p.tokens[layer]) for p in parts}
        if valid == 0 or len(counts) != 1 or store.links[layer] != parts[0].links[layer]:
            continue
        records = []
        for i in range(counts.pop()):
            recs = [p.tokens[layer][i] for p in parts]
            kinds = {_rows(r, p.batch_size) for r, p in zip(recs, parts)}
            if kinds == {"per-row"}:
                records.append(torch.cat([r[:valid] for r in recs], dim=1))
            elif all(r.dim() > 1 and r.shape[1] == 1 for r in recs):   # one row for every part
                records.append(recs[0][:valid])
            else:
                records = []
                break
        if records:
            store.tokens[layer] = [_copy_rows(store, r) for r in records]
            store.token_len[layer] = valid
    store.buffers_replaced()
