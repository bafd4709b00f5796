"""Fractional ratios where key order and per-row positions matter: left-padded batches and
ALiBi-style position bias, on a hand-written decoder (padded_models.py) and on transformers'
Bloom (ALiBi) and Llama (RoPE) built from configs. At 0.37 and 0.5 every decode step has
recomputed keys [0, l), loaded keys [l, past) and the new key, so an assemble that puts them in
the wrong order, or a recompute with the wrong rows, changes the logits.

Prefill + several greedy decode steps, compared to eager: max relative error of logits <= 1e-5
(fp32), identical greedy tokens."""
from __future__ import annotations

import pytest
import torch

import kvpr_compile
from helpers import max_rel_err, worst_rel_err
from padded_models import PaddedAlibiModel, make_padded_cache

TOL = 1e-5
STEPS = 8
PAD = torch.tensor([3, 0])      # row 0 left-padded by 3, row 1 not


@torch.no_grad()
def decode(model, prompt, cache, pad, steps=STEPS):
    prefill = model(prompt, cache, pad)
    logits, tokens = [], []
    nxt = prefill[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        tokens.append(nxt)
        out = model(nxt, cache, pad)[:, -1]
        logits.append(out)
        nxt = out.argmax(-1, keepdim=True)
    return prefill, logits, torch.cat(tokens, 1)


def padded_prompt(pad, length=9):
    prompt = torch.randint(1, 97, (len(pad), length), generator=torch.Generator().manual_seed(21))
    for row, n in enumerate(pad.tolist()):
        prompt[row, :n] = 0
    return prompt


@pytest.mark.parametrize("alibi,pad,ratio", [(True, PAD, 0.37), (True, PAD, 0.5),
                                              (False, PAD, 0.37),
                                              (True, torch.tensor([0, 0]), 0.5)],
                         ids=["alibi-padded-0.37", "alibi-padded-0.5", "padded-0.37", "alibi-0.5"])
def test_custom_position_dependent_attention(alibi, pad, ratio):
    torch.manual_seed(4)
    model = PaddedAlibiModel(alibi=alibi).eval()
    prompt = padded_prompt(pad)
    ref = decode(model, prompt, make_padded_cache(model, 2), pad)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": ratio})
    out = decode(compiled, prompt, make_padded_cache(model, 2), pad)
    assert max_rel_err(out[0], ref[0]) <= TOL
    assert worst_rel_err(out[1], ref[1]) <= TOL
    assert torch.equal(out[2], ref[2])
    report = kvpr_compile.last_report()
    assert report.ratios == {0: pytest.approx(ratio), 1: pytest.approx(ratio)}
    assert not report.skipped


def test_key_order_changes_the_logits():
    """The control that makes the test above meaningful: with ALiBi and padding, the same keys
    in another order give other logits (so a swapped assemble cannot pass)."""
    torch.manual_seed(4)
    model = PaddedAlibiModel(alibi=True).eval()
    prompt = padded_prompt(PAD)
    cache = make_padded_cache(model, 2)
    with torch.no_grad():
        model(prompt, cache, PAD)
        nxt = torch.tensor([[5], [7]])
        ref = model(nxt, cache, PAD)
        cache.reset()
        model(prompt, cache, PAD)
        for k, v in zip(cache.k_cpu, cache.v_cpu):   # move the first 4 keys behind the next 5
            for t in (k, v):
                t[:9] = torch.cat([t[4:9], t[:4]])
        swapped = model(nxt, cache, PAD)
    assert max_rel_err(swapped, ref) > 1e-3


transformers = pytest.importorskip("transformers")
from kvpr_compile.hf import KVPRCache, cache_kwargs  # noqa: E402


def _hf(arch, **dims):
    cfg = transformers.AutoConfig.for_model(arch, vocab_size=128, num_hidden_layers=2, **dims)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


HF = {
    "bloom": lambda: _hf("bloom", hidden_size=64, n_head=4),
    "llama": lambda: _hf("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=4),
}


@pytest.mark.parametrize("arch,ratio", [("bloom", 0.37),
                                        pytest.param("bloom", 0.5, marks=pytest.mark.slow),
                                        ("llama", 0.37)])   # 0.5: a second fractional ratio
def test_hf_left_padded_fractional_ratio(arch, ratio):
    model = HF[arch]()
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3], ids[0, :3] = 0, 0

    def run():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True,
                                  **cache_kwargs(model, KVPRCache(model.config, 2, 64)))

    ref = run()
    first = len(kvpr_compile.reports())
    model.forward = torch.compile(model.forward, backend="kvpr", options={"ratio": ratio})
    out = run()
    assert worst_rel_err(out.logits, ref.logits) <= TOL
    assert torch.equal(out.sequences, ref.sequences)
    mine = kvpr_compile.reports()[first:]
    assert mine and all(sorted(r.ratios) == [0, 1] and not r.skipped for r in mine)
    assert any(r.ratios == {0: pytest.approx(ratio), 1: pytest.approx(ratio)} for r in mine)
