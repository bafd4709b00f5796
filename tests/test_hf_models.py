"""transformers architectures built from configs (seeded random fp32 weights, nothing downloaded),
generating through KVPRCache: compiled forward vs the uncompiled model, logits at prefill and at
16 decode steps within max relative error 1e-5, greedy tokens identical."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvpr_compile  # noqa: E402
from benchmarks.sweep_configs import LAYOUTS  # noqa: E402
from kvpr_compile.hf import KVPRCache, cache_kwargs  # noqa: E402
from helpers import (HF_SMALL, hf_build, hf_configs, hf_generate, hf_left_padded,  # noqa: E402
                     max_rel_err, worst_rel_err)

TOL = 1e-5


@torch.no_grad()
def prefill_logits(model, ids):
    return model(input_ids=ids, **cache_kwargs(model, KVPRCache(model.config, ids.shape[0], 64)),
                 use_cache=True).logits


def check(arch, ratio, inner):
    model = hf_build(arch)
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    ref, ref_prefill = hf_generate(model, ids), prefill_logits(model, ids)
    first_report = len(kvpr_compile.reports())
    model.forward = torch.compile(model.forward, backend="kvpr",
                                  options={"ratio": ratio, "inner": inner})
    out = hf_generate(model, ids)
    assert len(kvpr_compile.reports()) - first_report <= 3   # no recompile per decode step
    out_prefill = prefill_logits(model, ids)
    assert max_rel_err(out_prefill, ref_prefill) <= TOL
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    mine = kvpr_compile.reports()[first_report:]
    assert mine and all(sorted(r.ratios) == [0, 1] and not r.skipped for r in mine)
    decode_graphs = [r for r in mine if not any(e.note.startswith("multi-token") for e in r.layers)]
    assert decode_graphs and all(r.ratios == {0: pytest.approx(ratio), 1: pytest.approx(ratio)}
                                 for r in decode_graphs)


# Every architecture at the fractional ratio (recompute, loads and the assemble between them);
# ratios 0 and 1 on GQA Llama by default (ratio 1 on ten more layouts:
# test_more_architectures_full_recompute), on every architecture with --run-slow.
ALL_RATIOS = {"llama-gqa"}


@pytest.mark.parametrize("arch,ratio", [
    (arch, ratio) if ratio == 0.37 or arch in ALL_RATIOS
    else pytest.param(arch, ratio, marks=pytest.mark.slow)
    for arch in sorted(hf_configs()) for ratio in (0.0, 0.37, 1.0)])
def test_hf_compiled_matches_eager(arch, ratio):
    check(arch, ratio, "eager")


# inductor compiles C++ on a CPU: GPT-2 by default, GQA Llama (RoPE) with --run-slow
@pytest.mark.parametrize("arch", [pytest.param("llama-gqa", marks=pytest.mark.slow), "gpt2"])
def test_hf_compiled_matches_eager_inductor(arch):
    check(arch, 0.37, "inductor")


def test_cache_kwargs_use_the_keyword_this_transformers_takes_without_warning():
    """5.17 rejects generate(cache=...); later 5.x deprecate past_key_values=: cache_kwargs picks
    by the model's forward signature, and neither generate nor forward warns."""
    import inspect
    import warnings
    model = hf_build("llama")
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    cache = KVPRCache(model.config, 1, 64)
    kwargs = cache_kwargs(model, cache)
    takes_cache = "cache" in inspect.signature(type(model).forward).parameters
    assert list(kwargs) == ["cache" if takes_cache else "past_key_values"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                             do_sample=False, **kwargs)
    assert out.shape == (1, 9) and cache.get_seq_length() == 8   # last token not fed back
    ref = hf_generate(hf_build("llama"), ids)
    assert torch.equal(out, ref.sequences[:, :9])


@pytest.mark.quick
def test_kvpr_cache_storage_follows_the_config():
    cfg = hf_configs()["llama-gqa"]
    cache = KVPRCache(cfg, batch_size=3, max_seq_len=20)
    assert len(cache.offloaded.k_cpu) == cfg.num_hidden_layers
    assert tuple(cache.offloaded.k_cpu[0].shape) == (20, 3, 2, 16)
    with pytest.raises(NotImplementedError):
        cache.reorder_cache(torch.tensor([0, 1, 2]))


EXTRA = LAYOUTS   # more layouts (benchmarks/sweep_configs.py)


@pytest.mark.parametrize("arch", sorted(EXTRA))
def test_more_architectures_full_recompute(arch):
    cfg = transformers.AutoConfig.for_model(arch, **HF_SMALL, **EXTRA[arch])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = hf_generate(model, ids)
    first_report = len(kvpr_compile.reports())
    model.forward = torch.compile(model.forward, backend="kvpr", options={"ratio": 1.0})
    out = hf_generate(model, ids)
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    mine = kvpr_compile.reports()[first_report:]
    assert all(sorted(r.ratios) == [0, 1] and not r.skipped for r in mine)
    assert any(r.ratios == {0: 1.0, 1: 1.0} for r in mine)


@pytest.mark.quick
def test_hf_poisoned_kv_full_recompute():
    """Stored K/V poisoned with NaN after a compiled prefill; ratio 1.0 decode still exact."""
    model = hf_build("llama-gqa")
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(3))

    @torch.no_grad()
    def run(m, poison):
        cache = KVPRCache(model.config, 2, 64)
        logits = m(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
        if poison:
            for t in cache.offloaded.k_cpu + cache.offloaded.v_cpu:
                t.fill_(float("nan"))
        outs = []
        for _ in range(5):
            nxt = logits.argmax(-1, keepdim=True)
            logits = m(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
            outs.append(logits)
        return outs

    ref = run(model, poison=False)
    model.forward = torch.compile(model.forward, backend="kvpr", options={"ratio": 1.0})
    assert worst_rel_err(run(model, poison=True), ref) <= TOL


def test_left_padded_batch_recomputes_with_each_rows_positions():
    """Left padding gives each row its own positions; the stored RoPE records carry them, so a
    full recompute stays exact (regenerating cos/sin for 0..l-1 would not be)."""
    model = hf_build("llama")
    ref, out = hf_left_padded(model, ratio=1.0)
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    assert kvpr_compile.last_report().ratios == {0: 1.0, 1: 1.0}
