"""A filled store split again (runtime/store_parts.py): in the throughput schedule a cache is one
store per micro-batch between compiled steps; reading ``k_cpu`` / ``v_cpu`` or running an
uncompiled step merges the parts back, and the next compiled step splits the now filled store
again. Every row of K, V and the stored X (and side inputs) must survive the round trip, at a
ratio below 1 (the steps then read stored K,V as well as X) and with an uneven split (batch 5
as [3, 2]: the second part's rows start at 3).

Checked row by row against the store they came from (exact copies), and the logits of every
call against the uncompiled model (<= 1e-5, the same tokens)."""
from __future__ import annotations

import pytest
import torch

import kvpr_compile
from helpers import worst_rel_err
from kvpr_compile.models import TinyLlamaConfig, build_tiny_llama

TOL = 1e-5
BATCH, MICRO_BATCHES, SIZES, RATIO = 5, 2, [3, 2], 0.5


def llama():
    cfg = TinyLlamaConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=2,
                          num_kv_heads=2, intermediate_size=48, max_seq_len=32)
    return build_tiny_llama(cfg, seed=3)


def snapshot(store):
    """Per layer: (K, V, records) over their valid positions, copied."""
    return [(store.k[i][:store.written[i]].clone(), store.v[i][:store.written[i]].clone(),
             [r[:store.token_len[i]].clone() for r in store.tokens[i]])
            for i in range(store.num_layers)]


def check_parts_hold_the_rows(parts, whole, upto: int):
    """Part k holds rows [r, r + size) of ``whole`` (a snapshot) at positions [0, upto): K, V
    and every record (one shared row, or the part's own rows)."""
    row = 0
    for part in parts:
        size = part.batch_size
        for layer, (k, v, records) in enumerate(whole):
            assert torch.equal(part.k[layer][:upto], k[:upto, row:row + size]), (layer, row)
            assert torch.equal(part.v[layer][:upto], v[:upto, row:row + size]), (layer, row)
            assert len(part.tokens[layer]) == len(records), layer
            for mine, rec in zip(part.tokens[layer], records):
                valid = min(upto, rec.shape[0])
                want = rec[:valid] if rec.shape[1] == 1 else rec[:valid, row:row + size]
                assert part.token_len[layer] >= valid, layer
                assert torch.equal(mine[:valid], want), (layer, row)
        row += size


def check_whole_holds_the_rows(store, parts_before):
    """The merged ``store`` holds what the parts held (snapshots), rows in part order."""
    for layer in range(store.num_layers):
        for t, which in ((store.k[layer], 0), (store.v[layer], 1)):
            want = torch.cat([p[layer][which] for p in parts_before], dim=1)
            assert torch.equal(t[:want.shape[0]], want), layer
        records = [p[layer][2] for p in parts_before]
        assert len(store.tokens[layer]) == len(records[0]), layer
        for i, rec in enumerate(store.tokens[layer]):
            valid = records[0][i].shape[0]
            want = (records[0][i] if rec.shape[1] == 1
                    else torch.cat([r[i] for r in records], dim=1))
            assert store.token_len[layer] == valid and torch.equal(rec[:valid], want), layer


@pytest.mark.parametrize("between", ["k_cpu", "uncompiled-step"])
@torch.no_grad()
def test_a_merged_store_split_again_keeps_every_row(between):
    """Prefill and a step compiled (the parts filled), then ``k_cpu`` read or an uncompiled step
    (the parts merged), then two compiled steps (the first splits the filled store again)."""
    model = llama()
    prompt = torch.randint(0, 97, (BATCH, 6), generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(model, backend="kvpr", dynamic=True,
                             options={"schedule": "throughput", "micro_batches": MICRO_BATCHES,
                                      "ratio": RATIO})
    uncompiled_step = between == "uncompiled-step"
    cache = model.make_cache(BATCH)
    store, got, nxt = cache._store, [], prompt

    def call(run):
        nonlocal nxt
        got.append(run(nxt, cache)[:, -1])
        nxt = got[-1].argmax(-1, keepdim=True)

    call(compiled)
    call(compiled)
    assert [p.batch_size for p in store.parts] == SIZES
    parts_before = [snapshot(p) for p in store.parts]
    if uncompiled_step:
        call(model)
    else:
        cache.k_cpu   # noqa: B018  (read: merges the parts back)
    assert store.parts is None
    check_whole_holds_the_rows(store, parts_before)
    whole, past = snapshot(store), cache.seq_len(0)
    call(compiled)   # splits the filled store again, then writes position ``past``
    assert kvpr_compile.last_report().schedule == "throughput"
    assert [p.batch_size for p in store.parts] == SIZES
    check_parts_hold_the_rows(store.parts, whole, past)
    call(compiled)

    ref_cache, want, nxt = model.make_cache(BATCH), [], prompt
    for _ in range(len(got)):
        want.append(model(nxt, ref_cache)[:, -1])
        nxt = want[-1].argmax(-1, keepdim=True)
    assert worst_rel_err(got, want) <= TOL
    assert torch.equal(torch.stack(got).argmax(-1), torch.stack(want).argmax(-1))
