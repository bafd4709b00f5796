"""Assemble in place (``config.assemble_in_place``, off by default): K,V[l:] are loaded at
their own rows of the device slot, the recomputed rows and the new token are written around them
and attention reads the slot, with no copy into a fresh tensor. Checked on the CUDA runtime's logic
with simulated streams (no GPU here): exact against eager (stored K/V poisoned at ratio 1),
race-free with the slot given back one layer later (three slots), and the attention's K really is
a view of a slot."""
from __future__ import annotations

import pytest
import torch

from helpers import check_race_free, decode_seeded, tiny_llama
from kvpr_compile import config
from kvpr_compile.runtime import cuda_runtime
from kvpr_compile.runtime.slots import slot_of


@pytest.mark.parametrize("ratio", [0.5, 1.0])
@config.patch(assemble_in_place=True)
def test_in_place_assemble_is_exact_and_race_free(sim, monkeypatch, ratio):
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), 6)
    api = sim()
    assembled = []
    original = cuda_runtime.CudaRuntime._assemble_in_place

    def spy(self, *args):
        out = original(self, *args)
        assembled.append(slot_of(out[0]) is not None and slot_of(out[1]) is not None)
        return out
    monkeypatch.setattr(cuda_runtime.CudaRuntime, "_assemble_in_place", spy)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": ratio})
    cache = model.make_cache(2, 96)
    out = decode_seeded(model, cache, 6, compiled, poison=ratio == 1.0)
    check_race_free(api, ref, out)
    assert assembled and all(assembled)   # every decode layer read its slot in place
    rt = cuda_runtime.runtime(cache._store, "cpu")
    assert len(rt.slots.slots) == 3       # the slot attention reads is kept one layer longer
    assert rt.next_call_used >= 2 * 4     # cross-call prefetch into a third slot, read in place
