"""Graphs that add several tokens on a non-empty past (chunked prefill, speculative verification, a
chat's next turn) recompute K,V[:l] of the past like decode graphs do.

Each model runs a prefill, a 3-token and a 5-token chunk, decode steps, then a 4-token chunk (the
next turn), compared to eager (max relative error of logits <= 1e-5, fp32). With the stored K/V
poisoned after the prefill at ratio 1.0 every later call must still match: a chunk that loaded
the past (today's fallback) would show NaN. Chunks of other sizes on a non-empty past share one
graph (Dynamo's one dynamic recompile), counted with the backend's reports as test_shapes does.
"""
from __future__ import annotations

import pytest
import torch

import kvpr_compile
from kvpr_compile.models import TinyLlamaConfig, build_tiny_llama
from helpers import chunk_tokens, conversation, nan_kv, worst_rel_err
from custom_models import ComplexRopeModel, make_cache
from padded_models import PaddedAlibiModel, make_padded_cache

transformers = pytest.importorskip("transformers")
from kvpr_compile.hf import KVPRCache, cache_kwargs  # noqa: E402

TOL = 1e-5
GRAPHS = 3   # static prefill on an empty past; one dynamic multi-token graph; one decode graph


# ---- models: (build, call(model, tokens, cache), new cache, poison) ----------------------------
def _tiny_llama():
    cfg = TinyLlamaConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=48, max_seq_len=64)
    model = build_tiny_llama(cfg, seed=1)
    return model, lambda m: m, lambda: model.make_cache(2, 40), lambda c: nan_kv(c.k_cpu, c.v_cpu)


def _complex_rope():
    torch.manual_seed(2)
    model = ComplexRopeModel().eval()
    return model, lambda m: m, lambda: make_cache(model, 2, 40), lambda c: nan_kv(c.k_cpu, c.v_cpu)


def _hf(arch, layers=2, **kw):
    def build():
        cfg = transformers.AutoConfig.for_model(arch, vocab_size=128, num_hidden_layers=layers,
                                                **kw)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()

        def call(forward):
            return lambda ids, cache: forward(input_ids=ids, **cache_kwargs(model, cache),
                                              use_cache=True).logits
        return (model, call, lambda: KVPRCache(model.config, 2, 40),
                lambda c: nan_kv(c.offloaded.k_cpu, c.offloaded.v_cpu))
    return build


MODELS = {
    "tiny-llama": _tiny_llama,     # cos/sin side inputs indexed by position
    "complex-rope": _complex_rope,  # complex frequencies, manual attention
    "hf-qwen2-gqa": _hf("qwen2", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2),
    "hf-opt": _hf("opt", hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
                  max_position_embeddings=128),     # learned positions: no side inputs
    "hf-bloom": _hf("bloom", hidden_size=64, n_head=4),   # ALiBi, fused QKV
    "hf-gpt2": _hf("gpt2", layers=1, n_embd=64, n_head=4, n_positions=128),  # x.size()[:-1] + (nf,)
}


def _setup(name):
    model, wrap, new_cache, poison = MODELS[name]()
    hf = isinstance(model, transformers.PreTrainedModel)
    eager = wrap(model.forward) if hf else model

    def compiled(ratio):
        if hf:
            model.forward = torch.compile(type(model).forward.__get__(model), backend="kvpr",
                                          options={"ratio": ratio})
            return wrap(model.forward)
        return torch.compile(model, backend="kvpr", options={"ratio": ratio})
    return eager, compiled, new_cache, poison


def _chunk_reports(reports, recomputing=True):
    """Reports of multi-token graphs on a non-empty past (that recompute, if ``recomputing``)."""
    prefix = "multi-token graph: recomputes" if recomputing else "multi-token graph:"
    return [r for r in reports if any(e.note.startswith(prefix) for e in r.layers)]


DEFAULT_EXACT = set()   # fractional ratios by default: the padded test; all with --run-slow
DEFAULT_POISONED = {"hf-qwen2-gqa", "hf-gpt2"}   # tiny-llama: test_runtime_sim.py


def _cases(names, default, with_ratio):
    return [pytest.param(*((name, r) if with_ratio else (name,)),
                         marks=() if ((name, r) if with_ratio else name) in default
                         else pytest.mark.slow,
                         id=f"{name}-{r}" if with_ratio else name)
            for name in sorted(names) for r in ((0.0, 0.5) if with_ratio else (None,))]


@pytest.mark.parametrize("name,ratio", _cases(MODELS, DEFAULT_EXACT, True))
def test_chunks_on_a_past_recompute_exactly(name, ratio):
    """Against eager; the same chunk graph serves every chunk size on a non-empty past."""
    eager, compiled, new_cache, _ = _setup(name)
    ref = conversation(eager, new_cache())
    first = len(kvpr_compile.reports())
    out = conversation(compiled(ratio), new_cache())
    assert worst_rel_err(out, ref) <= TOL
    _one_chunk_graph(kvpr_compile.reports()[first:], ratio)


def _one_chunk_graph(mine, ratio):
    """Three graphs in all, one of them for every chunk on a non-empty past, at ``ratio``."""
    assert len(mine) == GRAPHS, [str(r) for r in mine]   # no graph per chunk size or step
    chunk = _chunk_reports(mine, recomputing=ratio > 0)
    assert len(chunk) == 1 and not chunk[0].skipped
    assert all(r == pytest.approx(ratio) for r in chunk[0].ratios.values())


@pytest.mark.parametrize("name", _cases(MODELS, DEFAULT_POISONED, False))
def test_chunks_on_a_poisoned_past_full_recompute(name):
    """Ratio 1.0 with NaN in every stored K/V after the prefill: the chunks, the decode steps and
    the next turn read none of it."""
    eager, compiled, new_cache, poison = _setup(name)
    ref = conversation(eager, new_cache())
    first = len(kvpr_compile.reports())
    out = conversation(compiled(1.0), new_cache(), poison=poison)
    assert worst_rel_err(out, ref) <= TOL
    _one_chunk_graph(kvpr_compile.reports()[first:], 1.0)


class _TokensTimesHeads(torch.nn.Module):
    """One attention layer whose K goes through ``view(b, n * heads, d)``: a size computed from
    the token count, which the one-token specialisation refuses."""

    def __init__(self, vocab=80, dim=32, heads=4):
        super().__init__()
        self.heads, self.head_dim, self.num_kv_heads = heads, dim // heads, heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.wk, self.wv, self.wq = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, cache):
        b, n = tokens.shape
        x = self.emb(tokens)
        split = (b, n, self.heads, self.head_dim)
        k = self.wk(x).view(b, n * self.heads, self.head_dim).view(split).transpose(1, 2)
        q, v = (p(x).view(split).transpose(1, 2) for p in (self.wq, self.wv))
        k, v = cache.update(0, k, v)
        causal = n > 1 and k.shape[2] == n
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


def test_a_chunk_that_cannot_be_specialised_loads_the_past_and_says_why():
    torch.manual_seed(6)
    model = _TokensTimesHeads().eval()
    new_cache = lambda: kvpr_compile.OffloadedKVCache(1, 2, 40, 4, 8)  # noqa: E731
    ref = conversation(model, new_cache())
    first = len(kvpr_compile.reports())
    kvpr_compile.report._WARNED.clear()
    with pytest.warns(UserWarning, match="computed from the token count"):
        compiled = torch.compile(model, backend="kvpr", options={"ratio": 1.0})
        out = conversation(compiled, new_cache())
    assert worst_rel_err(out, ref) <= TOL
    notes = [e.note for r in kvpr_compile.reports()[first:] for e in r.layers]
    assert any("loads the whole past" in n and "computed from the token count" in n
               for n in notes), notes
    assert "" in notes   # decode steps still recompute


@pytest.mark.slow
@pytest.mark.parametrize("inner", ["inductor", "piecewise"])
def test_chunks_on_a_poisoned_past_under_inductor(inner):
    """The inlined one-token recompute traced by inductor with symbolic l and n."""
    model, _, new_cache, poison = _tiny_llama()
    ref = conversation(model, new_cache())
    first = len(kvpr_compile.reports())
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 1.0, "inner": inner})
    assert worst_rel_err(conversation(compiled, new_cache(), poison=poison), ref) <= TOL
    _one_chunk_graph(kvpr_compile.reports()[first:], 1.0)


@pytest.mark.slow
def test_static_shapes_chunk_as_long_as_the_batch_and_the_kv_heads(monkeypatch):
    """dynamic=False: the token count is a plain int in the slice (2, like the batch and the KV
    heads of ``view(2, 2, 2, 8)``); the token dim traced from K tells them apart."""
    import helpers
    monkeypatch.setattr(helpers, "CHUNKS", (2, 3))
    model, _, new_cache, poison = _tiny_llama()
    ref = conversation(model, new_cache())
    first = len(kvpr_compile.reports())
    compiled = torch.compile(model, backend="kvpr", dynamic=False, options={"ratio": 1.0})
    assert worst_rel_err(conversation(compiled, new_cache(), poison=poison), ref) <= TOL
    assert len(_chunk_reports(kvpr_compile.reports()[first:])) == 3   # 2, 3 and the next turn's 4


@pytest.mark.parametrize("ratio,poison", [(0.37, False),
                                          pytest.param(1.0, True, marks=pytest.mark.slow)])
def test_left_padded_batch_chunk_recomputes_with_each_rows_positions(ratio, poison):
    """Row 0 left-padded: per-row learned positions in X and a per-row key mask with ALiBi. The
    chunk on the padded past recomputes K,V[:l] in the right order at a fractional ratio and
    under poison at 1.0."""
    torch.manual_seed(4)
    model = PaddedAlibiModel().eval()
    pad = torch.tensor([3, 0])

    def call(m):
        return lambda tokens, cache: m(tokens, cache, pad)

    def padded(m, cache, poison=None):
        prompt = chunk_tokens(2, 9, 21)
        prompt[0, :3] = 0
        with torch.no_grad():
            outs = [m(prompt, cache, pad)]
            if poison:
                nan_kv(cache.k_cpu, cache.v_cpu)
            outs += conversation(call(m), cache)   # chunks and steps on the padded past
        return outs

    ref = padded(model, make_padded_cache(model, 2))
    first = len(kvpr_compile.reports())
    out = padded(torch.compile(model, backend="kvpr", options={"ratio": ratio}),
                 make_padded_cache(model, 2), poison)
    assert worst_rel_err(out, ref) <= TOL
    assert _chunk_reports(kvpr_compile.reports()[first:])


@pytest.mark.slow
def test_hf_left_padded_rows_recompute_the_past_with_their_stored_positions():
    """HF Llama, row 0 left-padded, position_ids given per row in every call: the RoPE records of
    the past come from the store (each row's own positions), not from this call's positions."""
    model, wrap, _, _ = _hf("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=4)()
    ids = chunk_tokens(2, 8, 5, vocab=128)
    ids[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0

    @torch.no_grad()
    def run(forward, poison):
        cache, att = KVPRCache(model.config, 2, 40), mask
        outs = []
        # the prefill, 2 chunks, a step
        chunks = [ids, *(chunk_tokens(2, n, n, 128) for n in (3, 5, 1))]
        for i, chunk in enumerate(chunks):
            att = att if i == 0 else torch.cat([att, torch.ones_like(chunk)], 1)
            pos = (att.cumsum(-1) - 1).clamp_min(0)[:, -chunk.shape[1]:]
            outs.append(forward(input_ids=chunk, attention_mask=att, position_ids=pos,
                                **cache_kwargs(model, cache), use_cache=True).logits)
            if i == 0 and poison:
                nan_kv(cache.offloaded.k_cpu, cache.offloaded.v_cpu)
        return outs

    ref = run(model.forward, False)
    first = len(kvpr_compile.reports())
    model.forward = torch.compile(model.forward, backend="kvpr", options={"ratio": 1.0})
    assert worst_rel_err(run(model.forward, True), ref) <= TOL
    assert _chunk_reports(kvpr_compile.reports()[first:])
