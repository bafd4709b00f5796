"""The cross-call prefetch with a CPU share (passes/prefetch.py, runtime/direct.py): the next
call's first-layer K,V load stops where that call's CPU range starts, so it is the range the
call asks for and is used. On simulated streams: exact against eager, race-free, every decode
step after the first served by its predecessor's prefetch (the prefill, on an empty past, has no
CPU share: its prefetch of the whole past is dropped by the first decode step)."""
from __future__ import annotations

import pytest
import torch

from helpers import check_race_free, decode_seeded, sim_backend, tiny_llama
from kvpr_compile.runtime import cuda_runtime

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
    model = tiny_llama(layers=2)
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    api = sim()
    compiled = torch.compile(model, backend=sim_backend(), options=options)
    cache = model.make_cache(2, 96)
    check_race_free(api, ref, decode_seeded(model, cache, STEPS, compiled))
    rt = cuda_runtime.runtime(cache._store, "cpu")
    parts = 1 if options["ratio"] == 0.0 else 2   # K,V, or X and K,V
    assert rt.next_call_used == parts * (STEPS - 1) and rt.next_call_dropped == 1
    assert len(rt.slots.slots) == 2

