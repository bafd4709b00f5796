"""Direct implementations of the kvpr steps: what the compiled decode step calls at run time.

The ``kvpr::`` custom ops (ops/library.py) are what Dynamo, AOT and inductor see; calling one from
Python goes through the dispatcher (schema checks, autograd and ADInplaceOrView keys, alias checks):
25-70 us of host time for 1-35 us of work on a small machine. Once the backend has rewritten a
graph, the graph it runs (``lower.py``) calls these plain functions instead, with

- the cache resolved once per forward (``resolve``) instead of ``lookup(handle)`` per op, and no
  version bump of the handle (only the dispatcher's mutation bookkeeping needs it);
- record specs decoded once, when the graph is lowered;
- on CPU: loads return views of the store (the store is never written where a load reads: loads
  cover positions before ``past``, stores start at ``past``), no ``wait`` at all, and the store
  and the assemble of a layer in one call;
- on CUDA (and simulated streams): the same runtime calls as the ops make, the wait for K,V[l:]
  folded into the assemble (its only reader).

The custom ops' CPU paths call these same functions; the uncompiled ``cache_update`` stays the
reference.
"""
from __future__ import annotations

import torch

from ..ops.split import cpu_start, resident_len, split_len
from . import cpu_attention, cuda_runtime
from .checks import check_read, check_token_read, check_write
from .cpu_attention import cpu_gap
from .resident import plain_copy, resident_rows
from .store import KVStore, lookup

NONE = (0, 0, 1, -1)   # an assemble's residency (r, num, den, cap) when nothing is resident


def resolve(handle: torch.Tensor) -> KVStore:
    """The store behind a handle tensor, without reading the tensor when it is the store's own
    (made whole if the throughput schedule split it into micro-batch parts)."""
    store = KVStore.by_handle_id(id(handle))
    return store.whole() if store is not None and store.handle is handle else lookup(handle)


# ---- CPU (synchronous) ---------------------------------------------------------------------
def _moved_to(device):
    """Where a CPU-path read puts its result: None (the store's own memory) for the CPU."""
    if device is None or (device.type if isinstance(device, torch.device)
                          else torch.device(device).type) == "cpu":
        return None
    return device


def cpu_load_tokens(store: KVStore, layer: int, end: int, specs, device,
                    start: int = 0) -> list[torch.Tensor]:
    """The store's records [start, end) (views on CPU: no copy)."""
    check_token_read(store, layer, end, specs)
    return store.read_tokens(layer, end, specs, _moved_to(device), start)


def cpu_load_kv(store: KVStore, layer: int, start: int, end: int, batch: int, heads: int,
                head_dim: int, dtype, device):
    """The store's K,V [start, end) as (b, heads, n, d) views (on CPU: no copy)."""
    check_read(store, layer, end, batch, heads, head_dim, dtype, device)
    return store.read_kv(layer, start, end, _moved_to(device))


def _records(t: torch.Tensor, tdim: int, n: int) -> torch.Tensor:
    """Per-token records ``(n, *record_shape)`` of a recompute input with token dim ``tdim``."""
    if tdim < 0:  # no token dimension: the same record for every token
        return t.unsqueeze(0).expand(n, *t.shape)
    return t.movedim(tdim, 0).unsqueeze(tdim + 1)


def records(inputs, tdims, n: int) -> list[torch.Tensor]:
    """Per-token records of the recompute inputs (``_records``); one new token (decode): the
    input itself with a leading axis, whatever its token dim (a size-1 axis moved is the same)."""
    if n == 1:
        return [t.unsqueeze(0) for t in inputs]
    return [_records(t, d, n) for t, d in zip(inputs, tdims)]


def links_of(shared) -> tuple:
    """``(index, owner, owner_index)`` triples from a flat list (the ops' schema form)."""
    return tuple(tuple(shared[i:i + 3]) for i in range(0, len(shared or ()), 3))


def _store(store: KVStore, layer: int, pos: int, k, v, inputs, tdims, links=()) -> None:
    check_write(store, layer, pos, k, v)
    store.write_kv(layer, pos, k, v)
    if k.shape[2] == 1:   # decode: each input is its own record
        store.write_token(layer, pos, inputs, links)
    else:
        store.write_tokens(layer, pos, records(inputs, tdims, k.shape[2]), links)


def cpu_store_assemble(store: KVStore, layer: int, pos: int, inputs, tdims,
                       k_rec, v_rec, k_load, v_load, k_new, v_new, links=(), residency=NONE,
                       start: int = 0, cpu_len: int = 0):
    """store_tokens then assemble, as the two ops do them."""
    _store(store, layer, pos, k_new, v_new, inputs, tdims, links)
    return cpu_assemble(store, layer, k_rec, v_rec, k_load, v_load, k_new, v_new, residency,
                        start=start, cpu_len=cpu_len)


def cpu_store(store: KVStore, layer: int, pos: int, k_new, v_new, inputs, tdims, links=()) -> None:
    _store(store, layer, pos, k_new, v_new, inputs, tdims, links)


def cpu_assemble(store: KVStore, layer: int, k_rec, v_rec, k_load, v_load, k_new, v_new,
                 residency=NONE, start: int = 0, cpu_len: int = 0):
    """resident [0, r) ++ recomputed [r, r + l) ++ loaded [r + l, past - cpu_len) ++ zeros
    where the CPU attends, [past - cpu_len, past) (``cpu_gap``) ++ new; a sliding window's
    (``start`` > 0, nothing resident): the same from ``start`` on."""
    r = residency[0]
    k_rec, v_rec = store.stored_where_uncovered(layer, r + start, k_rec, v_rec, k_new.device)
    past = r + start + k_rec.shape[2] + k_load.shape[2] + cpu_len
    held = resident_rows(store, layer, residency, past, plain_copy)
    gap = cpu_gap(k_new, cpu_len)
    if held is not None:
        store.resident.append(layer, past, k_new, v_new, plain_copy)
        return (torch.cat([held[0], k_rec, k_load, *gap, k_new], dim=2),
                torch.cat([held[1], v_rec, v_load, *gap, v_new], dim=2))
    if gap:
        return (torch.cat([k_rec, k_load, *gap, k_new], dim=2),
                torch.cat([v_rec, v_load, *gap, v_new], dim=2))
    if not k_load.shape[2]:   # ratio 1: nothing loaded
        return torch.cat([k_rec, k_new], dim=2), torch.cat([v_rec, v_new], dim=2)
    return torch.cat([k_rec, k_load, k_new], dim=2), torch.cat([v_rec, v_load, v_new], dim=2)


def cpu_cache_update(store: KVStore, k, v, layer: int, pos: int, start: int = 0):
    check_write(store, layer, pos, k, v)
    store.write_kv(layer, pos, k, v)
    store.invalidate_tokens(layer, pos)
    k_all, v_all = store.read_kv(layer, start, pos + k.shape[2], k.device)
    return k_all.contiguous(), v_all.contiguous()


def cpu_attend(store: KVStore, layer: int, q, start: int, end: int, mask, scale: float,
               scores: int, extras):
    """The CPU's part of a split attention (runtime/cpu_attention.py): synchronous on the CPU
    path, in flight until a wait on the result on CUDA."""
    check_read(store, layer, end, q.shape[0], store.num_kv_heads, q.shape[-1], store.dtype,
               q.device)
    if cuda_runtime.handles(q.device):
        return cuda_runtime.runtime(store, q.device).cpu_attend(store, layer, q, start, end,
                                                                 mask, scale, scores, extras)
    return cpu_attention.attend(store, layer, q, start, end, mask, scale, scores, extras)


# ---- CUDA runtime (streams, events, slots) -------------------------------------------------
def stream_load_tokens(store: KVStore, layer: int, end: int, specs, device, owned: bool,
                       start: int = 0):
    check_token_read(store, layer, end, specs)
    return cuda_runtime.runtime(store, device).load_tokens(store, layer, end, specs, owned,
                                                            start)


def stream_load_kv(store: KVStore, layer: int, start: int, end: int, batch: int, heads: int,
                   head_dim: int, dtype, device, owned: bool):
    check_read(store, layer, end, batch, heads, head_dim, dtype, device)
    return cuda_runtime.runtime(store, device).load_kv(store, layer, start, end, batch, heads,
                                                        head_dim, dtype, owned)


def stream_wait(tensors) -> None:
    cuda_runtime.wait(tensors)


def stream_store_assemble(store: KVStore, layer: int, pos: int, inputs, tdims,
                          k_rec, v_rec, k_load, v_load, k_new, v_new, links=(),
                          staged: bool = False, residency=NONE, start: int = 0,
                          cpu_len: int = 0):
    """store_tokens, then wait for K,V[l:] and assemble. ``staged``: the graph writes a source
    in place later on, so the D2H copy reads runtime-owned copies (see CudaRuntime)."""
    stream_store(store, layer, pos, k_new, v_new, inputs, tdims, links, staged)
    cuda_runtime.wait([k_load, v_load])
    return stream_assemble(store, layer, k_rec, v_rec, k_load, v_load, k_new, v_new, residency,
                           start=start, cpu_len=cpu_len)


def stream_store(store: KVStore, layer: int, pos: int, k_new, v_new, inputs, tdims, links=(),
                 staged: bool = False) -> None:
    check_write(store, layer, pos, k_new, v_new)
    rt = cuda_runtime.runtime(store, k_new.device)
    recs = records(inputs, tdims, k_new.shape[2])
    if staged:
        rt.store_tokens_staged(store, layer, pos, k_new, v_new, recs, links)
    else:
        rt.store_tokens(store, layer, pos, k_new, v_new, recs, inputs, links)


def stream_assemble(store: KVStore, layer: int, k_rec, v_rec, k_load, v_load, k_new, v_new,
                    residency=NONE, start: int = 0, cpu_len: int = 0):
    return cuda_runtime.runtime(store, k_new.device).assemble(store, layer, k_rec, v_rec, k_load,
                                                              v_load, k_new, v_new, residency,
                                                              start=start, cpu_len=cpu_len)


def stream_prefetch_next(store: KVStore, layer: int, past: int, new: int, num: int, den: int, specs,
                         batch: int, heads: int, head_dim: int, dtype, device,
                         residency=(0, 1, -1, False), cpu=(0, 1)) -> None:
    """The next call's loads of ``layer``: its past is this one's plus the ``new`` tokens, split at
    ``num/den`` as the rewrite splits it (``num`` 0: no records loaded) after the resident prefix
    of ``residency`` = (num, den, cap, ratio_of_rest) (``num`` 0: none), its K,V load ending
    where the CPU share ``cpu`` = (num, den) starts (``num`` 0: none). A sliding layer (the
    store's ``windows``) reads its window, as the cache asks it (cache.py): from
    ``past - w + 1`` once the past reaches ``w``, with nothing resident (before that, as any
    layer). The CPU has nothing to prefetch (its loads are views)."""
    end = past + new
    if end > store.max_seq_len:
        return   # a call the cache refuses: nothing to load for it
    w = store.windows[layer] if store.windows else 0
    rnum, rden, rcap, of_rest = residency
    if w and end >= w:   # the next call reads its window [first, end)
        first = r = end - w + 1
        l = split_len(end - first, num, den)
    else:
        first, r = 0, resident_len(end, rnum, rden, rcap) if rnum else 0
        l = split_len(end - r if of_rest else end, num, den)
    kv_end = cpu_start(end, cpu[0], cpu[1], r + l, first) if cpu[0] else end
    cuda_runtime.runtime(store, device).prefetch_next(
        store, layer, l, kv_end, specs if num else None, batch, heads, head_dim, dtype, start=r)


def stream_cache_update(store: KVStore, k, v, layer: int, pos: int, start: int = 0):
    check_write(store, layer, pos, k, v)
    return cuda_runtime.runtime(store, k.device).cache_update(store, k, v, layer, pos, start)
