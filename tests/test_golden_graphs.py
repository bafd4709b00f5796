"""Golden graphs: what the kvpr rewrite makes of one tiny HF Llama layer's decode graph, written
out in full so that a change to a pass shows in review as a change of these texts.

One layer (hidden 32, 4 heads of 8, MHA, seeded), compiled with ``backend="kvpr"`` at a forced
ratio, prefilled with 5 tokens and stepped once: the decode graph's rewritten nodes (the report's
``graph_module``) at ratio 0.5 (split, loads of X and K,V[l:], waits, recompute, store, assemble,
the next call's prefetch) and at ratio 0 (loads of the whole K,V only), and the lowered graph at
ratio 0.5 (runtime/lower.py: the direct calls the default inner runs). The texts are listings of
the rewrite's nodes, not the graph's code, so that transformers' and Dynamo's naming of the
model's own nodes does not move them (golden.py says what is printed and how it is normalised).

After an intended change: ``KVPR_ACCEPT=1 python -m pytest -q tests/test_golden_graphs.py``
rewrites the texts below; review the diff and commit it."""
from __future__ import annotations

import pytest
import torch

import kvpr_compile
from golden import assert_golden, kvpr_listing
from helpers import hf_llama
from kvpr_compile.report import decode_graph_report
from kvpr_compile.runtime.lower import lower

pytestmark = pytest.mark.quick

pytest.importorskip("transformers")


@torch.no_grad()
def decode_graph(ratio):
    """The rewritten decode graph (kvpr:: ops) of a 1-layer HF Llama at ``ratio``."""
    from kvpr_compile.hf import KVPRCache, cache_kwargs
    model = hf_llama(layers=1, hidden=32, vocab=64)
    model.forward = torch.compile(model.forward, backend="kvpr",
                                  options={"ratio": ratio, "inner": "eager"})
    cache = KVPRCache(model.config, 2, 16)
    first = len(kvpr_compile.reports())
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache)).logits
    model(input_ids=logits[:, -1:].argmax(-1), use_cache=True, **cache_kwargs(model, cache))
    report = decode_graph_report(kvpr_compile.reports()[first:])
    assert report is not None, "no decode graph was rewritten"
    return report.graph_module


def test_decode_graph_at_ratio_half():
    assert_golden(kvpr_listing(decode_graph(0.5)), """
        # split
        split_len = split.split_len(%cache.layers_0_store_lengths_0, 1, 2)
        # load_tokens
        load_tokens = kvpr.load_tokens(%cache.layers_0_store_store_handle, 0, split_len,
            [2, 1, 32, 1, 1, 1, 8, 1, 1, 1, 8], [3, 4, 4], [0, 0, 0], cpu, False)
        getitem = load_tokens[0]
        getitem_1 = load_tokens[1]
        getitem_2 = load_tokens[2]
        # load_kv
        load_kv = kvpr.load_kv(%cache.layers_0_store_store_handle, 0, split_len,
            %cache.layers_0_store_lengths_0, 2, 4, 8, torch.float32, cpu, False)
        getitem_3 = load_kv[0]
        getitem_4 = load_kv[1]
        # wait
        wait = kvpr.wait([getitem, getitem_1, getitem_2])
        # recompute
        size = getitem.size(0)
        linear = linear(getitem, %layers.0.self_attn.k_proj.weight, None)
        reshape = linear.reshape(size, 2, 1, 4, 8)
        transpose = reshape.transpose(2, 3)
        linear_1 = linear(getitem, %layers.0.self_attn.v_proj.weight, None)
        reshape_1 = linear_1.reshape(size, 2, 1, 4, 8)
        transpose_1 = reshape_1.transpose(2, 3)
        mul = mul(transpose, getitem_1)
        getitem_5 = transpose[:, ..., :4]
        getitem_6 = transpose[:, ..., 4:]
        neg = neg(getitem_6)
        cat = cat([neg, getitem_5], -1)
        mul_1 = mul(cat, getitem_2)
        add = add(mul, mul_1)
        movedim = add.movedim(0, 2)
        squeeze = movedim.squeeze(3)
        movedim_1 = transpose_1.movedim(0, 2)
        squeeze_1 = movedim_1.squeeze(3)
        # wait
        wait_1 = kvpr.wait([getitem_3, getitem_4])
        # store
        store_tokens = kvpr.store_tokens(%cache.layers_0_store_store_handle, 0,
            %cache.layers_0_store_lengths_0, %k_embed, %value_states,
            [%hidden_states_2, %cos_3, %sin_3], [-1, -1, -1])
        # assemble
        assemble = kvpr.assemble(%cache.layers_0_store_store_handle, 0, squeeze, squeeze_1,
            getitem_3, getitem_4, %k_embed, %value_states)
        # prefetch_next
        prefetch_next = kvpr.prefetch_next(%cache.layers_0_store_store_handle, 0,
            %cache.layers_0_store_lengths_0, 1, 1, 2, [2, 1, 32, 1, 1, 1, 8, 1, 1, 1, 8],
            [3, 4, 4], [0, 0, 0], 2, 4, 8, torch.float32, cpu)
        # assemble
        getitem_7 = assemble[0]
        getitem_8 = assemble[1]
        # the model's nodes that read them
        %attn_output = scaled_dot_product_attention(%q_embed, getitem_7, getitem_8)
        """)


def test_decode_graph_at_ratio_zero():
    assert_golden(kvpr_listing(decode_graph(0.0)), """
        # load_kv
        load_kv = kvpr.load_kv(%cache.layers_0_store_store_handle, 0, 0,
            %cache.layers_0_store_lengths_0, 2, 4, 8, torch.float32, cpu, False)
        getitem = load_kv[0]
        getitem_1 = load_kv[1]
        # recompute
        empty_past = split.empty_past(%k_embed)
        empty_past_1 = split.empty_past(%value_states)
        # wait
        wait = kvpr.wait([getitem, getitem_1])
        # store
        store_tokens = kvpr.store_tokens(%cache.layers_0_store_store_handle, 0,
            %cache.layers_0_store_lengths_0, %k_embed, %value_states, [], [])
        # assemble
        assemble = kvpr.assemble(%cache.layers_0_store_store_handle, 0, empty_past,
            empty_past_1, getitem, getitem_1, %k_embed, %value_states)
        # prefetch_next
        prefetch_next = kvpr.prefetch_next(%cache.layers_0_store_store_handle, 0,
            %cache.layers_0_store_lengths_0, 1, 0, 1, [], [], [], 2, 4, 8, torch.float32, cpu)
        # assemble
        getitem_2 = assemble[0]
        getitem_3 = assemble[1]
        # the model's nodes that read them
        %attn_output = scaled_dot_product_attention(%q_embed, getitem_2, getitem_3)
        """)


def test_lowered_decode_graph_at_ratio_half():
    assert_golden(kvpr_listing(lower(decode_graph(0.5))), """
        # kvpr_compile
        resolve = direct.resolve(%cache.layers_0_store_store_handle)
        # split
        split_len = split.split_len(%cache.layers_0_store_lengths_0, 1, 2)
        # load_tokens
        cpu_load_tokens = direct.cpu_load_tokens(resolve, 0, split_len,
            [((2, 1, 32), torch.float32), ((1, 1, 1, 8), torch.float32),
            ((1, 1, 1, 8), torch.float32)], cpu)
        getitem = cpu_load_tokens[0]
        getitem_1 = cpu_load_tokens[1]
        getitem_2 = cpu_load_tokens[2]
        # load_kv
        cpu_load_kv = direct.cpu_load_kv(resolve, 0, split_len, %cache.layers_0_store_lengths_0,
            2, 4, 8, torch.float32, cpu)
        getitem_3 = cpu_load_kv[0]
        getitem_4 = cpu_load_kv[1]
        # recompute
        size = getitem.size(0)
        linear = linear(getitem, %layers.0.self_attn.k_proj.weight, None)
        reshape = linear.reshape(size, 2, 1, 4, 8)
        transpose = reshape.transpose(2, 3)
        linear_1 = linear(getitem, %layers.0.self_attn.v_proj.weight, None)
        reshape_1 = linear_1.reshape(size, 2, 1, 4, 8)
        transpose_1 = reshape_1.transpose(2, 3)
        mul = mul(transpose, getitem_1)
        getitem_5 = transpose[:, ..., :4]
        getitem_6 = transpose[:, ..., 4:]
        neg = neg(getitem_6)
        cat = cat([neg, getitem_5], -1)
        mul_1 = mul(cat, getitem_2)
        add = add(mul, mul_1)
        movedim = add.movedim(0, 2)
        squeeze = movedim.squeeze(3)
        movedim_1 = transpose_1.movedim(0, 2)
        squeeze_1 = movedim_1.squeeze(3)
        # assemble
        cpu_store_assemble = direct.cpu_store_assemble(resolve, 0,
            %cache.layers_0_store_lengths_0, [%hidden_states_2, %cos_3, %sin_3], [-1, -1, -1],
            squeeze, squeeze_1, getitem_3, getitem_4, %k_embed, %value_states, ())
        getitem_7 = cpu_store_assemble[0]
        getitem_8 = cpu_store_assemble[1]
        # the model's nodes that read them
        %attn_output = scaled_dot_product_attention(%q_embed, getitem_7, getitem_8)
        """)
