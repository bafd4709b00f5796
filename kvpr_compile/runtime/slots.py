"""Device slots: the bounded device-side working set that loads copy into.

A *slot* holds one layer's loaded data for one forward: a K and a V buffer ``(max_seq_len, batch,
num_kv_heads, head_dim)`` (sequence-major like the CPU store, so positions ``[a:b)`` are one
contiguous block) and one buffer ``(max_seq_len, *record)`` per recompute input. Buffers are
allocated on first use and then reused for the life of the cache: each is a flat block, viewed
at the shape a load asks for, so a smaller shape (the throughput schedule's uneven micro-batches
take turns in the same slots) reuses it and only a larger one (or another dtype) reallocates.

The pool hands a slot to a *key* when its first load is issued and takes it back when the key's
``assemble`` (the last reader of everything loaded for it) has been enqueued; the slot's ``free``
event is recorded on the compute stream at that moment, and the next load into the slot must make
the copy stream wait on it. A key is a layer (one store), or ``(part, layer)`` when the
micro-batch parts of a cache share their whole store's pool (the throughput schedule; see
cuda_runtime.runtime). Free slots are reused first-in first-out, so with loads issued one key
ahead the pool holds two slots (double buffering: the slot being read by layer i, or by (layer j,
micro-batch k), and the one being filled for the next); d keys ahead it holds d+1. The
cross-call prefetch (next_call.py) takes its slot from the same pool after the step's last
assemble, so it adds no slot.

``wait`` receives only tensors, so every buffer's storage is registered here (``slot_of``) to
find the slot and the part it belongs to, and with them the ``ready`` event of that part's copy:
the recompute waits for X only, while K,V[l:] may still be in flight.
"""
from __future__ import annotations

import math
from collections import deque

import torch

_BY_STORAGE: dict[tuple[str, int], tuple["Slot", str]] = {}


def _key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def slot_of(t: torch.Tensor) -> "tuple[Slot, str] | None":
    """(slot, part) whose buffer ``t`` is a view of, if any; part is "kv" or "tokens"."""
    return _BY_STORAGE.get(_key(t))


class Slot:
    def __init__(self, device: torch.device, new_event):
        self.device = device
        # copy stream: the last copy of each part into this slot
        self.ready = {"kv": new_event(), "tokens": new_event()}
        self.free = new_event()    # compute stream: the last reader of this slot was enqueued
        self.used = False          # free has been recorded at least once
        self.parts: set[str] = set()   # "kv", "tokens": what was loaded for the current layer
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None   # views of kv_flat
        self.tokens: list[torch.Tensor] = []                        # views of tokens_flat
        self.kv_flat: list[torch.Tensor] = []       # the K and V blocks (allocated memory)
        self.tokens_flat: list[torch.Tensor] = []   # one block per record

    def _adopt(self, old: list[torch.Tensor], new: list[torch.Tensor], part: str = "") -> None:
        for t in old:
            _BY_STORAGE.pop(_key(t), None)
        for t in new:
            _BY_STORAGE[_key(t)] = (self, part)

    def kv_buffers(self, shape: tuple, dtype: torch.dtype) -> tuple[tuple, bool]:
        """(K, V) buffers of ``shape``; whether they were (re)allocated just now."""
        shape = tuple(shape)
        if self.kv is not None and tuple(self.kv[0].shape) == shape and self.kv[0].dtype == dtype:
            return self.kv, False
        numel = math.prod(shape)
        fresh = not _fits(self.kv_flat, [(numel, dtype)] * 2)
        if fresh:
            new = [torch.empty(numel, dtype=dtype, device=self.device) for _ in range(2)]
            self._adopt(self.kv_flat, new, "kv")
            self.kv_flat = new
        self.kv = tuple(flat[:numel].view(shape) for flat in self.kv_flat)
        return self.kv, fresh

    def token_buffers(self, specs: list[tuple[tuple, torch.dtype]], length: int
                      ) -> tuple[list, bool]:
        """One ``(length, *shape)`` buffer per record spec; whether any was (re)allocated."""
        shapes = [(length, *shape) for shape, _ in specs]
        if len(self.tokens) == len(specs) and all(
                tuple(b.shape) == s and b.dtype == dtype
                for b, s, (_, dtype) in zip(self.tokens, shapes, specs)):
            return self.tokens, False
        sizes = [(math.prod(s), dtype) for s, (_, dtype) in zip(shapes, specs)]
        fresh = not _fits(self.tokens_flat, sizes)
        if fresh:
            new = [torch.empty(n, dtype=dtype, device=self.device) for n, dtype in sizes]
            self._adopt(self.tokens_flat, new, "tokens")
            self.tokens_flat = new
        self.tokens = [flat[:n].view(s) for flat, (n, _), s in zip(self.tokens_flat, sizes, shapes)]
        return self.tokens, fresh

    def forget(self) -> None:
        self._adopt([*self.kv_flat, *self.tokens_flat], [])
        self.kv, self.tokens, self.kv_flat, self.tokens_flat = None, [], [], []


def _fits(flat: list[torch.Tensor], sizes: list[tuple[int, torch.dtype]]) -> bool:
    """Whether the flat blocks ``flat`` hold ``sizes`` ((numel, dtype) each) as views."""
    return len(flat) == len(sizes) and all(
        f.dtype == dtype and f.numel() >= n for f, (n, dtype) in zip(flat, sizes))


class SlotPool:
    """Slots of one cache on one device, handed out per key: a layer, or (part, layer) (see the
    module docstring)."""

    def __init__(self, device: torch.device, new_event):
        self.device = device
        self.new_event = new_event
        self.slots: list[Slot] = []
        self.free: deque[Slot] = deque()
        self.held: dict = {}   # key -> the slot its loads went to, until its assemble
        self.next_call = None  # next_call.Prefetched: loads issued for the next call, not yet used

    def take(self, layer, part: str, compute_stream) -> tuple[Slot, bool]:
        """The slot that receives ``part`` of key ``layer``'s loads; whether it must wait on
        ``free``.

        A key loads each part once per forward. Finding the part already loaded means the
        earlier forward never reached its assemble (an exception): that slot is given back first.
        """
        slot = self.held.get(layer)
        if slot is not None and part in slot.parts:
            self.give_back(layer, compute_stream)
            slot = None
        fresh = slot is None
        if fresh:
            if not self.free:
                self.slots.append(Slot(self.device, self.new_event))
                self.free.append(self.slots[-1])
            slot = self.free.popleft()
            self.held[layer] = slot
        slot.parts.add(part)
        return slot, fresh and slot.used

    def give_back(self, layer, compute_stream) -> None:
        """Everything that reads key ``layer``'s slot is enqueued on ``compute_stream``: free it."""
        slot = self.held.pop(layer, None)
        if slot is None:
            return
        slot.free.record(compute_stream)
        slot.used = True
        slot.parts.clear()
        self.free.append(slot)

    def close(self) -> None:
        for slot in self.slots:
            slot.forget()
        self.slots, self.held, self.next_call = [], {}, None
        self.free.clear()
