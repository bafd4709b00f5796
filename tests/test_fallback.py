"""Graphs the backend cannot rewrite run unchanged, exactly, with one warning giving the reason."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kvpr_compile
from kvpr_compile import OffloadedKVCache, report as report_mod

pytestmark = pytest.mark.quick


@pytest.fixture(autouse=True)
def fresh_warnings():
    report_mod._WARNED.clear()


class NoCacheAttention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(c, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(b, n, c)


class ValueWithoutProjection(nn.Module):
    """K is projected, V is the raw embedding: no X -> K,V slice to recompute."""
    def __init__(self, dim=16):
        super().__init__()
        self.emb = nn.Embedding(50, dim)
        self.wk = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 50)

    def forward(self, tokens, cache):
        x = self.emb(tokens)
        b, n, c = x.shape
        k = self.wk(x).view(b, n, 1, c).transpose(1, 2)
        v = x.view(b, n, 1, c).transpose(1, 2)
        k, v = cache.update(0, k, v)
        pos = cache.seq_len(0)
        mask = torch.arange(pos - n, pos)[:, None] >= torch.arange(pos)[None, :]
        y = F.scaled_dot_product_attention(x.view(b, n, 1, c).transpose(1, 2), k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


def test_graph_without_offloaded_cache_is_unchanged_and_warns_once():
    torch.manual_seed(0)
    model = NoCacheAttention().eval()
    x = torch.randn(2, 5, 32)
    compiled = torch.compile(model, backend="kvpr")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="kvpr")
        out2 = compiled(x)
    assert torch.equal(out, model(x)) and torch.equal(out2, model(x))
    msgs = [str(w.message) for w in caught if "OffloadedKVCache" in str(w.message)]
    assert len(msgs) == 1 and "compiled unchanged" in msgs[0]
    rep = kvpr_compile.last_report()
    assert not rep.layers and rep.notes
    assert any("not read from an OffloadedKVCache" in reason for _, reason in rep.skipped)


def test_unsupported_site_is_left_as_plain_read_with_reason():
    torch.manual_seed(0)
    model = ValueWithoutProjection().eval()
    tokens = torch.randint(0, 50, (2, 6))

    def run(m):
        cache = OffloadedKVCache(1, 2, 16, 1, 16)
        with torch.no_grad():
            outs = [m(tokens, cache)]
            for t in range(3):
                outs.append(m(tokens[:, t:t + 1], cache))
        return outs

    ref = run(model)
    with pytest.warns(UserWarning, match="layer 0: no K/V projection"):
        out = run(torch.compile(model, backend="kvpr", options={"ratio": 1.0}))
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    rep = kvpr_compile.last_report()
    assert not rep.layers and len(rep.skipped) == 1
    assert "plain offloaded-cache read" in rep.skipped[0][1]


def test_hf_dynamic_cache_model_falls_back():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        model.forward = torch.compile(model.forward, backend="kvpr")
        with pytest.warns(UserWarning, match="compiled unchanged"):
            out = model(input_ids=ids).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("options,match", [
    ({"ratio": 1.5}, "ratio"), ({"ratio": "half"}, "ratio"), ({"inner": "tvm"}, "inner"),
    ({"bogus": 1}, "unknown option")])
def test_bad_options_are_clear_errors(options, match):
    model = NoCacheAttention()
    with pytest.raises(Exception, match=match):
        torch.compile(model, backend="kvpr", options=options)(torch.randn(1, 3, 32))


def test_cuda_graph_modes_are_ignored_with_a_warning():
    model = NoCacheAttention().eval()
    x = torch.randn(1, 3, 32)
    with pytest.warns(UserWarning, match="reduce-overhead"):
        out = torch.compile(model, backend="kvpr", mode="reduce-overhead")(x)
    assert torch.equal(out, model(x))


class DropoutOnK(nn.Module):
    """Training-mode dropout between the projection and the cache: not reproducible."""
    def __init__(self, dim=16):
        super().__init__()
        self.emb, self.wk, self.wv = nn.Embedding(50, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, tokens, cache):
        x = self.emb(tokens)
        b, n, c = x.shape
        k = F.dropout(self.wk(x), 0.5, training=True).view(b, n, 1, c).transpose(1, 2)
        v = self.wv(x).view(b, n, 1, c).transpose(1, 2)
        k, v = cache.update(0, k, v)
        return (k.sum() + v.sum()).expand(1)


def test_random_ops_in_the_slice_are_not_recomputed():
    model = DropoutOnK()
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 1.0})
    cache = OffloadedKVCache(1, 1, 8, 1, 16)
    with pytest.warns(UserWarning, match="random numbers"):
        compiled(torch.zeros(1, 3, dtype=torch.long), cache)
    assert "random numbers" in kvpr_compile.last_report().skipped[0][1]
