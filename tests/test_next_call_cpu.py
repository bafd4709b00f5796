"""The cross-call prefetch with a CPU share (passes/prefetch.py, runtime/direct.py): the next
call's first-layer K,V load stops where that call's CPU range starts, so it is the range the
call asks for and is used. On simulated streams: exact against eager, race-free, every decode
step after the first served by its predecessor's prefetch (the prefill, on an empty past, has no
CPU share: its prefetch of the whole past is dropped by the first decode step)."""
from __future__ import annotations

import pytest

from helpers import prefetch_served

STEPS = 10
CASES = {
    "cpu-0.25-ratio-0": {"ratio": 0.0, "cpu_ratio": 0.25},
    "cpu-0.25-ratio-0.5": {"ratio": 0.5, "cpu_ratio": 0.25},
    "cpu-0.25-share-0.25-ratio-0.25": {"ratio": 0.25, "cpu_ratio": 0.25,
                                          "resident_ratio": 0.25},
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_step_uses_the_prefetch_of_the_step_before(sim, case):
    options = CASES[case]
    rt = prefetch_served(sim, options, STEPS)
    parts = 1 if options["ratio"] == 0.0 else 2   # K,V, or X and K,V
    assert rt.next_call_used == parts * (STEPS - 1) and rt.next_call_dropped == 1
    assert len(rt.slots.slots) == 2

