"""Counts the bytes the runtime loads from the CPU store: what crosses PCIe on a GPU.

    from kvpr_compile.runtime import traffic
    with traffic.counting() as counted:
        ...                      # decode steps, compiled or not
    counted.bytes                # every load from the store, all kinds together
    counted.by_kind              # {"kv": K,V bytes, "tokens": X and side-input bytes}

Each load path calls ``note`` in one line, ``if traffic.ON: traffic.note(kind, *sources)``: the
CPU store's reads (``store.read_kv``, ``store.read_tokens``) and the CUDA runtime's copies
(``CudaRuntime._fill``). With no counter open ``ON`` is False and a load pays one global lookup.
``ON`` is state (whether a counter is open), kept by ``counting``, not a switch to set: the
runtime's switches are in kvpr_compile/config.py.
Counting is per process, not per cache; counters nest (each open one sees every load).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

ON = False
_OPEN: list["Traffic"] = []


@dataclass(eq=False)   # counters are told apart by identity (see counting)
class Traffic:
    by_kind: Counter = field(default_factory=Counter)
    loads: int = 0            # calls of a load path that moved bytes

    @property
    def bytes(self) -> int:
        return sum(self.by_kind.values())


def note(kind: str, *sources) -> None:
    """``sources`` (tensors, or None for nothing read) were loaded from the store."""
    n = sum(t.numel() * t.element_size() for t in sources if t is not None)
    if n:
        for counter in _OPEN:
            counter.by_kind[kind] += n
            counter.loads += 1


@contextlib.contextmanager
def counting():
    """Count every store load made inside the ``with`` block."""
    global ON
    counter = Traffic()
    _OPEN.append(counter)
    ON = True
    try:
        yield counter
    finally:
        _OPEN.remove(counter)
        ON = bool(_OPEN)
