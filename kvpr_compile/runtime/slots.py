"""Device slots: the bounded device-side working set that loads copy into.

A *slot* holds one layer's loaded data for one forward: a K and a V buffer ``(max_seq_len, batch,
num_kv_heads, head_dim)`` (sequence-major like the CPU store, so positions ``[a:b)`` are one
contiguous block) and one buffer ``(max_seq_len, *record)`` per recompute input. Buffers are
allocated on first use and then reused for the life of the cache.

The pool hands a slot to a layer when its first load is issued and takes it back when the layer's
``assemble`` (the last reader of everything loaded for the layer) has been enqueued; the slot's
``free`` event is recorded on the compute stream at that moment, and the next load into the slot
must make the copy stream wait on it. Free slots are reused first-in first-out, so with loads
issued one layer ahead the pool holds two slots (double buffering: the slot being read by layer i
and the one being filled for layer i+1); d layers ahead it holds d+1.

``wait`` receives only tensors, so every buffer's storage is registered here (``slot_of``) to
find the slot and the part it belongs to, and with them the ``ready`` event of that part's copy:
the recompute waits for X only, while K,V[l:] may still be in flight.
"""
from __future__ import annotations

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
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.tokens: list[torch.Tensor] = []

    def _adopt(self, old: list[torch.Tensor], new: list[torch.Tensor], part: str = "") -> None:
        for t in old:
            _BY_STORAGE.pop(_key(t), None)
        for t in new:
            _BY_STORAGE[_key(t)] = (self, part)

    def kv_buffers(self, shape: tuple, dtype: torch.dtype) -> tuple[tuple, bool]:
        """(K, V) buffers of ``shape``; whether they were (re)allocated just now."""
        if self.kv is not None and tuple(self.kv[0].shape) == tuple(shape) and self.kv[0].dtype == dtype:
            return self.kv, False
        new = tuple(torch.empty(shape, dtype=dtype, device=self.device) for _ in range(2))
        self._adopt(list(self.kv or ()), list(new), "kv")
        self.kv = new
        return new, True

    def token_buffers(self, specs: list[tuple[tuple, torch.dtype]], length: int) -> tuple[list, bool]:
        """One ``(length, *shape)`` buffer per record spec; whether any was (re)allocated."""
        if len(self.tokens) == len(specs) and all(
                tuple(b.shape) == (length, *shape) and b.dtype == dtype
                for b, (shape, dtype) in zip(self.tokens, specs)):
            return self.tokens, False
        new = [torch.empty((length, *shape), dtype=dtype, device=self.device) for shape, dtype in specs]
        self._adopt(self.tokens, new, "tokens")
        self.tokens = new
        return new, True

    def forget(self) -> None:
        self._adopt([*(self.kv or ()), *self.tokens], [])
        self.kv, self.tokens = None, []


class SlotPool:
    """Slots of one cache on one device, handed out per layer (see the module docstring)."""

    def __init__(self, device: torch.device, new_event):
        self.device = device
        self.new_event = new_event
        self.slots: list[Slot] = []
        self.free: deque[Slot] = deque()
        self.held: dict[int, Slot] = {}

    def take(self, layer: int, part: str, compute_stream) -> tuple[Slot, bool]:
        """The slot that receives ``part`` of ``layer``'s loads; whether it must wait on ``free``.

        A layer loads each part once per forward. Finding the part already loaded means the
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

    def give_back(self, layer: int, compute_stream) -> None:
        """Everything that reads ``layer``'s slot is enqueued on ``compute_stream``: free it."""
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
        self.slots, self.held = [], {}
        self.free.clear()
