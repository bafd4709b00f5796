"""The cross-call prefetch with a resident share (passes/prefetch.py, runtime/next_call.py): the
next call's first-layer loads start after that call's resident prefix, so they are the ranges
it asks for and are used. On simulated streams: exact against eager, race-free, every decode
step served by its predecessor's prefetch, with a forced share and with a budget's cap (the
ratio then a share of the part not resident)."""
from __future__ import annotations

import pytest

from helpers import prefetch_served

STEPS = 10
ROW = 2 * 2 * 4 * 16 * 4            # one position's K and V in one layer (batch 2, fp32)
WORKING_SET = 3 * ROW * 97          # two K,V slots and one assembled K,V for 96 + 1 positions
X_SLOTS = 2 * 2 * 64 * 4 * 97       # two X slots for 96 + 1 positions (batch 2, hidden 64)

CASES = {
    "share 0.5, ratio 0": {"ratio": 0.0, "resident_ratio": 0.5},
    "share 0.5, ratio 0.25": {"ratio": 0.25, "resident_ratio": 0.5},
    # 12 tokens per layer resident, then half of the rest recomputed: past 16 passes the cap
    "budget cap 12, ratio 0.5 of the rest": {"ratio": 0.5,
                                             "gpu_budget_bytes": WORKING_SET + X_SLOTS
                                             + 4 * 12 * ROW},
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_step_uses_the_prefetch_of_the_step_before(sim, case):
    options = CASES[case]
    rt = prefetch_served(sim, options, STEPS)
    if options["ratio"] == 0.0:   # K,V only: the prefill's prefetch serves the first step too
        assert rt.next_call_used == STEPS and rt.next_call_dropped == 0
    else:   # the prefill's (K,V only) is dropped by a step that recomputes; then X and K,V
        assert rt.next_call_used == 2 * (STEPS - 1) and rt.next_call_dropped == 1
    assert len(rt.slots.slots) == 2
