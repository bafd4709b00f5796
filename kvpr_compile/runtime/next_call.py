"""The cross-call prefetch's bookkeeping: what was loaded for the next call, and when it is used.

At the end of a decode step the graph knows the next step's ranges of its first layer (its past
plus this call's new tokens), so it asks the runtime to load them now (``prefetch_next``, after
the step's last assemble): the copy overlaps the end of this step instead of stalling the start
of the next one. The runtime copies into a slot of its pool as any load does (after the slot's
free event and the layer's stored event, so this step's new token is included) and leaves a
``Prefetched`` on the pool (``SlotPool.next_call``): the slot's key, what each part's load was
asked (``wants``), the views it would return and the store's ``writes`` count.

The next load issued through that pool decides (``take``): a load of the same runtime, key and
part, not ``owned``, asking exactly the same arguments while the store is unchanged, gets the
prefetched views (its ``ready`` event is the prefetch's copy). Anything else drops the
prefetch (``drop``) before it is served as usual: the compute stream waits for the unused copies
(so the slot's memory may be reused or reallocated like that of a slot that was read) and the
slot goes back to the pool unless a part of it is in use. A prefetch nobody asks for is dropped
by the next load, store or prefetch through the pool (a store first: the copies read the store),
or closed with it; it never holds more than one slot.

A graph that loads no X for its first layer (a prefill: nothing to recompute on an empty past)
prefetches K,V only, so the first decode step after it, which recomputes, drops that prefetch
and loads as before; every later step uses the one its predecessor issued.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass


@dataclass
class Prefetched:
    runtime: weakref.ref     # the CudaRuntime that issued it (its store and device)
    key: object              # the slot pool key of its loads
    layer: int
    slot: object             # slots.Slot, held under ``key``
    writes: int              # the store's ``writes`` once the copies were issued
    wants: dict              # part -> the arguments its load must be asked, not yet used
    views: dict              # part -> what that load returns


def kv_want(start: int, end: int, batch: int, heads: int, head_dim: int, dtype,
            in_place: bool) -> tuple:
    """What a K,V load is asked (``in_place``: where in the slot the rows land)."""
    return (start, end, batch, heads, head_dim, dtype, in_place)


def tokens_want(end: int, specs, start: int = 0) -> tuple:
    """What a records load is asked."""
    return (start, end, [(tuple(shape), dtype) for shape, dtype in specs])


def take(rt, store, layer: int, part: str, want: tuple, owned: bool, current):
    """The prefetched views for this load, or None (the prefetch, if any, is then dropped)."""
    pending = rt.slots.next_call
    if pending is None:
        return None
    if (pending.runtime() is rt and pending.layer == layer and not owned
            and pending.writes == store.writes and pending.wants.get(part) == want):
        del pending.wants[part]
        if not pending.wants:
            rt.slots.next_call = None
        rt.next_call_used += 1
        return pending.views.pop(part)
    drop(rt.slots, current)
    return None


def drop(pool, current) -> None:
    """Forget the pool's prefetch: the compute stream waits for its unused copies, and its slot is
    given back unless a used part is still read."""
    pending, pool.next_call = pool.next_call, None
    if pending is None:
        return
    slot = pending.slot
    for part in pending.wants:
        current.wait_event(slot.ready[part])
        slot.parts.discard(part)
    if not slot.parts and pool.held.get(pending.key) is slot:
        pool.give_back(pending.key, current)
    issuer = pending.runtime()
    if issuer is not None:
        issuer.next_call_dropped += 1
