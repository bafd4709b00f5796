"""What a new user of the Hugging Face helpers meets first: ``kvpr_compile.hf.compile`` (the one
call that makes ``generate()`` run kvpr), the warning when a ``KVPRCache`` is filled uncompiled,
the checks ``generate()`` gets before its first token, and the errors in kvpr's words. Tiny
transformers models built from configs (seeded random fp32 weights, nothing downloaded)."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvpr_compile  # noqa: E402
import kvpr_compile.hf  # noqa: E402
from kvpr_compile.hf import KVPRCache, cache_kwargs  # noqa: E402
from helpers import hf_build, hf_generate, worst_rel_err  # noqa: E402

TOL = 1e-5
IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def _kvpr_warnings(record):
    return [str(w.message) for w in record if str(w.message).startswith("kvpr:")]


def test_hf_compile_makes_generate_recompute_exactly_with_poisoned_kv():
    """``hf.compile(model, ratio=1.0)``: generate() runs kvpr's graphs (a report per graph),
    and with every stored K/V NaN after the prefill the tokens and logits still match."""
    model = hf_build("llama-gqa")
    ref = hf_generate(model, IDS)
    first = len(kvpr_compile.reports())
    assert kvpr_compile.hf.compile(model, ratio=1.0) is model
    out, record = generate_poisoned(model)
    assert_full_recompute_matches(out, ref, kvpr_compile.reports()[first:])
    assert not [w for w in _kvpr_warnings(record) if "did not compile" in w]


def generate_poisoned(model, ids=IDS, new=16):
    """Greedy generate() through a fresh KVPRCache whose stored K/V turn NaN after the prefill:
    (output with logits, recorded warnings)."""
    cache = KVPRCache(model.config, ids.shape[0], 64)
    poisoned = []

    def poison_after_prefill(module, args, kwargs):
        if cache.get_seq_length() > 0 and not poisoned:   # after the prefill (its prefix too)
            poisoned.append(True)
            for t in cache.offloaded.k_cpu + cache.offloaded.v_cpu:
                t.fill_(float("nan"))

    handle = model.register_forward_pre_hook(poison_after_prefill, with_kwargs=True)
    kwargs = cache_kwargs(model, cache)
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             **kwargs)
    handle.remove()
    assert poisoned
    return out, record


def assert_full_recompute_matches(out, ref, reports):
    assert reports and any(r.ratios and set(r.ratios.values()) == {1.0} for r in reports)
    assert not any(r.skipped for r in reports)
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)


def test_compiled_module_generate_warns_once_naming_hf_compile():
    """``torch.compile(model, backend="kvpr").generate(...)`` runs the original forward: no kvpr
    graph, and the cache says so once, in words, with the call that fixes it."""
    model = hf_build("llama")
    compiled = torch.compile(model, backend="kvpr")
    first = len(kvpr_compile.reports())
    cache = KVPRCache(model.config, 2, 64)
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=5,
                          do_sample=False, **cache_kwargs(compiled, cache))
    assert len(kvpr_compile.reports()) == first
    said = [w for w in _kvpr_warnings(record) if "did not compile" in w]
    assert len(said) == 1
    assert "kvpr_compile.hf.compile(model" in said[0] and "warn_uncompiled=False" in said[0]


def test_uncompiled_on_purpose_is_quiet():
    model = hf_build("llama")
    cache = KVPRCache(model.config, 2, 64, warn_uncompiled=False)
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=5,
                       do_sample=False, **cache_kwargs(model, cache))
    assert not _kvpr_warnings(record)


def test_models_compiled_by_hf_compile_each_get_their_own_recompile_limit():
    """transformers wraps every forward in one decorator; compiled through it, a few models (each
    with prefill, decode and chunk graphs at two batch sizes) use up one recompile limit and the
    later ones run uncompiled. ``hf.compile`` gives each its own frame: all stay compiled."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for arch in ("llama", "qwen2", "mistral"):
            model = kvpr_compile.hf.compile(hf_build(arch), ratio=1.0)
            first = len(kvpr_compile.reports())
            for ids in (IDS, IDS[:1], IDS[:, :5]):
                hf_generate(model, ids)
            assert len(kvpr_compile.reports()) > first, arch
    assert not [w for w in _kvpr_warnings(record)
                if "stopped compiling" in w or "did not compile" in w]


def test_hf_compile_checks_options_at_once_in_kvprs_words():
    model = hf_build("llama")
    forward = model.forward
    with pytest.raises(ValueError, match=r"^kvpr: unknown option\(s\) \['ratoi'\]"):
        kvpr_compile.hf.compile(model, ratoi=0.5)
    with pytest.raises(ValueError, match=r"^kvpr: options\['ratio'\] must be a number"):
        kvpr_compile.hf.compile(model, ratio=2)
    assert model.forward == forward   # nothing installed


# -- errors before the first token, in kvpr's words -----------------------------------------------


def _generate(model, cache, ids=IDS, **kw):
    """generate() with ``cache_kwargs`` run first (as an argument of ``model.generate(...)``
    it runs after the attribute lookup: its check applies from the next call on)."""
    kwargs = cache_kwargs(model, cache)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids),
                              **{"do_sample": False, **kwargs, **kw})


def test_generate_refuses_a_cache_too_short_before_the_prefill_saying_how_to_size_it():
    model = hf_build("llama")
    cache = KVPRCache(model.config, 2, 20)
    compiled = kvpr_compile.hf.compile(hf_build("llama"))   # checks its first generate() too
    with pytest.raises(ValueError, match=r"needs 22 positions"), torch.no_grad():
        compiled.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=16,
                          do_sample=False, **cache_kwargs(compiled, cache))
    assert cache.get_seq_length() == 0
    with pytest.raises(ValueError, match=r"needs 22 positions .* max_seq_len=20: make it "
                                         r"KVPRCache\(config, batch_size, max_seq_len=prompt \+ "
                                         r"max_new_tokens = 23.*cache\.reset\(\)"):
        _generate(model, cache, max_new_tokens=16)
    assert cache.get_seq_length() == 0   # nothing was run
    out = _generate(model, KVPRCache(model.config, 2, 10), max_new_tokens=4)   # exactly fits
    assert out.shape == (2, 11)


def test_generate_refuses_another_batch_before_the_prefill():
    model = hf_build("llama")
    cache = KVPRCache(model.config, 1, 64)
    with pytest.raises(ValueError, match=r"generate\(\) gets 2 prompt rows = 2 sequences, but the "
                                         r"cache was made for batch_size=1: make it "
                                         r"KVPRCache\(config, batch_size=2"):
        _generate(model, cache, max_new_tokens=4)
    assert cache.get_seq_length() == 0
    with pytest.raises(ValueError, match=r"2 prompt rows x num_return_sequences=2 = 4 sequences"):
        _generate(model, KVPRCache(model.config, 2, 64), max_new_tokens=4, do_sample=True,
                  num_return_sequences=2)


def test_beam_search_is_refused_before_the_prefill_in_words():
    model = hf_build("llama")
    cache = KVPRCache(model.config, 4, 64)   # the expanded batch: still refused, in words
    for kw in ({"num_beams": 2}, {"generation_config": transformers.GenerationConfig(
            num_beams=2, max_new_tokens=4, pad_token_id=0)}):
        with pytest.raises(ValueError, match=r"^KVPRCache: beam search \(num_beams=2\) is not "
                                             r"supported.*num_beams=1\)\. Nothing was run"):
            _generate(model, cache, max_new_tokens=4, **kw)
        assert cache.get_seq_length() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_cache_without_cuda_names_the_fix():
    model = hf_build("llama")
    with pytest.raises(ValueError, match=r"device='cuda', but this torch has no CUDA device .*"
                                         r"device=model\.device"):
        KVPRCache(model.config, 1, 8, device="cuda")


def test_run_time_overflow_and_batch_errors_say_what_to_do():
    cache = kvpr_compile.OffloadedKVCache(1, 2, 4, 1, 4)
    with pytest.raises(ValueError, match=r"exceed max_seq_len=4\. Make the cache with "
                                         r"max_seq_len >= prompt \+ max_new_tokens .*"
                                         r"cache\.reset\(\) between sequences"):
        cache.update(0, torch.ones(2, 1, 5, 4), torch.ones(2, 1, 5, 4))
    with pytest.raises(ValueError, match=r"^OffloadedKVCache\.update: k has batch 1 \(the cache "
                                         r"has batch_size=2\)"):
        cache.update(0, torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4))
    assert cache.seq_len(0) == 0


def test_plain_torch_compile_option_error_is_kvprs_valueerror_first():
    """Raised from the backend, Dynamo would wrap it (BackendCompilerFailed: "backend='kvpr'
    raised: ..." and a request to report a bug to PyTorch); the first call raises it itself."""
    model = kvpr_compile.models.build_tiny_llama(kvpr_compile.models.TinyLlamaConfig(), seed=0)
    compiled = torch.compile(model, backend="kvpr", options={"ratoi": 0.5})
    cache = model.make_cache(1, 16)
    for _ in range(2):
        with pytest.raises(ValueError) as err, torch.no_grad():
            compiled(torch.ones(1, 3, dtype=torch.long), cache)
        assert type(err.value) is ValueError
        assert str(err.value).startswith("kvpr: unknown option(s) ['ratoi']")
        assert "PyTorch" not in str(err.value)
    assert cache.seq_len(0) == 0


# -- decoders with more unusual layouts -----------------------------------------------------------


def test_dbrx_clip_qkv_clamp_is_batched_and_recomputes_exactly():
    """DBRX clamps the fused QKV projection (``clip_qkv``) before the cache: the clamp has a
    token-batching rule, so the layers are rewritten, not left as plain cache reads."""
    cfg = transformers.DbrxConfig(
        d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=128,
        attn_config={"clip_qkv": 0.05, "kv_n_heads": 2, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 2, "moe_top_k": 1})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.pad_token_id = 0
    ref = hf_generate(model, IDS)
    first = len(kvpr_compile.reports())
    kvpr_compile.hf.compile(model, ratio=1.0)
    out, record = generate_poisoned(model)
    assert not [w for w in _kvpr_warnings(record) if "token-batching" in w]
    assert_full_recompute_matches(out, ref, kvpr_compile.reports()[first:])


def test_recompile_limit_warning_says_how_to_avoid_it():
    from kvpr_compile.dynamo_watch import limit_message
    text = limit_message("hit config.recompile_limit (8) function: 'wrapped_func' (deprecation.py)")
    assert "recompile_limit (e.g. to 64)" in text
    assert "decorator's wrapper" in text and "kvpr_compile.hf.compile(model)" in text


def test_jetmoe_recomputes_exactly_once_the_limit_is_raised_as_the_warning_says():
    """JetMoE's graph breaks resume in transformers' deprecate_kwarg wrapper, shared by its
    layers' forwards, so at the default recompile limit one generate() stops compiling; with
    the limit the warning suggests, every layer recomputes, exactly."""
    cfg = transformers.JetMoeConfig(hidden_size=64, num_hidden_layers=2, vocab_size=128,
                                    num_key_value_heads=2, kv_channels=16,
                                    intermediate_size=128, num_local_experts=2,
                                    num_experts_per_tok=1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.pad_token_id = 0
    ref = hf_generate(model, IDS)
    first = len(kvpr_compile.reports())
    kvpr_compile.hf.compile(model, ratio=1.0)
    with torch._dynamo.config.patch(recompile_limit=64):
        out, record = generate_poisoned(model)
    assert not [w for w in _kvpr_warnings(record) if "stopped compiling" in w]
    assert_full_recompute_matches(out, ref, kvpr_compile.reports()[first:])


def _tiny(config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def test_cpm_ant_head_width_from_dim_head_recomputes_exactly():
    """CPM-Ant names its head width ``dim_head`` (here not hidden / heads): the store is made
    that wide, and every layer recomputes exactly (CPM-Ant takes the whole sequence at every
    step and stores only its new token, which the re-fed check lets pass)."""
    model = _tiny(transformers.CpmAntConfig(vocab_size=128, hidden_size=64,
                                            num_attention_heads=4, dim_head=32, dim_ff=128,
                                            num_hidden_layers=2))
    assert KVPRCache(model.config, 2, 64).offloaded.k_cpu[0].shape[-1] == 32
    ref = hf_generate(model, IDS)
    first = len(kvpr_compile.reports())
    kvpr_compile.hf.compile(model, ratio=1.0)
    out, _ = generate_poisoned(model, new=6)
    ref.logits = ref.logits[:6]
    ref.sequences = ref.sequences[:, :IDS.shape[1] + 6]
    assert_full_recompute_matches(out, ref, kvpr_compile.reports()[first:])


@pytest.mark.parametrize("new", [2, 6])
def test_a_model_whose_generate_re_feeds_the_past_is_refused_not_wrong(new):
    """transformers' MPT is given the whole sequence at every step and stores it all again:
    with any cache passed (its own DynamicCache too) the logits are wrong from the first decode
    step. Through a KVPRCache generate() raises instead, at the next step or, for the last one,
    before it returns."""
    model = _tiny(transformers.MptConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=128,
                                         expansion_ratio=2))
    with pytest.raises(NotImplementedError, match=r"^KVPRCache: generate\(\) step 2 grew the "
                                                  r"cache by 8 tokens for one new token \(the "
                                                  r"prefill stored 1 per token\).*re-feeds the "
                                                  r"past are not supported"):
        _generate(model, KVPRCache(model.config, 2, 64), max_new_tokens=new)


def test_a_model_without_a_cache_argument_is_refused_in_words():
    """OpenAI GPT's forward takes no cache: generate() would reject the keyword in its own words
    and a plain call would drop it; ``cache_kwargs`` refuses, naming the model."""
    model = _tiny(transformers.OpenAIGPTConfig(n_embd=32, n_head=2, n_layer=1, vocab_size=64))
    with pytest.raises(NotImplementedError, match=r"^KVPRCache: OpenAIGPTLMHeadModel\.forward "
                                                  r"takes no cache \(neither cache= nor "
                                                  r"past_key_values=\)"):
        cache_kwargs(model, KVPRCache(model.config, 1, 16))


def test_whisper_decoder_as_a_causal_lm_stores_the_decoders_geometry():
    """WhisperForCausalLM (the decoder alone, as in speculative decoding): the config's
    ``num_attention_heads`` and ``num_hidden_layers`` are the encoder's; the store takes the
    decoder's heads and layers and every layer recomputes exactly."""
    model = _tiny(transformers.WhisperConfig(
        d_model=64, encoder_layers=1, encoder_attention_heads=2, decoder_layers=2,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=128,
        max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1))
    assert tuple(KVPRCache(model.config, 2, 64).offloaded.k_cpu[1].shape) == (64, 2, 4, 16)
    ref = hf_generate(model, IDS)
    first = len(kvpr_compile.reports())
    kvpr_compile.hf.compile(model, ratio=1.0)
    out, _ = generate_poisoned(model)
    assert_full_recompute_matches(out, ref, kvpr_compile.reports()[first:])
