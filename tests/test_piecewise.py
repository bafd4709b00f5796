"""inner="piecewise" (runtime/piecewise.py): the lowered graph split at the kvpr steps, the pieces
between them compiled by inductor. Exact against eager (<= 1e-5, identical tokens) on a few tiny
models, NaN-poisoned stored K/V at ratio 1 included; the steps stay uncompiled, in program order."""
from __future__ import annotations

import pytest
import torch

from helpers import (CUSTOM_MODELS, compare_custom, decode_steps, max_rel_err,
                     worst_rel_err)
from kvpr_compile.backend import kvpr_backend
from kvpr_compile.runtime.piecewise import Piece, compile_piecewise, is_step
from kvpr_compile.runtime import direct
from kvpr_compile.runtime.lower import lower

TOL = 1e-5


def check(ref, out):
    assert max_rel_err(out[0], ref[0]) <= TOL
    assert worst_rel_err(out[1], ref[1]) <= TOL
    assert torch.equal(out[2], ref[2])


# inductor compiles C++ on CPU: the default run keeps the split test below (llama-mha at 0.5,
# exact) and test_next_call's piecewise run at ratio 1; the full model list and the poisoned
# fused-QKV model run with --run-slow
@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-mha", pytest.param("fused-qkv", marks=pytest.mark.slow),
                                  pytest.param("complex-rope", marks=pytest.mark.slow),
                                  pytest.param("llama-gqa", marks=pytest.mark.slow)])
def test_piecewise_matches_eager(name):
    check(*compare_custom(name, 0.37, "piecewise"))


@pytest.mark.slow
def test_piecewise_recomputes_from_x_with_poisoned_kv():
    model, new_cache = CUSTOM_MODELS["fused-qkv"]()
    prompt = torch.randint(0, 89, (2, 9), generator=torch.Generator().manual_seed(4))
    ref = decode_steps(model, prompt, new_cache(2), 4)
    full = torch.compile(model, backend="kvpr", options={"ratio": 1.0, "inner": "piecewise"})
    out = decode_steps(full, prompt, new_cache(2), 4, poison=True)
    assert worst_rel_err(out[1], ref[1]) <= TOL and torch.equal(out[2], ref[2])


def test_split_keeps_steps_in_order_and_compiles_only_compute():
    model, new_cache = CUSTOM_MODELS["llama-mha"]()
    splits = []

    def backend(gm, example_inputs, **kwargs):
        kvpr_backend(gm, example_inputs, **kwargs)
        lowered = lower(gm)
        splits.append((lowered, compile_piecewise(lowered)))
        return splits[-1][1].forward

    prompt = torch.randint(0, 89, (2, 7), generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(model, backend=backend, options={"ratio": 0.5})
    out = decode_steps(compiled, prompt, new_cache(2), 3)
    check(decode_steps(model, prompt, new_cache(2), 3), out)
    lowered, split = splits[-1]
    steps = [n.target for n in lowered.graph.nodes if n.op == "call_function" and is_step(n)
             and n.target in (direct.cpu_load_kv, direct.cpu_store_assemble)]
    assert steps == [direct.cpu_load_kv, direct.cpu_load_kv, direct.cpu_store_assemble,
                     direct.cpu_store_assemble]   # layer 1's load before layer 0's assemble
    modules = [getattr(split, n.target) for n in split.graph.nodes if n.op == "call_module"]
    compiled_pieces = [m for m in modules if isinstance(m, Piece)]
    step_pieces = [m for m in modules if not isinstance(m, Piece)]
    assert compiled_pieces and step_pieces
    for piece in step_pieces:   # steps are plain FX with nothing but steps in them
        assert all(is_step(n) for n in piece.graph.nodes if n.op == "call_function")
    assert len(modules) == len(compiled_pieces) + len(step_pieces)
