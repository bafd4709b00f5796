"""Shared fixtures: fresh Dynamo state per test, comparison helpers, --run-slow."""
from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow: pass --run-slow"))
        if "cuda" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: no cache entries or recompile budget carried over."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b is the eager reference); ``inf`` if either side has a NaN or an
    inf, so that no comparison built on it can pass while a non-finite value leaks."""
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def worst_rel_err(outs, refs) -> float:
    """The worst ``max_rel_err`` over paired outputs; ``inf`` as soon as any pair is non-finite
    (a plain ``max()`` would skip a NaN that follows a finite value)."""
    outs, refs = list(outs), list(refs)
    assert len(outs) == len(refs) and outs, "compare at least one output, the same count on each side"
    worst = 0.0
    for a, b in zip(outs, refs):
        err = max_rel_err(a, b)
        if not err <= worst:   # also true for NaN, which then wins
            worst = err
    return worst


@torch.no_grad()
def decode_steps(model, prompt, cache, steps, poison=False, position_ids=None):
    """Prefill, then ``steps`` greedy steps of ``model(tokens, cache)``. ``poison``: fill the
    stored K/V with NaN after the prefill (a step that reads them must then show NaN).
    ``position_ids``: None, or "prefill" / "decode" / "both" to pass them as (B, n) in those
    graphs only. Returns (prefill logits, per-step logits, tokens)."""
    b, n = prompt.shape
    kw = {"position_ids": torch.arange(n).expand(b, n)} if position_ids in ("prefill", "both") else {}
    prefill = model(prompt, cache, **kw)
    if poison:
        for k, v in zip(cache.k_cpu, cache.v_cpu):
            k.fill_(float("nan"))
            v.fill_(float("nan"))
    logits, tokens = [], []
    nxt = prefill[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        tokens.append(nxt)
        pos = cache.seq_len(0)
        kw = {"position_ids": torch.full((b, 1), pos)} if position_ids in ("decode", "both") else {}
        out = model(nxt, cache, **kw)[:, -1]
        logits.append(out)
        nxt = out.argmax(-1, keepdim=True)
    return prefill, logits, torch.cat(tokens, 1)


@pytest.fixture(params=["cpu", "runtime-sim"])
def path(request, monkeypatch):
    """Run the kvpr ops on the synchronous CPU path, or through the CUDA runtime's logic on
    simulated streams (sim_streams.SimApi)."""
    if request.param == "runtime-sim":
        from kvpr_compile.runtime import cuda_runtime
        from sim_streams import SimApi
        monkeypatch.setattr(cuda_runtime, "API", SimApi())
    return request.param


@pytest.fixture
def sim(monkeypatch):
    """The CUDA runtime's stream and event calls on simulated streams, every device counted as
    one the runtime handles; returns the sim_streams.SimApi (``races`` lists what it caught).
    test_runtime_sim.py has its own ``sim`` (it also instruments the store)."""
    from kvpr_compile.runtime import cuda_runtime
    from sim_streams import SimApi
    api = SimApi()
    monkeypatch.setattr(cuda_runtime, "API", api)
    monkeypatch.setattr(cuda_runtime, "handles", lambda device: True)
    return api


CHUNK_PREFILL, CHUNKS, CHUNK_STEPS, NEXT_TURN = 6, (3, 5), 2, 4


def chunk_tokens(batch, n, seed, vocab=80):
    """Seeded tokens (batch, n) in [1, vocab)."""
    return torch.randint(1, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def conversation(call, cache, batch=2, poison=None):
    """Prefill, chunks of 3 and 5 on that past (chunked prefill, speculative verification),
    greedy steps, a next turn of 4 tokens, one more step: the logits of each
    ``call(tokens, cache)``. ``poison(cache)`` runs after the prefill."""
    outs = [call(chunk_tokens(batch, CHUNK_PREFILL, 0), cache)]
    if poison is not None:
        poison(cache)
    for n in CHUNKS:
        outs.append(call(chunk_tokens(batch, n, n), cache))
    for _ in range(CHUNK_STEPS):
        outs.append(call(outs[-1][:, -1:].argmax(-1), cache))
    outs.append(call(chunk_tokens(batch, NEXT_TURN, 9), cache))
    outs.append(call(outs[-1][:, -1:].argmax(-1), cache))
    return outs


def nan_kv(k_cpu, v_cpu):
    """Fill stored K and V with NaN."""
    for t in k_cpu + v_cpu:
        t.fill_(float("nan"))


def hf_llama(layers=2, hidden=64, kv_heads=4, vocab=128, seed=0):
    """A seeded tiny transformers Llama (sdpa, eval, pad token 0): the HF model most tests use."""
    import transformers
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_attention_heads=4, num_key_value_heads=kv_heads,
                                   vocab_size=vocab, num_hidden_layers=layers)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model
