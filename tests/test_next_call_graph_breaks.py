"""Cross-call prefetch (runtime/next_call.py) with a graph break between layers, on simulated
streams: each compiled graph of a call has a first layer of its own and prefetches that layer's
loads for the next call, so the pool's pending prefetch is always another graph's. A load may
use it only if it is for the layer, and asks the ranges, the prefetch was issued for.

A 4-layer tiny Llama breaks after layer 1: graph A runs layers 0-1, graph B layers 2-3. The next
call's layer 0 asks exactly the ranges B's prefetch of layer 2 loaded (the same past, the same
split), so only the layer tells them apart. Decode steps are compared with eager (<= 1e-5, the
same tokens) and must be race-free."""
from __future__ import annotations

import pytest
import torch

import kvpr_compile
from helpers import decode_steps, worst_rel_err
from kvpr_compile.models import TinyLlama, TinyLlamaConfig
from kvpr_compile.runtime import cuda_runtime

TOL = 1e-5
LAYERS, BREAK_AFTER, STEPS = 4, 1, 4
PROMPT = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(13))


class LlamaWithABreak(TinyLlama):
    """TinyLlama's forward with a graph break after layer ``BREAK_AFTER`` (what a print or an
    unsupported call in the model makes): two graphs per call, layers 0-1 and 2-3."""

    def forward(self, tokens, cache):
        n = tokens.shape[1]
        pos = cache.seq_len(0)
        positions = torch.arange(pos, pos + n, device=tokens.device)
        cos = self.cos_table[positions][None, None]
        sin = self.sin_table[positions][None, None]
        mask = positions[:, None] >= torch.arange(pos + n, device=tokens.device)[None, :]
        x = self.embed(tokens)
        layers = list(self.layers)
        for layer in layers[:BREAK_AFTER + 1]:   # the break outside loops: Dynamo resumes there
            x = layer(x, cos, sin, mask, cache)
        torch._dynamo.graph_break()
        for layer in layers[BREAK_AFTER + 1:]:
            x = layer(x, cos, sin, mask, cache)
        return self.lm_head(self.norm(x))


def llama_with_a_break():
    cfg = TinyLlamaConfig(vocab_size=97, hidden_size=64, num_layers=LAYERS, num_heads=4,
                          num_kv_heads=4, intermediate_size=96, max_seq_len=96)
    torch.manual_seed(3)
    return LlamaWithABreak(cfg).eval()


@torch.no_grad()
def decode(run, cache):
    """Prefill, then ``STEPS`` greedy steps: (per-step logits, tokens)."""
    return decode_steps(run, PROMPT, cache, STEPS)[1:]


# 0.5 prefetches both K,V and X; 0 (K,V only) and 1 (X only) with --run-slow
@pytest.mark.parametrize("ratio", [pytest.param(0.0, marks=pytest.mark.slow), 0.5,
                                   pytest.param(1.0, marks=pytest.mark.slow)])
def test_each_graphs_prefetch_serves_only_its_own_first_layer(sim_api, ratio):
    """Prefill and decode steps through the two graphs: exact against eager, race-free, with
    the prefetches issued (each graph's, at the end of its last layer)."""
    model = llama_with_a_break()
    ref = decode(model, model.make_cache(2, 96))
    first = len(kvpr_compile.reports())
    compiled = torch.compile(model, backend="kvpr", options={"ratio": ratio})
    cache = model.make_cache(2, 96)
    out = decode(compiled, cache)
    firsts = {min(e.layer for e in r.layers)
              for r in kvpr_compile.reports()[first:] if r.layers}
    assert firsts == {0, BREAK_AFTER + 1}   # two graphs, each with its own first layer
    assert worst_rel_err(out[0], ref[0]) <= TOL and torch.equal(out[1], ref[1])
    assert sim_api.races.found == []
    rt = cuda_runtime.runtime(cache._store, "cpu")
    assert rt.next_call_used + rt.next_call_dropped > 0   # the prefetches were issued
