"""Runtime switches of kvpr_compile: behaviours that can be turned on or off for a process.

Each switch is a module attribute, read where it is used (``config.shared_slots``), never copied
at import, so a change takes effect at the next op call. Change them for a block (or a test)
with ``patch``, which restores the old values on exit and refuses names that are no switch:

    from kvpr_compile import config
    with config.patch(assemble_in_place=True):
        ...
    @config.patch(prefetch_next_call=False)
    def test_something(): ...

What each switch does and why it has its default: docs/design.md, The runtime. State that the
runtime keeps (``runtime/traffic.py``'s open counters, for one) is not a switch and not here.
"""
from __future__ import annotations

import contextlib
import sys

# K,V[l:] are loaded at their own rows of the device slot, the recomputed and new rows are written
# around them and attention reads the slot itself: no copy of the loaded rows into a fresh tensor,
# one more slot (it is given back one layer later). Off: the assemble concatenates into a fresh
# tensor (cuda_runtime.CudaRuntime.assemble).
assemble_in_place: bool = False

# Micro-batch parts of a cache share their whole store's copy stream and slot pool (two device
# slots whatever the number of micro-batches). Off: each part fills a pool of its own.
shared_slots: bool = True

# The first layer's loads of the next call are issued at the end of this one (runtime/next_call.py).
# Off: ``prefetch_next`` does nothing and every call loads its first layer when it starts.
prefetch_next_call: bool = True

SWITCHES = ("assemble_in_place", "shared_slots", "prefetch_next_call")


def patch(**changes: bool):
    """The switches set to ``changes`` inside a ``with`` block or a decorated function; unknown
    names raise AttributeError, values that are not bools TypeError (both at once, not on entry)."""
    unknown = sorted(set(changes) - set(SWITCHES))
    if unknown:
        raise AttributeError(f"kvpr_compile.config has no switch {', '.join(unknown)}; "
                             f"switches: {', '.join(SWITCHES)}")
    for name, value in changes.items():
        if not isinstance(value, bool):
            raise TypeError(f"kvpr_compile.config.{name} is a bool, got {value!r}")
    return _patched(changes)


@contextlib.contextmanager
def _patched(changes: dict):
    module = sys.modules[__name__]
    saved = {name: getattr(module, name) for name in changes}
    for name, value in changes.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
