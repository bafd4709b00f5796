"""Details of the rewrite that exactness tests cannot see: where the split falls (any l gives
exact results, but the plan, the report and the benchmarks' limits assume floor(ratio * past)),
and the token-dim tracing rules, checked on a small captured graph whose side inputs have as
many tokens as features (so their sizes alone cannot tell the token dim)."""
from __future__ import annotations

import pytest
import torch

from kvpr_compile.passes.token_dims import token_dims
from kvpr_compile.ops.split import recompute_tokens
from kvpr_compile.runtime.store import KVStore
from helpers import tiny_llama

pytestmark = pytest.mark.quick


@pytest.mark.parametrize("ratio,num,den", [(0.37, 37, 100), (0.5, 1, 2), (1.0, 1, 1)])
def test_decode_steps_split_at_floor_ratio_times_past(monkeypatch, ratio, num, den):
    """Every compiled decode step loads X for [0, l) and K,V for [l, past) with
    l = floor(ratio * past), computed here in integers, independently of the code."""
    tokens_calls, kv_calls = [], []
    read_tokens, read_kv = KVStore.read_tokens, KVStore.read_kv

    def logged_tokens(self, layer, end, *a):
        tokens_calls.append((layer, end))
        return read_tokens(self, layer, end, *a)

    def logged_kv(self, layer, start, end, *a):
        kv_calls.append((layer, start, end))
        return read_kv(self, layer, start, end, *a)
    monkeypatch.setattr(KVStore, "read_tokens", logged_tokens)
    monkeypatch.setattr(KVStore, "read_kv", logged_kv)
    model = tiny_llama(layers=2)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": ratio})
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    cache = model.make_cache(2, 32)
    with torch.no_grad():
        nxt = compiled(prompt, cache)[:, -1:].argmax(-1)
        for step in range(5):
            tokens_calls.clear()
            kv_calls.clear()
            past = cache.seq_len(0)
            nxt = compiled(nxt, cache)[:, -1:].argmax(-1)
            split = past * num // den
            assert sorted(tokens_calls) == [(0, split), (1, split)], (past, tokens_calls)
            assert sorted(kv_calls) == [(0, split, past), (1, split, past)], (past, kv_calls)
    for past in range(200):
        assert recompute_tokens(ratio, past) == past * num // den


def _captured(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    (gm,) = graphs
    return gm.graph


def test_token_dims_follow_transpose_permute_unsqueeze_and_broadcasting():
    """n = 4 tokens and d = 4 features: the side inputs' token dims come from the walk back
    from K (token dim 2), through the rules, not from their sizes."""
    n = d = 4

    def f(x, cos_nd, cos_dn, scale_bhnd):
        k = x.view(2, n, 2, d).transpose(1, 2)            # (b, H, n, d)
        k = k * cos_nd.unsqueeze(0)                       # (1, n, d) -> token dim 0 of cos_nd
        k = k + cos_dn.transpose(0, 1)                    # (d, n).T  -> token dim 1 of cos_dn
        k = k * scale_bhnd.permute(0, 2, 1, 3)            # (b, n, H, d) permuted -> token dim 1
        return k

    graph = _captured(f, torch.randn(2, n, 2 * d), torch.randn(n, d), torch.randn(d, n),
                      torch.randn(2, n, 2, d))
    nodes = list(graph.nodes)
    (out,) = [nd for nd in nodes if nd.op == "output"]
    k = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    order = {nd: i for i, nd in enumerate(nodes)}
    members = {nd for nd in nodes if nd.op != "output"}
    dims = token_dims([k], members, order)
    inputs = {nd.name: nd for nd in nodes if nd.op == "placeholder"}
    by_name = {name.lower(): dims.get(node) for name, node in inputs.items()}
    got = {key: value for key, value in by_name.items() if "cos" in key or "scale" in key}
    assert got == {"l_cos_nd_": 0, "l_cos_dn_": 1, "l_scale_bhnd_": 1}, got
