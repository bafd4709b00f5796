"""OffloadedKVCache uncompiled: the reference semantics, layout, and input errors that leave the
cache untouched (also through a compiled model)."""
from __future__ import annotations

import pytest
import torch

from kvpr_compile import OffloadedKVCache
from kvpr_compile.models import TinyLlamaConfig, build_tiny_llama

pytestmark = pytest.mark.quick


def kv(b=2, h=3, n=4, d=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g, dtype=dtype),
            torch.randn(b, h, n, d, generator=g, dtype=dtype))


def test_update_returns_full_history_and_tracks_length_per_layer():
    cache = OffloadedKVCache(num_layers=2, batch_size=2, max_seq_len=16, num_kv_heads=3, head_dim=5)
    k1, v1 = kv(n=4, seed=1)
    k2, v2 = kv(n=1, seed=2)
    k_all, v_all = cache.update(0, k1, v1)
    assert torch.equal(k_all, k1) and torch.equal(v_all, v1)
    k_all, v_all = cache.update(0, k2, v2)
    assert torch.equal(k_all, torch.cat([k1, k2], 2)) and torch.equal(v_all, torch.cat([v1, v2], 2))
    assert cache.seq_len(0) == 5 and cache.seq_len(1) == 0
    # documented layout: (max_seq_len, batch, kv_heads, head_dim), sequence-major
    assert tuple(cache.k_cpu[0].shape) == (16, 2, 3, 5)
    assert torch.equal(cache.k_cpu[0][:4], k1.permute(2, 0, 1, 3))
    assert torch.equal(cache.v_cpu[0][4], v2[:, :, 0])
    cache.reset()
    assert cache.seq_len(0) == 0
    k_all, _ = cache.update(0, k2, v2)
    assert torch.equal(k_all, k2)


def _snapshot(cache):
    return ([t.clone() for t in cache.k_cpu + cache.v_cpu],
            [cache.seq_len(i) for i in range(cache.num_layers)])


@pytest.mark.parametrize("bad,err,match", [
    (lambda k, v: (k[:, :2], v[:, :2]), ValueError, "num_kv_heads=3"),
    (lambda k, v: (k, v[..., :4]), ValueError, "head_dim=5"),
    (lambda k, v: (k[0], v[0]), ValueError, "batch=2"),
    (lambda k, v: (k.double(), v.double()), TypeError, "dtype"),
    (lambda k, v: (k.to("meta"), v.to("meta")), ValueError, "is on meta"),
])
def test_bad_input_raises_and_leaves_cache_unchanged(bad, err, match):
    cache = OffloadedKVCache(2, 2, 8, 3, 5)
    cache.update(0, *kv(n=3))
    before = _snapshot(cache)
    with pytest.raises(err, match=match):
        cache.update(0, *bad(*kv(n=2, seed=3)))
    after = _snapshot(cache)
    assert after[1] == before[1] and all(torch.equal(a, b) for a, b in zip(after[0], before[0]))


def test_overflow_and_bad_layer_raise_and_leave_cache_unchanged():
    cache = OffloadedKVCache(2, 2, 8, 3, 5)
    cache.update(1, *kv(n=6))
    before = _snapshot(cache)
    with pytest.raises(ValueError, match="exceed max_seq_len=8"):
        cache.update(1, *kv(n=3, seed=4))
    with pytest.raises(IndexError, match="out of range"):
        cache.update(2, *kv(n=1))
    after = _snapshot(cache)
    assert after[1] == before[1] and all(torch.equal(a, b) for a, b in zip(after[0], before[0]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_layers=0), "num_layers"), (dict(head_dim=-1), "head_dim"),
    (dict(max_seq_len=2.5), "max_seq_len")])
def test_constructor_validates(kwargs, match):
    args = {**dict(num_layers=2, batch_size=1, max_seq_len=8, num_kv_heads=1, head_dim=4), **kwargs}
    with pytest.raises(ValueError, match=match):
        OffloadedKVCache(**args)


def test_compiled_overflow_is_a_clear_error_and_cache_is_intact():
    cfg = TinyLlamaConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                          intermediate_size=32, max_seq_len=64)
    model = build_tiny_llama(cfg)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": 0.5})
    cache = model.make_cache(1, 10)
    with torch.no_grad():
        compiled(torch.zeros(1, 6, dtype=torch.long), cache)
        for _ in range(4):
            compiled(torch.zeros(1, 1, dtype=torch.long), cache)
        before = _snapshot(cache)
        with pytest.raises(ValueError, match="exceed max_seq_len=10"):
            compiled(torch.zeros(1, 1, dtype=torch.long), cache)
    after = _snapshot(cache)
    assert after[1] == before[1] == [10, 10]
    assert all(torch.equal(a, b) for a, b in zip(after[0], before[0]))
