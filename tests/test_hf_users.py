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
    cache = KVPRCache(model.config, 2, 64)
    poisoned = []

    def poison_after_prefill(module, args, kwargs):
        if cache.get_seq_length() == IDS.shape[1] and not poisoned:
            poisoned.append(True)
            for t in cache.offloaded.k_cpu + cache.offloaded.v_cpu:
                t.fill_(float("nan"))

    handle = model.register_forward_pre_hook(poison_after_prefill, with_kwargs=True)
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=16,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             **cache_kwargs(model, cache))
    handle.remove()
    assert poisoned
    mine = kvpr_compile.reports()[first:]
    assert mine and any(r.ratios == {0: 1.0, 1: 1.0} for r in mine)
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    assert not [w for w in _kvpr_warnings(record) if "did not compile" in w]


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
