"""A latency graph placed under ``gpu_budget_bytes`` and reused by a cache of more positions
(stages/budget_guard.py): the working set grows with the capacity while the resident tokens
stay, so a cache the budget cannot hold any more is refused before anything is written, in
words naming the numbers; one it still holds, or a smaller one, runs exactly."""
from __future__ import annotations

import pytest
import torch

from helpers import decode_seeded, tiny_llama, worst_rel_err

TOL = 1e-5
LAYERS, ROW = 4, 2 * 2 * 4 * 16 * 4   # tiny_llama: one position's K,V of one layer (b 2, fp32)


def _working_set(positions):
    """Two K,V slots and one assembled K,V of positions + 1 (no X slots: ratio 0)."""
    return 3 * ROW * (positions + 1)


def _compiled(options, positions):
    model = tiny_llama(layers=LAYERS)
    compiled = torch.compile(model, backend="kvpr", options=options)
    ref = decode_seeded(model, model.make_cache(2, positions), 4)
    out = decode_seeded(model, model.make_cache(2, positions), 4, compiled)
    assert worst_rel_err(out[0], ref[0]) <= TOL and torch.equal(out[1], ref[1])
    return model, compiled


@pytest.mark.parametrize("how", ["even", "planned"])
def test_a_larger_cache_past_the_budget_is_refused_before_anything_is_written(how):
    budget = _working_set(48) + 10 * LAYERS * ROW   # 48 positions and 10 resident per layer
    options = {"gpu_budget_bytes": budget, "profile": "h200-pcie5"}
    if how == "even":
        options["ratio"] = 0.0
    model, compiled = _compiled(options, 48)
    cache = model.make_cache(2, 96)
    with pytest.raises(ValueError, match=r"was met for caches of 48 positions") as err:
        decode_seeded(model, cache, 2, compiled)
    assert "a cache of 96 needs" in str(err.value) and "nothing was written" in str(err.value)
    assert cache.seq_len(0) == 0 and cache._store.written == [0] * LAYERS
    smaller = model.make_cache(2, 32)   # fewer positions than placed: runs
    ref = decode_seeded(model, model.make_cache(2, 32), 4)
    out = decode_seeded(model, smaller, 4, compiled)
    assert worst_rel_err(out[0], ref[0]) <= TOL and torch.equal(out[1], ref[1])


def test_a_larger_cache_the_budget_still_holds_runs():
    """A quarter of the past resident, capped at 12 tokens (a quarter of 48): at 96 positions the
    budget still holds the larger slots and the same 12 tokens per layer."""
    budget = _working_set(96) + 12 * LAYERS * ROW
    options = {"gpu_budget_bytes": budget, "ratio": 0.0, "resident_ratio": 0.25}
    model, compiled = _compiled(options, 48)
    ref = decode_seeded(model, model.make_cache(2, 96), 4)
    out = decode_seeded(model, model.make_cache(2, 96), 4, compiled)
    assert worst_rel_err(out[0], ref[0]) <= TOL and torch.equal(out[1], ref[1])
