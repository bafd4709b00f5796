"""A cache reset between generations (and one in the middle of a generation: an error), cached
lengths under 1/ratio (l = 0 recomputed tokens in a rewritten decode graph), and graph fragments
without attention (no misleading warning)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kvpr_compile
from helpers import hf_llama, worst_rel_err
from kvpr_compile.hf import KVPRCache, cache_kwargs

transformers = pytest.importorskip("transformers")
TOL = 1e-5


@torch.no_grad()
def hf_decode(model, cache, ids, steps):
    logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
    out = []
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        logits = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
        out.append(logits)
    return out


def test_short_prompt_recomputes_zero_tokens_and_stays_exact():
    """Prompt of 1 token at ratio 0.3: the first decode steps recompute l = 0 tokens; the
    batched slice's view(..., -1, head_dim) must not need to infer -1 from zero elements."""
    model = hf_llama()
    ids = torch.randint(1, 128, (2, 1), generator=torch.Generator().manual_seed(1))
    ref = hf_decode(model, KVPRCache(model.config, 2, 32), ids, 6)
    model.forward = torch.compile(model.forward, backend="kvpr", options={"ratio": 0.3})
    assert worst_rel_err(hf_decode(model, KVPRCache(model.config, 2, 32), ids, 6), ref) <= TOL


def test_reset_between_generations_then_a_new_prompt_is_exact():
    model = hf_llama()
    first = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    second = torch.randint(1, 128, (2, 3), generator=torch.Generator().manual_seed(3))
    ref = hf_decode(model, KVPRCache(model.config, 2, 32), second, 5)
    model.forward = torch.compile(model.forward, backend="kvpr", options={"ratio": 0.5})
    cache = KVPRCache(model.config, 2, 32)
    hf_decode(model, cache, first, 4)
    cache.reset()
    assert cache.get_seq_length() == 0
    assert worst_rel_err(hf_decode(model, cache, second, 5), ref) <= TOL



class ResetAtStep(transformers.LogitsProcessor):
    """Calls ``cache.reset()`` from inside generate(), after ``step`` tokens."""
    def __init__(self, cache, step):
        self.cache, self.step, self.calls = cache, step, 0

    def __call__(self, ids, scores):
        self.calls += 1
        if self.calls == self.step:
            self.cache.reset()
        return scores


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "kvpr"])
def test_reset_in_the_middle_of_generate_raises_and_writes_nothing(compiled):
    model = hf_llama()
    if compiled:
        model.forward = torch.compile(model.forward, backend="kvpr", options={"ratio": 0.5})
    cache = KVPRCache(model.config, 2, 32)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"reset\(\) called in the middle of a generation"):
        model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=6, do_sample=False,
                       logits_processor=transformers.LogitsProcessorList([ResetAtStep(cache, 3)]))
    assert cache.get_seq_length() == 0   # the call after the reset wrote nothing
    # the cache is usable: the next generation from a (left-padded) prompt matches a fresh cache
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    fresh = model.generate(ids, attention_mask=mask,
                           **cache_kwargs(model, KVPRCache(model.config, 2, 32)),
                           max_new_tokens=4, do_sample=False)
    cache.reset()
    again = model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=4,
                           do_sample=False)
    assert torch.equal(again, fresh)


def test_an_attention_mask_longer_than_the_cached_past_raises():
    model = hf_llama()
    cache = KVPRCache(model.config, 2, 32)
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones(2, 5), **cache_kwargs(model, cache))
        cache.reset()
        with pytest.raises(ValueError, match="covers 6 tokens but the cache holds 0"):
            model(input_ids=ids[:, :1], attention_mask=torch.ones(2, 6),
                  **cache_kwargs(model, cache))
    assert cache.get_seq_length() == 0


def test_a_fresh_cache_may_start_at_an_offset_position():
    """Only a cache emptied by reset() after use is checked: offsets on a fresh one are allowed."""
    model = hf_llama()
    cache = KVPRCache(model.config, 1, 32)
    with torch.no_grad():
        model(input_ids=torch.tensor([[3, 4]]), position_ids=torch.tensor([[7, 8]]),
              **cache_kwargs(model, cache))
    assert cache.get_seq_length() == 2


class BreakBeforeAttention(nn.Module):
    """Embedding, a graph break (as an exception handler or a print would make), attention."""
    def __init__(self, dim=16):
        super().__init__()
        self.emb = nn.Embedding(50, dim)
        self.wk, self.wv, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 50)

    def forward(self, tokens, cache):
        x = self.emb(tokens)
        torch._dynamo.graph_break()
        b, n, c = x.shape
        k = self.wk(x).view(b, n, 1, c).transpose(1, 2)
        v = self.wv(x).view(b, n, 1, c).transpose(1, 2)
        k, v = cache.update(0, k, v)
        q = x.view(b, n, 1, c).transpose(1, 2)
        mask = torch.ones(n, k.shape[2], dtype=torch.bool).tril(k.shape[2] - n)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


def test_a_fragment_without_attention_is_not_reported_as_a_problem():
    from kvpr_compile import report as report_mod
    report_mod._WARNED.clear()
    torch.manual_seed(0)
    model = BreakBeforeAttention().eval()
    ids = torch.randint(0, 50, (2, 4))

    def run(fn):
        cache = kvpr_compile.OffloadedKVCache(1, 2, 16, 1, 16)
        with torch.no_grad():
            return [fn(ids, cache)] + [fn(ids[:, :1], cache) for _ in range(3)]

    ref = run(model)
    first = len(kvpr_compile.reports())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(torch.compile(model, backend="kvpr", options={"ratio": 1.0}))
    assert worst_rel_err(out, ref) <= TOL
    assert not [w for w in caught if "OffloadedKVCache" in str(w.message)]
    mine = kvpr_compile.reports()[first:]
    assert any("fragment" in note for r in mine for note in r.notes)
    assert any(r.layers for r in mine)


def test_a_forced_ratio_never_imports_mip():
    """The GPU image may lack mip: with options['ratio'] (and, for the throughput schedule,
    micro_batches) the backend must not need it."""
    import os
    import subprocess
    import sys
    code = """
import sys, torch
from kvpr_compile.models import TinyLlamaConfig, build_tiny_llama, greedy_generate
model = build_tiny_llama(TinyLlamaConfig(vocab_size=31, hidden_size=16, num_layers=1, num_heads=2,
                                         num_kv_heads=2, intermediate_size=16, max_seq_len=16))
fn = torch.compile(model, backend="kvpr", options={"ratio": 0.5})
greedy_generate(fn, torch.zeros(1, 3, dtype=torch.long), model.make_cache(1, 16), 3)
import kvpr_compile
assert kvpr_compile.last_report().layers, "nothing was rewritten"
assert "mip" not in sys.modules, "mip was imported"
# the throughput schedule with forced ratio and micro-batch count: no planner either
fn = torch.compile(model, backend="kvpr", dynamic=True,
                   options={"ratio": 0.5, "schedule": "throughput", "micro_batches": 2})
greedy_generate(fn, torch.zeros(3, 5, dtype=torch.long), model.make_cache(3, 16), 3)
assert kvpr_compile.last_report().schedule == "throughput"
assert "mip" not in sys.modules, "mip was imported by the throughput schedule"
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
