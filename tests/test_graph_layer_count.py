"""A graph break that splits the decoder into graphs of some layers each costs the layer-ahead
prefetch across the break: the backend says so once, with Dynamo's break reason, and a graph
that holds every layer of the cache says nothing.

Models: the built-in tiny Llama (one graph), its forward with an explicit
``torch._dynamo.graph_break()`` after layer 1 (two graphs of two layers), and a custom attention
passing ``is_causal=(past == 0)`` to SDPA: a SymBool under dynamic shapes, which SDPA refuses,
so Dynamo breaks at every attention and compiles one-layer graphs. Outputs stay exact."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import kvpr_compile
from helpers import decode_steps, tiny_llama, worst_rel_err
from kvpr_compile import report as report_mod
from kvpr_compile.models import Attention, TinyLlama, rotate_half

TOL = 1e-5
PROMPT = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(5))
SPLIT = "Dynamo split the decoder into several graphs"


@pytest.fixture(autouse=True)
def fresh_warnings():
    report_mod._WARNED.clear()


class CausalFlagAttention(Attention):
    """The tiny Llama's attention with ``is_causal=(past == 0)`` instead of a mask: causal in
    the prefill, every position in a decode step (what the mask says too)."""

    def forward(self, x, cos, sin, mask, cache):
        b, n, _ = x.shape
        past = cache.seq_len(self.layer_idx)
        q = self.wq(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = cache.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=(past == 0))
        return self.wo(y.transpose(1, 2).reshape(b, n, -1))


def causal_flag_llama():
    model = tiny_llama()
    for i, block in enumerate(model.layers):
        attention = CausalFlagAttention(model.cfg, i)
        attention.load_state_dict(block.attn.state_dict())
        block.attn = attention
    return model


class LlamaWithABreak(TinyLlama):
    """The tiny Llama's forward with an explicit graph break after layer 1."""

    def forward(self, tokens, cache):
        n, pos = tokens.shape[1], cache.seq_len(0)
        positions = torch.arange(pos, pos + n)
        cos, sin = self.cos_table[positions][None, None], self.sin_table[positions][None, None]
        mask = positions[:, None] >= torch.arange(pos + n)[None, :]
        x = self.embed(tokens)
        layers = list(self.layers)
        for layer in layers[:2]:
            x = layer(x, cos, sin, mask, cache)
        torch._dynamo.graph_break()
        for layer in layers[2:]:
            x = layer(x, cos, sin, mask, cache)
        return self.lm_head(self.norm(x))


def llama_with_a_break():
    model = LlamaWithABreak(tiny_llama().cfg)
    model.load_state_dict(tiny_llama().state_dict())
    return model.eval()


def compiled_run(model, ratio, **compile_kw):
    """Eager and compiled decode (prefill + 4 steps, the stored K/V poisoned with NaN after the
    prefill when ``ratio`` is 1), the warnings the compiled run raised, and its reports."""
    poison = ratio == 1.0
    ref = decode_steps(model, PROMPT, model.make_cache(2, 96), 4)
    first = len(kvpr_compile.reports())
    compiled = torch.compile(model, backend="kvpr", options={"ratio": ratio}, **compile_kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decode_steps(compiled, PROMPT, model.make_cache(2, 96), 4, poison=poison)
    assert worst_rel_err([out[0], *out[1]], [ref[0], *ref[1]]) <= TOL
    assert torch.equal(out[2], ref[2])
    split = [str(w.message) for w in caught if SPLIT in str(w.message)]
    return split, kvpr_compile.reports()[first:]


@pytest.mark.parametrize("ratio", [0.5, pytest.param(1.0, marks=pytest.mark.slow)])
def test_one_layer_graphs_from_a_symbolic_causal_flag_warn_once_with_the_reason(ratio):
    split, reports = compiled_run(causal_flag_llama(), ratio, dynamic=True)
    held = [sorted(e.layer for e in r.layers) for r in reports if r.layers]
    assert [0] in held and [3] in held and all(len(h) == 1 for h in held)
    assert len(split) == 1, split   # once, not once per graph
    assert "holds 1 of the cache's 4 layers" in split[0]
    assert "is_causal" in split[0] and "SymBool" in split[0]   # Dynamo's reason, quoted
    assert all(any("holds 1 of the cache's 4 layers" in n for n in r.notes)
               for r in reports if r.layers)


def test_an_explicit_graph_break_warns_with_its_reason():
    split, reports = compiled_run(llama_with_a_break(), 0.5)
    assert {tuple(sorted(e.layer for e in r.layers)) for r in reports if r.layers} == {
        (0, 1), (2, 3)}
    assert len(split) == 1 and "holds 2 of the cache's 4 layers" in split[0]
    assert "graph_break" in split[0]


def test_a_graph_with_every_layer_says_nothing():
    split, reports = compiled_run(tiny_llama(), 0.5, dynamic=True)
    assert split == [] and not any("of the cache's" in n for r in reports for n in r.notes)
