"""runtime/traffic.py: the bytes each decode step loads from the CPU store, counted in the load
paths, match what the split says (ratio 0: every past K,V; ratio 1: X and side inputs only)."""
from __future__ import annotations

import pytest
import torch

from kvpr_compile.models import TinyLlamaConfig, build_tiny_llama
from kvpr_compile.runtime import traffic

pytestmark = pytest.mark.quick

B, PROMPT, STEPS, LAYERS, HIDDEN = 2, 5, 3, 2, 32


def model_and_prompt():
    cfg = TinyLlamaConfig(vocab_size=61, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=4,
                          num_kv_heads=4, intermediate_size=48, max_seq_len=16)
    model = build_tiny_llama(cfg, seed=2)
    ids = torch.randint(0, 61, (B, PROMPT), generator=torch.Generator().manual_seed(4))
    return model, ids


@torch.no_grad()
def decode_traffic(fn, model, ids):
    cache = model.make_cache(B, 16)
    nxt = fn(ids, cache)[:, -1:].argmax(-1)
    with traffic.counting() as counted:
        for _ in range(STEPS):
            nxt = fn(nxt, cache)[:, -1:].argmax(-1)
    return counted


def pasts():
    return range(PROMPT, PROMPT + STEPS)


def test_counting_is_off_outside_the_block():
    assert not traffic.ON
    with traffic.counting() as outer:
        with traffic.counting() as inner:
            traffic.note("kv", torch.zeros(3, dtype=torch.float16))
        assert traffic.ON
        traffic.note("tokens", torch.zeros(2), None)
    assert not traffic.ON
    assert inner.bytes == 6 and outer.bytes == 14 and outer.by_kind["tokens"] == 8
    traffic.note("kv", torch.zeros(5))       # nobody counting: nothing recorded anywhere
    assert outer.bytes == 14


def test_uncompiled_reads_every_k_v_including_the_new_token():
    model, ids = model_and_prompt()
    counted = decode_traffic(model, model, ids)
    per_token = 2 * B * HIDDEN * 4                   # K and V, fp32
    assert counted.by_kind == {"kv": LAYERS * per_token * sum(p + 1 for p in pasts())}


def test_ratio_zero_loads_all_past_k_v_and_ratio_one_only_x_and_rope_records():
    model, ids = model_and_prompt()
    full = decode_traffic(torch.compile(model, backend="kvpr", options={"ratio": 0.0}), model, ids)
    assert full.by_kind == {"kv": LAYERS * 2 * B * HIDDEN * 4 * sum(pasts())}
    torch._dynamo.reset()
    kvpr = decode_traffic(torch.compile(model, backend="kvpr", options={"ratio": 1.0}), model, ids)
    head_dim = HIDDEN // 4
    record = B * HIDDEN * 4 + 2 * head_dim * 4      # X per token, and RoPE cos and sin
    assert kvpr.by_kind == {"tokens": LAYERS * record * sum(pasts())}
    assert kvpr.bytes < full.bytes   # MHA: X is half of K+V (RoPE records are large at width 32)
