"""torch.library.opcheck on every kvpr:: op with realistic inputs (a real OffloadedKVCache's
handle): schema (declared mutations, no aliasing), fake implementations, AOT dispatch with dynamic
shapes.

Run on the CPU path, and on the CUDA runtime's code path driven on CPU by simulated streams
(slot views, sequence-major strides that the fake of load_kv must reproduce)."""
from __future__ import annotations

import pytest
import torch

from kvpr_compile import OffloadedKVCache
from kvpr_compile.ops.specs import record_specs

pytestmark = pytest.mark.quick

kvpr = torch.ops.kvpr
B, H, D, HIDDEN, N = 2, 4, 8, 32, 3
CPU = torch.device("cpu")



@pytest.fixture
def cache():
    """Layer 0 filled by the uncompiled path, layer 1 by compiled stores (K, V, X, cos)."""
    c = OffloadedKVCache(num_layers=2, batch_size=B, max_seq_len=32, num_kv_heads=H, head_dim=D)
    g = torch.Generator().manual_seed(0)
    c.update(0, torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g))
    kvpr.store_tokens(c.handle, 1, 0, *new_kv(N),
                      [torch.randn(B, N, HIDDEN), torch.randn(1, 1, N, D)], [1, 2])
    return c


def new_kv(n=1):
    return torch.randn(B, H, n, D), torch.randn(B, H, n, D)


def check(op, args):
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_cache_update(path, cache):
    check(kvpr.cache_update.default, (cache.handle, *new_kv(2), 0, N))


def test_store_tokens(path, cache):
    x, cos = torch.randn(B, 1, HIDDEN), torch.randn(1, 1, 1, D)
    check(kvpr.store_tokens.default, (cache.handle, 1, N, *new_kv(), [x, cos], [1, 2]))
    # a side input without a token dim: one record per call, repeated for each token
    check(kvpr.store_tokens.default, (cache.handle, 0, N, *new_kv(), [x, cos[0, 0, 0]], [1, -1]))


def test_load_tokens(path, cache):
    specs = record_specs([torch.empty(B, 1, HIDDEN), torch.empty(1, 1, 1, D)])
    check(kvpr.load_tokens.default, (cache.handle, 1, 2, *specs, CPU))
    check(kvpr.load_tokens.default, (cache.handle, 0, 0, *specs, CPU))   # nothing stored yet


def test_load_kv(path, cache):
    check(kvpr.load_kv.default, (cache.handle, 1, 1, N, B, H, D, torch.float32, CPU))
    check(kvpr.load_kv.default, (cache.handle, 0, 0, 0, B, H, D, torch.float32, CPU))
    if path == "runtime-sim":   # the fake reproduces the slot view's strides
        k, _ = kvpr.load_kv(cache.handle, 1, 1, N, B, H, D, torch.float32, CPU)
        with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
            fk, _ = kvpr.load_kv(cache.handle, 1, 1, N, B, H, D, torch.float32, CPU)
        assert fk.stride() == k.stride() != torch.empty(k.shape).stride()


def test_wait(path, cache):
    k, v = kvpr.load_kv(cache.handle, 1, 0, N, B, H, D, torch.float32, CPU)
    check(kvpr.wait.default, ([k, v],))


def test_assemble(path, cache):
    k_ld, v_ld = kvpr.load_kv(cache.handle, 1, 1, N, B, H, D, torch.float32, CPU)
    check(kvpr.assemble.default, (cache.handle, 1, *new_kv(1), k_ld, v_ld, *new_kv(1)))
    # layer 0 has no stored X: positions [0, 2) come from the stored K,V (fallback)
    k_ld, v_ld = kvpr.load_kv(cache.handle, 0, 2, N, B, H, D, torch.float32, CPU)
    check(kvpr.assemble.default, (cache.handle, 0, *new_kv(2), k_ld, v_ld, *new_kv(1)))
