"""A resident share under ``inner="inductor"``: the loads go into owned tensors (inductor may
recycle op outputs), the resident rows are still read in place by the assemble. Exact against
eager on the CPU path and on simulated streams, with a forced share and with a budget's cap."""
from __future__ import annotations

import pytest
import torch

from helpers import decode_seeded, tiny_llama, worst_rel_err

TOL = 1e-5
STEPS = 8
ROW = 2 * 2 * 4 * 16 * 4            # one position's K and V in one layer (batch 2, fp32)
BUDGET = 3 * ROW * 97 + 2 * 2 * 64 * 4 * 97 + 2 * 8 * ROW   # slots, X slots, 8 tokens a layer


@pytest.mark.parametrize("on_streams,options,held", [
    (False, {"ratio": 0.5, "resident_ratio": 0.5}, 6 + STEPS),
    pytest.param(True, {"ratio": 0.5, "gpu_budget_bytes": BUDGET}, 8,
                 marks=pytest.mark.slow)])
def test_inductor_with_a_resident_share(monkeypatch, on_streams, options, held):
    """Inductor compiles are slow on a CPU: one case per path (the CPU path with a forced
    share, the CUDA runtime on simulated streams with a budget's cap)."""
    if on_streams:
        from kvpr_compile.runtime import cuda_runtime
        from sim_streams import SimApi
        monkeypatch.setattr(cuda_runtime, "API", SimApi())
    model = tiny_llama(layers=2)
    ref = decode_seeded(model, model.make_cache(2, 96), STEPS)
    compiled = torch.compile(model, backend="kvpr", options={**options, "inner": "inductor"})
    cache = model.make_cache(2, 96)
    out = decode_seeded(model, cache, STEPS, compiled)
    assert worst_rel_err(out[0], ref[0]) <= TOL
    assert torch.equal(out[1], ref[1])
    assert cache._store.resident.filled == [held] * 2
