"""Values of the kvpr:: ops against the store's contents, exactly (opcheck in test_ops_opcheck.py
compares each op with itself, so a load that returns zeros would pass there).

Known values are written into a KVStore, the ops are called, and their results are compared with
expectations built independently of the ops: ``load_kv`` and ``load_tokens`` return the stored
rows of the range asked for; ``store_tokens`` puts each token's K, V, X and side inputs at its
position (side inputs cut along their own token dim); ``assemble`` is recomputed [0, l) ++ loaded
++ new, except where stored X covers only part of [0, l): past ``token_len`` it takes the stored
K,V. Run on the CPU path and on the CUDA runtime's code driven on CPU by simulated streams."""
from __future__ import annotations

import pytest
import torch

from kvpr_compile import OffloadedKVCache
from kvpr_compile.ops.specs import record_specs

pytestmark = pytest.mark.quick

kvpr = torch.ops.kvpr
B, H, D, HID, S = 2, 3, 4, 5, 16
CPU = torch.device("cpu")



def numbered(*shape, offset=0.0):
    """Distinct values: element i holds offset + i."""
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n, dtype=torch.float32).view(*shape) + offset


def kv_at(layer, start, end, which):
    """What the filled store holds for positions [start, end), as (b, h, n, d)."""
    offset = 1000.0 * layer + (0.0 if which == "k" else 500_000.0)
    return numbered(S, B, H, D, offset=offset)[start:end].permute(1, 2, 0, 3)


@pytest.fixture
def cache():
    """K and V of both layers filled with known distinct values; no X stored yet."""
    c = OffloadedKVCache(num_layers=2, batch_size=B, max_seq_len=S, num_kv_heads=H, head_dim=D)
    for layer in range(2):
        c.k_cpu[layer].copy_(kv_at(layer, 0, S, "k").permute(2, 0, 1, 3))
        c.v_cpu[layer].copy_(kv_at(layer, 0, S, "v").permute(2, 0, 1, 3))
    return c


@pytest.mark.parametrize("start,end", [(0, S), (3, 11), (7, 8), (5, 5)])
def test_load_kv_returns_the_stored_rows(path, cache, start, end):
    for layer in range(2):
        k, v = kvpr.load_kv(cache.handle, layer, start, end, B, H, D, torch.float32, CPU)
        kvpr.wait([k, v])
        assert torch.equal(k, kv_at(layer, start, end, "k"))
        assert torch.equal(v, kv_at(layer, start, end, "v"))


def x_and_cos(pos, n):
    """New tokens' X (b, n, hidden) and a side input with its token dim at 2, (1, 1, n, d)."""
    return (numbered(B, n, HID, offset=10_000.0 + 100 * pos),
            numbered(1, 1, n, D, offset=-50.0 - 10 * pos))


def test_store_tokens_then_load_tokens(path, cache):
    """Two stores (a 5-token prefill, then one token), then loads of [0, end): X row p is token
    p's X, the side input row p is token p's slice along its token dim, K,V land at p."""
    for pos, n in [(0, 5), (5, 1)]:
        x, cos = x_and_cos(pos, n)
        k, v = numbered(B, H, n, D, offset=-1e5 - pos), numbered(B, H, n, D, offset=2e5 + pos)
        kvpr.store_tokens(cache.handle, 1, pos, k, v, [x, cos], [1, 2])
        assert torch.equal(cache.k_cpu[1][pos:pos + n], k.permute(2, 0, 1, 3))
        assert torch.equal(cache.v_cpu[1][pos:pos + n], v.permute(2, 0, 1, 3))
    assert cache._store.token_len[1] == 6
    specs = record_specs([torch.empty(B, 1, HID), torch.empty(1, 1, 1, D)])
    for end in (6, 4, 0):
        x_rows, cos_rows = kvpr.load_tokens(cache.handle, 1, end, *specs, CPU)
        kvpr.wait([x_rows, cos_rows])
        assert x_rows.shape == (end, B, 1, HID) and cos_rows.shape == (end, 1, 1, 1, D)
        for p in range(end):
            x, cos = x_and_cos(0, 5) if p < 5 else x_and_cos(5, 1)
            i = p if p < 5 else 0
            assert torch.equal(x_rows[p], x[:, i:i + 1]), p
            assert torch.equal(cos_rows[p], cos[:, :, i:i + 1]), p


def test_store_tokens_repeats_a_record_without_token_dim(path, cache):
    x, _ = x_and_cos(0, 3)
    scale = numbered(D, offset=7.0)
    kvpr.store_tokens(cache.handle, 0, 0, *(numbered(B, H, 3, D),) * 2, [x, scale], [1, -1])
    rows = cache._store.tokens[0][1]
    assert all(torch.equal(rows[p], scale) for p in range(3))


def stored_x_prefix(cache, layer, covered):
    """Store X records for positions [0, covered) only (K,V stay as filled)."""
    if covered:
        x, _ = x_and_cos(0, covered)
        cache._store.write_tokens(layer, 0, [x.movedim(1, 0).unsqueeze(2)])
    assert cache._store.token_len[layer] == covered


@pytest.mark.parametrize("covered", [8, 6, 3, 0], ids=lambda c: f"x_covers_{c}_of_6")
def test_assemble_orders_recomputed_loaded_new_and_falls_back_past_stored_x(path, cache, covered):
    """l = 6 recomputed, 4 loaded, 1 new. Where X covers only [0, covered), positions
    [covered, 6) come from the stored K,V (whatever the recompute produced there)."""
    layer, l, past = 1, 6, 10
    stored_x_prefix(cache, layer, min(covered, 8))
    k_rec, v_rec = numbered(B, H, l, D, offset=1e6), numbered(B, H, l, D, offset=2e6)
    k_ld, v_ld = kvpr.load_kv(cache.handle, layer, l, past, B, H, D, torch.float32, CPU)
    kvpr.wait([k_ld, v_ld])
    k_new, v_new = numbered(B, H, 1, D, offset=3e6), numbered(B, H, 1, D, offset=4e6)
    k_all, v_all = kvpr.assemble(cache.handle, layer, k_rec, v_rec, k_ld, v_ld, k_new, v_new)
    c = min(covered, l)
    for got, rec, which, new in ((k_all, k_rec, "k", k_new), (v_all, v_rec, "v", v_new)):
        assert got.shape == (B, H, past + 1, D)
        assert torch.equal(got[:, :, :c], rec[:, :, :c])                          # recomputed
        assert torch.equal(got[:, :, c:l], kv_at(layer, c, l, which))             # fallback
        assert torch.equal(got[:, :, l:past], kv_at(layer, l, past, which))       # loaded
        assert torch.equal(got[:, :, past:], new)                                 # new token


def test_uncompiled_write_over_stored_x_ends_the_x_prefix(path, cache):
    """cache_update (the uncompiled path, which has no X) overwriting positions that hold X:
    the valid X prefix ends there, so assemble takes the new stored K,V for them rather than
    K,V recomputed from X that no longer matches (e.g. rows stored by a forward that raised
    before the cache's length was advanced)."""
    layer = 1
    stored_x_prefix(cache, layer, 8)
    k_new, v_new = numbered(B, H, 2, D, offset=-3e6), numbered(B, H, 2, D, offset=-4e6)
    kvpr.cache_update(cache.handle, k_new, v_new, layer, 4)          # overwrite positions 4, 5
    assert cache._store.token_len[layer] == 4
    k_rec, v_rec = numbered(B, H, 6, D, offset=1e6), numbered(B, H, 6, D, offset=2e6)
    empty = numbered(B, H, 0, D)
    k_all, v_all = kvpr.assemble(cache.handle, layer, k_rec, v_rec, empty, empty, *new_token())
    assert torch.equal(k_all[:, :, :4], k_rec[:, :, :4]) and torch.equal(k_all[:, :, 4:6], k_new)
    assert torch.equal(v_all[:, :, :4], v_rec[:, :, :4]) and torch.equal(v_all[:, :, 4:6], v_new)


def new_token():
    return numbered(B, H, 1, D, offset=3e6), numbered(B, H, 1, D, offset=4e6)
