"""Plain helpers the test modules share (conftest.py keeps the pytest hooks and fixtures): error
measures, decode drivers, the seeded model builders, and the backends and checks of the runs on
simulated streams. Test modules import from here, never from one another."""
from __future__ import annotations

import pytest
import torch

import custom_models
from kvpr_compile.backend import kvpr_backend
from kvpr_compile.models import TinyLlamaConfig, build_tiny_llama
from kvpr_compile.passes.prefetch import hoist_loads
from kvpr_compile.runtime import cuda_runtime
from kvpr_compile.runtime.lower import lower

# -- parametrizing -------------------------------------------------------------------------------

PATHS = ("cpu", "runtime-sim")   # the ``path`` fixture's op paths (conftest.py)


def on_paths(cases, slow_on_sim=()):
    """Rows for ``parametrize("path,a,b", on_paths(...), indirect=["path"])``: every case (a
    tuple) on both op paths, except that those in ``slow_on_sim`` run on simulated streams only
    with --run-slow (repeats there of what the other cases already check on both paths)."""
    return [pytest.param(path, *case, marks=pytest.mark.slow)
            if path == "runtime-sim" and case in slow_on_sim else (path, *case)
            for path in PATHS for case in cases]


# -- error measures -------------------------------------------------------------------------------


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
    assert len(outs) == len(refs) and outs, "compare at least one output, the same count each side"
    worst = 0.0
    for a, b in zip(outs, refs):
        err = max_rel_err(a, b)
        if not err <= worst:   # also true for NaN, which then wins
            worst = err
    return worst


# -- decode drivers -------------------------------------------------------------------------------


@torch.no_grad()
def decode_steps(model, prompt, cache, steps, poison=False, position_ids=None):
    """Prefill, then ``steps`` greedy steps of ``model(tokens, cache)``. ``poison``: fill the
    stored K/V with NaN after the prefill (a step that reads them must then show NaN).
    ``position_ids``: None, or "prefill" / "decode" / "both" to pass them as (B, n) in those
    graphs only. Returns (prefill logits, per-step logits, tokens)."""
    b, n = prompt.shape
    prefill_pos = position_ids in ("prefill", "both")
    kw = {"position_ids": torch.arange(n).expand(b, n)} if prefill_pos else {}
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


SEEDED_PROMPT = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(11))


def decode_seeded(model, cache, steps, compiled=None, poison=False, eager_prefill=False):
    """Prefill ``SEEDED_PROMPT`` (batch 2, 6 tokens), then ``steps`` greedy steps, run by
    ``compiled`` (default: ``model``); ``eager_prefill``: the prefill by ``model`` even so.
    ``poison``: NaN in the stored K/V after the prefill. Returns (per-step logits, tokens)."""
    run = model if compiled is None else compiled
    with torch.no_grad():
        first = (model if eager_prefill else run)(SEEDED_PROMPT, cache)
        if poison:
            for k, v in zip(cache.k_cpu, cache.v_cpu):
                k.fill_(float("nan"))
                v.fill_(float("nan"))
        nxt, logits, tokens = first[:, -1].argmax(-1, keepdim=True), [], []
        for _ in range(steps):
            tokens.append(nxt)
            out = run(nxt, cache)[:, -1]
            logits.append(out)
            nxt = out.argmax(-1, keepdim=True)
    return logits, torch.cat(tokens, 1)


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


# -- seeded models --------------------------------------------------------------------------------


def tiny_llama(layers=4, kv_heads=4):
    """The built-in Llama (kvpr_compile.models), seed 3: vocabulary 97, hidden 64, 4 heads,
    96 positions."""
    cfg = TinyLlamaConfig(vocab_size=97, hidden_size=64, num_layers=layers, num_heads=4,
                          num_kv_heads=kv_heads, intermediate_size=96, max_seq_len=96)
    return build_tiny_llama(cfg, seed=3)


def throughput_llama(layers=2, kv_heads=2):
    """The built-in Llama sized for the throughput tests (hidden 32, 32 positions), seed 3."""
    cfg = TinyLlamaConfig(vocab_size=97, hidden_size=32, num_layers=layers, num_heads=2,
                          num_kv_heads=kv_heads, intermediate_size=48, max_seq_len=32)
    return build_tiny_llama(cfg, seed=3)


def batch_prompt(batch, n=6, vocab=97):
    """Tokens (batch, n) seeded by the batch size. n != batch: Dynamo would share their symbol."""
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(batch))


def throughput_compile(model, **options):
    """torch.compile with kvpr, dynamic=True, schedule="throughput" and ``options``."""
    return torch.compile(model, backend="kvpr", dynamic=True,
                         options={"schedule": "throughput", **options})


def _custom_tiny_llama(kv_heads):
    cfg = TinyLlamaConfig(vocab_size=101, hidden_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=kv_heads, intermediate_size=96, max_seq_len=128)
    model = build_tiny_llama(cfg, seed=1)
    return model, lambda b: model.make_cache(b, 128)


def _custom(cls):
    torch.manual_seed(2)
    model = cls().eval()
    return model, lambda b: custom_models.make_cache(model, b, 128)


CUSTOM_MODELS = {   # name -> () -> (model, batch -> a fresh cache of 128 positions)
    "llama-mha": lambda: _custom_tiny_llama(4),
    "llama-gqa": lambda: _custom_tiny_llama(2),
    "fused-qkv": lambda: _custom(custom_models.FusedQKVModel),
    "complex-rope": lambda: _custom(custom_models.ComplexRopeModel),
}


def compare_custom(name, ratio, inner, batch=2, prompt_len=7, steps=16):
    """``decode_steps`` of ``CUSTOM_MODELS[name]`` uncompiled and compiled with kvpr at
    ``ratio`` with ``inner``, on one seeded prompt: (reference, compiled)."""
    model, new_cache = CUSTOM_MODELS[name]()
    prompt = torch.randint(0, 89, (batch, prompt_len), generator=torch.Generator().manual_seed(3))
    ref = decode_steps(model, prompt, new_cache(batch), steps)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": ratio, "inner": inner})
    out = decode_steps(compiled, prompt, new_cache(batch), steps)
    return ref, out


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


HF_NEW_TOKENS = 16
HF_SMALL = dict(vocab_size=128, num_hidden_layers=2)


def hf_configs():
    """Small configs of the transformers architectures the HF tests cover, by name."""
    import transformers as t
    small = HF_SMALL
    return {
        "llama": t.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=4, **small),
        "llama-gqa": t.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, **small),
        "qwen2": t.Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=2, **small),
        "mistral": t.MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=1, sliding_window=None, **small),
        "opt": t.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4,
                           word_embed_proj_dim=64, max_position_embeddings=256, **small),
        "gpt2": t.GPT2Config(n_embd=64, n_head=4, n_positions=256, vocab_size=128, n_layer=2,
                             bos_token_id=0, eos_token_id=0),
        "phi": t.PhiConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           partial_rotary_factor=0.5, **small),
    }


def hf_build(arch):
    """``hf_configs()[arch]`` with seeded random weights (seed 0), eval, pad token 0."""
    import transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_configs()[arch]).eval()
    model.generation_config.pad_token_id = 0
    return model


def hf_generate(model, ids, **kw):
    """Greedy ``generate`` of ``HF_NEW_TOKENS`` tokens through a fresh KVPRCache of 64
    positions, with the logits (return_dict_in_generate)."""
    from kvpr_compile.hf import KVPRCache, cache_kwargs   # imports transformers
    cache = KVPRCache(model.config, ids.shape[0], 64)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=HF_NEW_TOKENS, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **cache_kwargs(model, cache), **kw)



def hf_left_padded(model, **options):
    """Greedy ``generate`` of 10 tokens for a batch of 2 whose first row is left-padded by 3,
    uncompiled (the reference) and then with the forward compiled by kvpr with ``options``:
    (reference, compiled) results, with the logits."""
    from kvpr_compile.hf import KVPRCache, cache_kwargs   # imports transformers
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3], ids[0, :3] = 0, 0

    def run():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True,
                                  **cache_kwargs(model, KVPRCache(model.config, 2, 64)))

    ref = run()
    model.forward = torch.compile(model.forward, backend="kvpr", options=options)
    return ref, run()

# -- backends and checks of the runs on simulated streams -----------------------------------------


def hoisting_backend(graphs: list, distance: int = 1):
    """kvpr_backend (eager inner) followed by hoist_loads; keeps each rewritten graph."""

    def backend(gm, example_inputs, **kwargs):
        kvpr_backend(gm, example_inputs, **kwargs)
        hoist_loads(gm.graph, distance)
        gm.recompile()
        graphs.append(gm)
        return gm.forward
    return backend


LOAD_ROLES = ("load_tokens", "load_kv")


def _first_use(tensors) -> None:
    """Called from the graph right before a node that reads loaded tensors: the compute stream
    reads them there (the recompute as well as the assemble)."""
    api = cuda_runtime.API
    for t in tensors:
        api.races.read(api.current, t, "loaded (read by compute)")


def sim_backend(distance=1):
    """hoisting_backend, then every node that reads a loaded tensor (other than wait) logs that
    read on the compute stream first: a use the graph does not wait for becomes a race. The graph
    is then lowered to direct calls, as the default inner runs it (the custom ops' own store
    stages its sources: see test_store_race.py)."""
    inner = hoisting_backend([], distance)
    wait_op = torch.ops.kvpr.wait.default

    def backend(gm, example_inputs, **kwargs):
        inner(gm, example_inputs, **kwargs)
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is wait_op:
                continue
            loaded = [a for a in node.all_input_nodes
                      if (a.meta.get("custom") or {}).get("kvpr_role") in LOAD_ROLES
                      and a.target is not wait_op]
            if loaded and (node.meta.get("custom") or {}).get("kvpr_role") not in LOAD_ROLES:
                with gm.graph.inserting_before(node):
                    gm.graph.call_function(_first_use, (loaded,))
        gm.recompile()
        return lower(gm).forward   # what the default inner runs: direct calls, unstaged stores
    return backend


def compiled_run(sim, ratio, distance=1, steps=10, complete_after=None, **kw):
    """``tiny_llama()`` decoded on the plain CPU path (the reference), then compiled with
    ``sim_backend`` on the simulated streams of the ``sim`` fixture: (api, cache, ref, out)."""
    model = tiny_llama()
    ref = decode_seeded(model, model.make_cache(2, 96), steps)         # plain CPU path
    api = sim(complete_after)
    compiled = torch.compile(model, backend=sim_backend(distance), options={"ratio": ratio})
    cache = model.make_cache(2, 96)
    out = decode_seeded(model, cache, steps, compiled, **kw)
    return api, cache, ref, out


def check_race_free(api, ref, out, tol=1e-5):
    """``out`` equals ``ref`` (``decode_seeded`` results) and the simulated run had no race,
    with every wait finding its slot's event."""
    assert worst_rel_err(out[0], ref[0]) <= tol
    assert torch.equal(out[1], ref[1])
    assert api.races.accesses > 100
    assert api.races.found == []
    assert api.stream_waits[("compute", "side1")] == 0   # every wait found its slot's event


def kvpr_cli(argv: list[str]) -> int:
    """Run ``kvpr plan`` / ``kvpr profile`` through a throwaway parser (cli.py also needs the
    demo and bench modules)."""
    import argparse

    from kvpr_compile.commands import plan as plan_cmd
    from kvpr_compile.commands import profile as profile_cmd
    parser = argparse.ArgumentParser(prog="kvpr")
    sub = parser.add_subparsers(dest="command", required=True)
    plan_cmd.add_parser(sub)
    profile_cmd.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def prefetch_served(sim, options, steps=10, layers=2):
    """The built-in Llama compiled with ``options`` on simulated streams (``sim``), checked
    exact against eager and race-free over ``steps`` decode steps; returns the cache's runtime,
    whose ``next_call_used`` / ``next_call_dropped`` count the cross-call prefetches."""
    import torch
    from kvpr_compile.runtime import cuda_runtime
    model = tiny_llama(layers=layers)
    ref = decode_seeded(model, model.make_cache(2, 96), steps)
    api = sim()
    compiled = torch.compile(model, backend=sim_backend(), options=options)
    cache = model.make_cache(2, 96)
    check_race_free(api, ref, decode_seeded(model, cache, steps, compiled))
    return cuda_runtime.runtime(cache._store, "cpu")

