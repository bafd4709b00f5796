"""CUDA implementation of the kvpr:: ops: side streams, events and device slots.

One ``CudaRuntime`` per cache per device owns
- ``h2d``: the copy stream for loads (pinned store -> device slot, one contiguous copy per tensor),
- ``d2h``: the stream for stores (device -> pinned store), so storing never blocks compute,
- the slot pool (``slots.py``): two device slots when loads are issued one layer ahead,
- ``stored[layer]``: event after the latest write of the layer's pinned store; the next load of the
  layer makes the copy stream wait on it,
- ``in_flight``: device tensors a store copy still reads, held until its event completes
  (instead of ``record_stream``),
- ``staging[layer]``: runtime-owned copies of a store's sources, for graphs whose memory may be
  reused before the copy ran (inductor; see ``store_tokens``).

Order of one layer i, loads issued one layer ahead (compute = the current stream):

    compute: ... assemble(i-1) -> record free[s(i-1)]    (slot s(i-1) may now be refilled)
    h2d:     wait free[s(i+1)] (= s(i-1)), wait stored[i+1]; copy X of layer i+1 -> record
             ready[tokens]; copy K,V[l:] of layer i+1 -> record ready[kv]
    compute: wait ready[tokens] of s(i); recompute(i) from the token slot (K,V[l:] may still be
             in flight); wait ready[kv] of s(i)
    d2h:     wait compute; copy layer i's new K, V, X into the pinned store -> record stored[i]
    compute: assemble(i) (concatenate into a fresh tensor) -> record free[s(i)]

Cross-call prefetch (``config.prefetch_next_call``, next_call.py): after the last layer's assemble
the graph asks for its first layer's loads of the next call (``prefetch_next``); they are issued
like layer-ahead loads, into a slot the step no longer reads, and the next call's loads of that
layer use them only if they ask exactly the same and the store did not change in between:

    compute: ... assemble(L-1) -> record free[s(L-1)]; prefetch_next(0)
    h2d:     wait free[s], wait stored[0] (this step's token); copy X, K,V of the next step's
             layer 0 -> record ready[tokens], ready[kv]
    (next call) load_tokens(0), load_kv(0): the prefetched views, or dropped and loaded again

Micro-batch parts (the throughput schedule, store_parts.py): part k of a cache gets a runtime of
its own (its ``d2h``, ``stored`` events and staging), but it shares the whole store's runtime's
``h2d`` stream and slot pool, keyed by ``(k, layer)`` (``config.shared_slots``). The column order
issues (layer j, micro-batch k+1)'s loads while (j, k) computes, so the device holds two micro-batch
slots whatever the number of micro-batches (the planner's working set), and a slot taken by
another part waits on the free event of its last reader exactly as between layers.

Nothing here waits on the host: every dependency is an event between streams. Graphs handed to
inductor load into fresh tensors instead of slots (``owned=True``; see ``load_kv``). All stream and
event calls go through ``API`` so tests can run this logic on CPU with simulated streams.
"""
from __future__ import annotations

import weakref
from collections import deque

import torch

from .. import config
from . import cpu_attention, next_call, traffic
from .resident import resident_rows
from .slots import SlotPool, slot_of


class CudaApi:
    """The few stream/event calls the runtime makes (public torch.cuda API only)."""
    device_type = "cuda"

    def normalize(self, device) -> torch.device:
        device = torch.device(device)
        if device.index is None:
            device = torch.device(device.type, torch.cuda.current_device())
        return device

    def current_stream(self, device):
        return torch.cuda.current_stream(device)

    def new_stream(self, device):
        return torch.cuda.Stream(device=device)

    def use(self, stream):
        return torch.cuda.stream(stream)

    def new_event(self):
        return torch.cuda.Event()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)


API = CudaApi()
_RUNTIMES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # store -> {device: runtime}
_LIVE: "weakref.WeakSet[CudaRuntime]" = weakref.WeakSet()


def handles(device) -> bool:
    """Whether ops on ``device`` run here (CUDA) rather than on the synchronous CPU path."""
    return torch.device(device).type == API.device_type


def runtime(store, device) -> "CudaRuntime":
    device = API.normalize(device)
    per_device = _RUNTIMES.get(store)
    if per_device is None:
        per_device = _RUNTIMES[store] = {}
    rt = per_device.get(device)
    if rt is None:
        owner = store.part_of[0]() if store.part_of is not None else None
        if config.shared_slots and owner is not None:   # a micro-batch part: the whole's pool
            rt = CudaRuntime(store, device, runtime(owner, device), store.part_of[1])
        else:
            rt = CudaRuntime(store, device)
        per_device[device] = rt
    return rt


def wait(tensors: list[torch.Tensor]) -> None:
    """The current stream waits for the copies that filled ``tensors``."""
    seen: set[int] = set()
    waited_all: set = set()   # devices whose copy streams were all waited for
    for t in tensors:
        if not handles(t.device):
            continue
        current = API.current_stream(t.device)
        if cpu_attention.wait_for(t, current):   # a CPU-attention result: its job and copies
            continue
        found = slot_of(t)
        if found is None:   # not a slot view (e.g. copied by functionalization): wait for all loads
            device = API.normalize(t.device)
            if device not in waited_all:   # once per call and copy stream (parts share one)
                waited_all.add(device)
                streams = {id(rt.h2d): rt.h2d for rt in list(_LIVE) if rt.device == device}
                for h2d in streams.values():
                    current.wait_stream(h2d)
        elif id(found[0].ready[found[1]]) not in seen:
            event = found[0].ready[found[1]]
            seen.add(id(event))
            current.wait_event(event)


class CudaRuntime:
    def __init__(self, store, device: torch.device, shared: "CudaRuntime | None" = None,
                 part: int | None = None):
        """``shared``: the runtime whose copy stream and slot pool this one uses (its store's
        whole store's), with slot keys ``(part, layer)``; None: its own, keyed by layer."""
        # no reference to the store: _RUNTIMES is keyed weakly by it
        self.device = device
        self.owner = shared   # held: the pool outlives every runtime that fills its slots
        self.part = part
        self.h2d = shared.h2d if shared is not None else API.new_stream(device)
        self.d2h = API.new_stream(device)
        self.slots = shared.slots if shared is not None else SlotPool(device, API.new_event)
        self.stored: list = [None] * store.num_layers
        self.staging: list[list[torch.Tensor]] = [[] for _ in range(store.num_layers)]
        self.in_flight: deque = deque()
        # in-place assemble: the layer whose slot attention reads
        self.read_later: int | None = None
        # prefetched loads used / prefetches dropped
        self.next_call_used = self.next_call_dropped = 0
        self.cpu = None   # the CPU part of split attentions, made at the first one
        _LIVE.add(self)

    def __del__(self):
        """Device memory this runtime's copies use (slot blocks the loads fill, staging buffers
        and store sources the D2H copies read) returns to the allocator only once those copies
        are done. The host waits for the runtime's own unfinished copies only, by their events:
        a runtime collected late (its copies long done) waits for nothing, even where its
        streams, drawn from torch's stream pool, now carry another runtime's copies."""
        try:
            for event in self._own_events():
                if not event.query():
                    event.synchronize()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to protect
            pass
        if self.owner is None:   # a shared pool is closed by its owner, after every user's copies
            self.slots.close()

    def _own_events(self) -> list:
        """The last event of each kind of copy this runtime issued: a layer's latest store
        (``stored``), the stores still held (``in_flight``) and, for a pool's owner, each slot's
        latest loads (``ready``; a micro-batch part's loads fill its owner's slots)."""
        events = [e for e in self.stored if e is not None]
        events += [e for e, _ in self.in_flight]
        if self.owner is None:
            events += [e for slot in self.slots.slots for e in slot.ready.values()]
        return events

    def key(self, layer: int):
        """The slot pool key of ``layer``'s loads."""
        return layer if self.part is None else (self.part, layer)

    # ---- loads ---------------------------------------------------------------------------
    def _fill(self, layer: int, slot, after_free: bool, new_memory: bool, current, pairs,
              part: str = "kv") -> None:
        """On the copy stream, once the slot is free and the layer's stores landed: dst <- src
        (src None: zeros), then record the slot's ready event. ``slot`` None: the destinations
        are fresh tensors the caller owns (see ``load_kv(owned=True)``)."""
        if after_free:
            self.h2d.wait_event(slot.free)
        if new_memory:   # fresh blocks may still be in use by work queued on the compute stream
            self.h2d.wait_stream(current)
        if self.stored[layer] is not None:
            self.h2d.wait_event(self.stored[layer])
        if traffic.ON: traffic.note(part, *(src for _, src in pairs))  # noqa: E701
        with API.use(self.h2d):
            for dst, src in pairs:
                if src is None:
                    dst.zero_()
                elif dst.numel():
                    API.copy(dst, src)
            if slot is not None:
                slot.ready[part].record(self.h2d)

    def load_kv(self, store, layer: int, start: int, end: int, batch: int, heads: int,
                head_dim: int, dtype: torch.dtype, owned: bool = False):
        """K,V[start:end] as (b, heads, n, d) views of a sequence-major slot, or, ``owned``, of
        fresh tensors: inductor may recycle the memory of any op output after its last use,
        which slot memory must never be; the copy then also waits for the compute stream (no
        overlap with work already queued: the price of handing the graph to inductor)."""
        if dtype != store.dtype:
            raise RuntimeError(f"kvpr: load_kv of layer {layer} asks for {dtype}; "
                               f"the cache holds {store.dtype}")
        current = API.current_stream(self.device)
        want = next_call.kv_want(start, end, batch, heads, head_dim, dtype,
                                 config.assemble_in_place)
        prefetched = next_call.take(self, store, layer, "kv", want, owned, current)
        if prefetched is not None:
            return prefetched
        return self._load_kv(store, layer, start, end, batch, heads, head_dim, dtype, owned,
                             current)

    def _load_kv(self, store, layer, start, end, batch, heads, head_dim, dtype, owned, current):
        n = end - start
        if owned:
            slot, after_free, new_memory = None, False, True
            k, v = (torch.empty((n, batch, heads, head_dim), dtype=dtype, device=self.device)
                    for _ in range(2))
        else:
            slot, after_free = self.slots.take(self.key(layer), "kv", current)
            (k, v), new_memory = slot.kv_buffers((store.max_seq_len, batch, heads, head_dim), dtype)
            if config.assemble_in_place:   # at their own rows: the slot is the layer's whole K,V
                k, v = k[start:], v[start:]
        self._fill(layer, slot, after_free, new_memory, current,
                   [(k[:n], store.k[layer][start:end]), (v[:n], store.v[layer][start:end])])
        return k[:n].permute(1, 2, 0, 3), v[:n].permute(1, 2, 0, 3)

    def load_tokens(self, store, layer: int, end: int, specs: list[tuple[tuple, torch.dtype]],
                    owned: bool = False, start: int = 0):
        """Records [start, end) as (end - start, *record) views of a slot (or fresh tensors,
        ``owned``)."""
        current = API.current_stream(self.device)
        prefetched = next_call.take(self, store, layer, "tokens",
                                    next_call.tokens_want(end, specs, start), owned, current)
        if prefetched is not None:
            return prefetched
        return self._load_tokens(store, layer, end, specs, owned, current, start)

    def _load_tokens(self, store, layer, end, specs, owned, current, start=0):
        stores = store.token_sources(layer, specs)   # None: nothing stored that fits
        n = end - start
        if owned:
            slot, after_free, new_memory = None, False, True
            buffers = [torch.empty((n, *shape), dtype=dtype, device=self.device)
                       for shape, dtype in specs]
        else:
            slot, after_free = self.slots.take(self.key(layer), "tokens", current)
            buffers, new_memory = slot.token_buffers(specs, store.max_seq_len)
        sources = [s[start:end] for s in stores] if stores is not None else [None] * len(buffers)
        self._fill(layer, slot, after_free, new_memory, current,
                   [(b[:n], s) for b, s in zip(buffers, sources)], part="tokens")
        return [b[:n] for b in buffers]

    def prefetch_next(self, store, layer: int, l: int, end: int, specs, batch: int, heads: int,
                      head_dim: int, dtype: torch.dtype, start: int = 0) -> None:
        """Issue ``layer``'s loads of the next call now: records [start, start + l) (``specs``
        None: the layer loads none) and K,V[start + l:end) (``start``: the resident prefix's
        end), into a slot of the pool, kept for ``next_call.take``.
        Called after the step's last assemble, when no slot is read any more but the last
        layer's with ``config.assemble_in_place`` (still held: another one is taken)."""
        current = API.current_stream(self.device)
        next_call.drop(self.slots, current)   # one prefetch at a time
        key = self.key(layer)
        if (not config.prefetch_next_call or key in self.slots.held or end > store.max_seq_len
                or (batch, heads, head_dim, dtype) != (store.batch_size, store.num_kv_heads,
                                                       store.head_dim, store.dtype)
                or (specs and specs[0][0] and specs[0][0][0] != store.batch_size)):
            return   # a slot still read, or a load the next call would refuse: not prefetched
        wants, views = {}, {}
        split = start + l
        if specs is not None:
            wants["tokens"] = next_call.tokens_want(split, specs, start)
            views["tokens"] = self._load_tokens(store, layer, split, specs, False, current, start)
        wants["kv"] = next_call.kv_want(split, end, batch, heads, head_dim, dtype,
                                       config.assemble_in_place)
        views["kv"] = self._load_kv(store, layer, split, end, batch, heads, head_dim, dtype,
                                    False, current)
        self.slots.next_call = next_call.Prefetched(weakref.ref(self), key, layer,
                                                    self.slots.held[key], store.writes, wants,
                                                    views)

    # ---- stores --------------------------------------------------------------------------
    def _retire(self) -> None:
        while self.in_flight and self.in_flight[0][0].query():
            self.in_flight.popleft()

    def _stage(self, layer: int, tensors: list, current) -> list:
        """Copies of ``tensors`` in the layer's runtime-owned staging buffers, made on the
        compute stream. The compute stream first waits for the layer's previous store, the last
        reader of these buffers."""
        bufs = self.staging[layer]
        if ([(tuple(b.shape), b.dtype) for b in bufs]
                != [(tuple(t.shape), t.dtype) for t in tensors]):
            # new shapes (e.g. prefill, then decode): fresh buffers; the old ones stay held in
            # ``in_flight`` by the store that reads them
            bufs = self.staging[layer] = [torch.empty(t.shape, dtype=t.dtype, device=self.device)
                                          for t in tensors]
        elif self.stored[layer] is not None:
            current.wait_event(self.stored[layer])
        for b, t in zip(bufs, tensors):
            API.copy(b, t)
        return bufs

    def store_tokens(self, store, layer: int, pos: int, k, v, records, keep, links=()) -> None:
        """Copy the new tokens' K, V and records into the pinned store on the D2H stream. The
        copy reads its sources after this returns: they are held (``in_flight``), which keeps
        the allocator from reusing them, but nothing stops a compiler that reuses buffers itself
        or an in-place op from overwriting them (see ``store_tokens_staged``)."""
        next_call.drop(self.slots, API.current_stream(self.device))   # its copies may read here
        self.d2h.wait_stream(API.current_stream(self.device))
        with API.use(self.d2h):
            store.write_kv(layer, pos, k, v)
            store.write_tokens(layer, pos, records, links)
            done = API.new_event()
            done.record(self.d2h)
        self.stored[layer] = done
        self.in_flight.append((done, (k, v, *records, *keep)))
        self._retire()

    def store_tokens_staged(self, store, layer: int, pos: int, k, v, records, links=()) -> None:
        """``store_tokens`` from runtime-owned copies of the sources made on the compute stream:
        for callers whose memory may be overwritten before the D2H copy ran (inductor's code
        reuses dead buffers; an in-place op may write a source after the store)."""
        k, v, *records = self._stage(layer, [k, v, *records], API.current_stream(self.device))
        self.store_tokens(store, layer, pos, k, v, records, (), links)

    def cache_update(self, store, k, v, layer: int, pos: int, start: int = 0):
        """The uncompiled contract, stream-ordered on the compute stream (the reference path)."""
        current = API.current_stream(self.device)
        next_call.drop(self.slots, current)   # its copies may read the positions written here
        if self.stored[layer] is not None:
            current.wait_event(self.stored[layer])
        store.write_kv(layer, pos, k, v)
        store.invalidate_tokens(layer, pos)
        done = API.new_event()
        done.record(current)
        self.stored[layer] = done
        k_all, v_all = store.read_kv(layer, start, pos + k.shape[2], k.device)
        return k_all.contiguous(), v_all.contiguous()

    # ---- CPU attention -------------------------------------------------------------------
    def cpu_attend(self, store, layer: int, q, start: int, end: int, mask, scale: float,
                   scores: int = -1, extras=()):
        """The CPU attends to K,V [start, end) of ``layer`` (runtime/cpu_attention.py): device
        tensors (out, lse), ready after a ``wait`` on them."""
        if self.cpu is None:
            self.cpu = cpu_attention.CpuAttention(API, self.device)
        return self.cpu.start(store, self, layer, q, start, end, mask, scale, scores, extras)

    # ---- assemble ------------------------------------------------------------------------
    def assemble(self, store, layer: int, k_rec, v_rec, k_load, v_load, k_new, v_new,
                 residency=(0, 0, 1, -1), start: int = 0, cpu_len: int = 0):
        """Resident ++ recomputed ++ loaded ++ new into fresh tensors (the resident rows read
        in place, once); then the layer's slot is free. ``residency``: (r, num, den, cap);
        ``start``: a sliding window's first position (the recomputed rows begin there);
        ``cpu_len``: the past's last tokens are zeros here (the CPU attends to them)."""
        current = API.current_stream(self.device)
        r, l = residency[0] + start, k_rec.shape[2]
        if store.covered(layer) < r + l or (residency[1] and store.resident.filled[layer] < r):
            # rows read from the store on the compute stream (rare): after the layer's stores
            # (the wait for K,V[r + l:] orders them too: its copy waited for the same event)
            if self.stored[layer] is not None:
                current.wait_event(self.stored[layer])
            k_rec, v_rec = store.stored_where_uncovered(layer, r, k_rec, v_rec, k_new.device)
        past = r + l + k_load.shape[2] + cpu_len
        held = resident_rows(store, layer, residency, past, API.copy)
        in_place = self._in_place(k_load, v_load, start + l) \
            if held is None and not cpu_len else None
        if in_place is not None:
            return self._assemble_in_place(layer, in_place, start, start + l + k_load.shape[2],
                                           k_rec, v_rec, k_new, v_new, current)
        gap = cpu_attention.cpu_gap(k_new, cpu_len)
        parts_k, parts_v = [k_rec, k_load, *gap, k_new], [v_rec, v_load, *gap, v_new]
        if held is not None:
            parts_k.insert(0, held[0])
            parts_v.insert(0, held[1])
        b, h, _, d = k_new.shape
        s = past - start + k_new.shape[2]
        k_all = k_new.new_empty(b, h, s, d)
        v_all = v_new.new_empty(b, h, s, d)
        torch.cat(parts_k, dim=2, out=k_all)
        torch.cat(parts_v, dim=2, out=v_all)
        if held is not None:   # on the compute stream, after this step's reads of the rows
            store.resident.append(layer, past, k_new, v_new, API.copy)
        self.slots.give_back(self.key(layer), current)
        self._retire()
        return k_all, v_all

    def _in_place(self, k_load, v_load, l: int):
        """The slot's (K, V) buffers if K,V[l:] were loaded at their own rows of one (switch on)."""
        if not config.assemble_in_place:
            return None
        found = slot_of(k_load)
        if found is None or found[1] != "kv" or found[0].kv is None:
            return None
        kb, vb = found[0].kv
        n = k_load.shape[2]
        rows = lambda buf: buf[l:l + n].permute(1, 2, 0, 3)  # noqa: E731
        for got, buf in ((k_load, kb), (v_load, vb)):
            want = rows(buf)
            if (got.data_ptr() != want.data_ptr() or got.shape != want.shape
                    or got.stride() != want.stride()):
                return None
        return kb, vb

    def _assemble_in_place(self, layer: int, buffers, start: int, past: int, k_rec, v_rec,
                           k_new, v_new, current):
        """Recomputed rows [start, start + l) and new rows [past, past + n) written into the slot
        around the loaded ones; returns (b, h, past + n - start, d) views of it. Attention reads
        them after this returns, so the slot is given back at the next layer's assemble instead
        of now."""
        l, n = k_rec.shape[2], k_new.shape[2]
        for buf, rec, new in ((buffers[0], k_rec, k_new), (buffers[1], v_rec, v_new)):
            if l:
                buf[start:start + l].copy_(rec.permute(2, 0, 1, 3))
            buf[past:past + n].copy_(new.permute(2, 0, 1, 3))
        if self.read_later not in (None, layer):   # that layer's attention is enqueued by now
            self.slots.give_back(self.key(self.read_later), current)
        self.read_later = layer
        self._retire()
        return (buffers[0][start:past + n].permute(1, 2, 0, 3),
                buffers[1][start:past + n].permute(1, 2, 0, 3))
