"""Side inputs every layer computes alike (RoPE cos/sin) are stored once per graph: the first
storing layer owns the record, later layers link to it (passes/shared_inputs.py, store ``links``).
Results equal eager (<= 1e-5, identical tokens), also with the stored K/V poisoned at ratio 1;
the store holds the shared rows once (bytes); layers whose side inputs differ keep their own.
Bytes at Llama-2-7B dims come from the same layout rule (``layout_bytes``), checked against a
real store here."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import decode_steps, max_rel_err, worst_rel_err
from custom_models import ComplexRopeModel, make_cache
from kvpr_compile import OffloadedKVCache
from kvpr_compile.runtime.store import layout_bytes

transformers = pytest.importorskip("transformers")
from kvpr_compile.hf import KVPRCache, cache_kwargs  # noqa: E402

TOL = 1e-5
STEPS = 4
LAYERS = 3


def _prompt(batch=2, n=7):
    return torch.randint(0, 89, (batch, n), generator=torch.Generator().manual_seed(5))


class HFCall(nn.Module):
    """``model(tokens, cache)`` -> logits for an HF causal LM over a KVPRCache's store."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, ids, cache):
        return self.hf(input_ids=ids, **cache_kwargs(self.hf, cache.owner), use_cache=True).logits


def hf_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=128, num_hidden_layers=LAYERS)
    model = HFCall(transformers.AutoModelForCausalLM.from_config(cfg).eval())

    def new_cache(batch):
        cache = KVPRCache(model.hf.config, batch, 64, dtype=torch.float32)
        cache.offloaded.owner = cache   # decode_steps passes the OffloadedKVCache; HF wants this
        return cache.offloaded
    return model, new_cache


def complex_rope():
    torch.manual_seed(2)
    model = ComplexRopeModel().eval()
    return model, lambda b: make_cache(model, b, 64)


MODELS = {"hf-llama": hf_llama, "complex-rope": complex_rope}


def _exact_cache(model, new_cache, ratio):
    """Decode compiled at ``ratio`` (stored K/V poisoned at 1.0), check against eager, return
    the cache."""
    ref = decode_steps(model, _prompt(), new_cache(2), STEPS)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": ratio})
    cache = new_cache(2)
    out = decode_steps(compiled, _prompt(), cache, STEPS, poison=ratio == 1.0)
    assert max_rel_err(out[0], ref[0]) <= TOL
    assert worst_rel_err(out[1], ref[1]) <= TOL and torch.equal(out[2], ref[2])
    return cache


@pytest.mark.parametrize("name,ratio", [   # HF Llama at 0.5 (a repeat of complex-rope's): slow
    (name, ratio) if name != "hf-llama" or ratio == 1.0
    else pytest.param(name, ratio, marks=pytest.mark.slow)
    for name in sorted(MODELS) for ratio in (0.5, 1.0)])
def test_shared_side_inputs_are_stored_once_and_exact(name, ratio):
    model, new_cache = MODELS[name]()
    cache = _exact_cache(model, new_cache, ratio)
    store = cache._store
    assert store.links[0] == () and all(store.links[i] for i in range(1, cache.num_layers))
    assert all(owner == 0 for links in store.links for _, owner, _ in links)
    # each later layer keeps X only; the shared records' rows exist once, in layer 0
    assert [len(own) for own in store.tokens[1:]] == [1] * (cache.num_layers - 1)
    sides = [tuple(t.shape[1:]) for t in store.tokens[0][1:]]
    x = tuple(store.tokens[0][0].shape[1:])
    geometry = (cache.num_layers, cache.max_seq_len, cache.batch_size, cache.num_kv_heads,
                cache.head_dim, 4, x, sides)
    assert store.nbytes() == layout_bytes(*geometry, shared=True)
    per_layer = layout_bytes(*geometry, shared=False)
    assert per_layer["sides"] == cache.num_layers * store.nbytes()["sides"] > 0


def test_shared_record_poisoned_in_the_owner_reaches_every_layer():
    """The links are real: NaN in layer 0's cos/sin rows shows in every later layer's
    recompute (ratio 1, K/V poisoned too so nothing else could feed attention)."""
    model, new_cache = complex_rope()
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 1.0})
    cache = new_cache(2)
    with torch.no_grad():
        compiled(_prompt(), cache)
        store = cache._store
        assert store.links[1]
        for index, owner, owner_index in store.links[1]:
            store.tokens[owner][owner_index].fill_(float("nan"))
        store.tokens[0][0].fill_(0.0)   # layer 0's own X: finite, so NaN can only come via the link
        out = compiled(_prompt()[:, :1], cache)
    assert torch.isnan(out).any()


class PerLayerRope(nn.Module):
    """Two layers with RoPE of different bases: each computes its own cos/sin from its own
    inverse frequencies, so nothing is shared (and sharing would be wrong)."""

    def __init__(self, hidden=32, heads=2, vocab=89, bases=(10_000.0, 500.0)):
        super().__init__()
        self.heads, self.dim = heads, hidden // heads
        self.embed = nn.Embedding(vocab, hidden)
        self.qkv = nn.ModuleList(nn.Linear(hidden, 3 * hidden, bias=False) for _ in bases)
        self.out = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in bases)
        for i, base in enumerate(bases):
            inv = 1.0 / base ** (torch.arange(0, self.dim, 2).float() / self.dim)
            self.register_buffer(f"inv_freq{i}", inv, persistent=False)
        self.head = nn.Linear(hidden, vocab, bias=False)

    @staticmethod
    def _rotate(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def forward(self, ids, cache: OffloadedKVCache):
        b, n = ids.shape
        h = self.embed(ids)
        pos = torch.arange(n, device=ids.device) + cache.seq_len(0)
        for i, (qkv, out) in enumerate(zip(self.qkv, self.out)):
            angles = pos[:, None].float() * getattr(self, f"inv_freq{i}")[None, :]
            emb = torch.cat([angles, angles], dim=-1)
            cos, sin = emb.cos()[None, None], emb.sin()[None, None]
            q, k, v = (t.view(b, n, self.heads, self.dim).transpose(1, 2)
                       for t in qkv(h).chunk(3, dim=-1))
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            k_all, v_all = cache.update(i, k, v)
            a = nn.functional.scaled_dot_product_attention(q, k_all, v_all, is_causal=n > 1)
            h = h + out(a.transpose(1, 2).reshape(b, n, -1))
        return self.head(h)


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_layers_with_their_own_side_inputs_keep_their_own_records(ratio):
    torch.manual_seed(4)
    model = PerLayerRope().eval()
    store = _exact_cache(model, lambda b: OffloadedKVCache(2, b, 64, model.heads, model.dim),
                         ratio)._store
    assert store.links == [(), ()] and [len(own) for own in store.tokens] == [3, 3]


def test_store_bytes_at_llama2_7b_dims():
    """Per token of context at batch 1, fp16, 32 layers, hidden 4096, 32 heads of 128: RoPE's
    cos and sin records (1, 1, 1, 128) each, as HF Llama stores them. Per layer they add 512 B to
    X's 8 KiB (+2.1% on K+V+X); stored once, 512 B for the whole model (+0.07%)."""
    seven_b = dict(num_layers=32, max_seq_len=1, batch=1, num_kv_heads=32, head_dim=128,
                   element_size=2, x_record=(1, 1, 4096), side_records=[(1, 1, 1, 128)] * 2)
    before, after = layout_bytes(**seven_b, shared=False), layout_bytes(**seven_b, shared=True)
    kvx = before["kv"] + before["x"]
    assert (before["kv"], before["x"]) == (32 * 2 * 32 * 128 * 2, 32 * 4096 * 2)
    assert before["sides"] == 32 * 512 and after["sides"] == 512
    assert round(100 * before["sides"] / kvx, 2) == 2.08
    assert round(100 * after["sides"] / kvx, 3) == 0.065


def test_a_linked_layer_recomputes_only_where_its_owner_holds_rows():
    """``covered``: a layer reading layer 0's record can recompute positions both hold."""
    from kvpr_compile.runtime.geometry import CacheGeometry
    from kvpr_compile.runtime.store import KVStore
    st = KVStore(CacheGeometry(2, 1, 16, 2, 4, torch.float32, torch.device("cpu")))
    x, cos = torch.zeros(5, 1, 1, 8), torch.zeros(5, 1, 1, 4)
    st.write_tokens(0, 0, [x[:3], cos[:3]])
    st.write_tokens(1, 0, [x], links=((1, 0, 1),))
    assert st.token_len == [3, 5] and st.covered(1) == 3
    specs = [((1, 1, 8), torch.float32), ((1, 1, 4), torch.float32)]
    assert st.token_sources(1, specs)[1] is st.tokens[0][1]
    st.invalidate_tokens(0, 1)   # an uncompiled write over layer 0's position 1
    assert st.covered(1) == 1
