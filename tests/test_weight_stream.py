"""Layer weights streamed from CPU memory into two device slots (runtime/weight_stream.py):
exact against the resident model uncompiled and compiled, weights really read from the host store,
only two layers' worth in slots, and the copy/compute ordering proven on simulated streams."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import hf_configs, hf_generate, worst_rel_err
from kvpr_compile.models import TinyLlamaConfig, build_tiny_llama, greedy_generate
from kvpr_compile.runtime.weight_stream import WeightStream, stream_weights

TOL = 1e-5


def _model(layers=5):
    cfg = TinyLlamaConfig(vocab_size=97, hidden_size=64, num_layers=layers, num_heads=4,
                          num_kv_heads=4, intermediate_size=96, max_seq_len=64)
    return build_tiny_llama(cfg, seed=11)


def _decode(model, compiled=None, steps=6):
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    run = model if compiled is None else compiled
    return greedy_generate(run, prompt, model.make_cache(2), steps)


def _layer_storages(model):
    return {p.untyped_storage().data_ptr() for layer in model.layers for p in layer.parameters()}


def _layer_storages_of(stream):
    return {getattr(module, name).untyped_storage().data_ptr()
            for entries in stream.entries for module, name, *_ in entries}


def test_streamed_model_is_exact_and_holds_two_layers_on_the_device():
    ref = _model()
    model = copy.deepcopy(ref)
    stream = stream_weights(model)
    want_tokens, want = _decode(ref)
    got_tokens, got = _decode(model)
    assert torch.equal(got_tokens, want_tokens)
    assert worst_rel_err(got, want) == 0.0
    assert len(_layer_storages(model)) == 2   # every layer's parameters live in one of two slots
    per_layer = stream.bytes_on_host() / 5
    assert stream.bytes_on_device() == pytest.approx(2 * per_layer)


def test_weights_come_from_the_host_store():
    """Overwrite layer 3's host copy with layer 1's weights: the streamed model must now compute
    what a resident model with that swap computes (the slots are refilled from the host)."""
    ref = _model()
    model = copy.deepcopy(ref)
    stream = stream_weights(model)
    for dt, buf in stream.host[3].items():
        buf.copy_(stream.host[1][dt])
    ref.layers[3].load_state_dict(ref.layers[1].state_dict())
    want_tokens, want = _decode(ref)
    got_tokens, got = _decode(model)
    assert worst_rel_err(got, want) == 0.0 and torch.equal(got_tokens, want_tokens)
    _, untouched = _decode(_model())
    assert worst_rel_err(got, untouched) > 1e-3   # the swap changed the output


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_compiled_streamed_model_matches_eager(ratio):
    ref = _model(layers=4)
    model = copy.deepcopy(ref)
    stream_weights(model)
    compiled = torch.compile(model, backend="kvpr", options={"ratio": ratio})
    want_tokens, want = _decode(ref)
    got_tokens, got = _decode(model, compiled)
    assert worst_rel_err(got, want) <= TOL
    assert torch.equal(got_tokens, want_tokens)


def test_layer_used_out_of_order_is_loaded_on_demand():
    ref = _model(layers=4)
    model = copy.deepcopy(ref)
    stream = stream_weights(model)
    x = torch.randn(2, 3, 64)
    for i in (2, 0, 2, 3, 1):   # not the order the prefetch expects
        torch.testing.assert_close(model.layers[i](x, *_layer_args(model, 3)),
                                   ref.layers[i](x, *_layer_args(ref, 3)), rtol=0, atol=0)
    assert stream.on_demand > 0


def _layer_args(model, n):
    cache = model.make_cache(2)
    positions = torch.arange(n)
    cos = model.cos_table[positions][None, None]
    sin = model.sin_table[positions][None, None]
    mask = positions[:, None] >= torch.arange(n)[None, :]
    return cos, sin, mask, cache


def test_bad_slot_count_is_named():
    with pytest.raises(ValueError, match="num_slots"):
        WeightStream(_model().layers, "cpu", num_slots=0)


def _logged(stream, api):
    """Log the compute stream's reads of a layer's slot between ready and release."""
    ready, release = stream.ready, stream.release

    def logged_ready(layer):
        ready(layer)
        slot = stream.slots[layer % stream.num_slots]
        for buf in slot.buffers.values():
            api.races.read(api.current, buf, f"weights of layer {layer}")

    def logged_release(layer):
        slot = stream.slots[layer % stream.num_slots]
        for buf in slot.buffers.values():
            api.races.read(api.current, buf, f"weights of layer {layer} (last use)")
        release(layer)

    stream.ready, stream.release = logged_ready, logged_release


def _sim_steps(model, stream, api, steps=3):
    _logged(stream, api)
    x = torch.randn(2, 3, 64)
    for _ in range(steps):
        for i in range(stream.num_layers):
            stream.ready(i)
            stream.release(i)
    return x


@pytest.mark.quick
def test_slot_copies_are_ordered_after_readers_on_simulated_streams(sim_api):
    model = _model(layers=5)
    stream = stream_weights(model, device="cpu")
    assert stream.api is sim_api
    _sim_steps(model, stream, sim_api)
    assert sim_api.races.accesses > 20
    assert sim_api.races.found == []
    assert stream.on_demand == 0   # every layer was prefetched by the release of layer i - 2


def test_refilling_a_slot_before_its_free_event_is_caught(sim_api, monkeypatch):
    """Negative control: a copy stream that does not wait for the slot's free event races with
    the compute still reading the previous layer's weights."""
    model = _model(layers=5)
    stream = stream_weights(model, device="cpu")
    real_wait = stream.copy_stream.wait_event
    monkeypatch.setattr(stream.copy_stream, "wait_event", lambda event: None)
    _sim_steps(model, stream, sim_api)
    assert any("copy destination" in r for r in sim_api.races.found)
    monkeypatch.setattr(stream.copy_stream, "wait_event", real_wait)


@pytest.mark.quick
def test_reading_before_the_ready_event_is_caught(sim_api, monkeypatch):
    """Negative control: a compute stream that does not wait for the copy reads a half-filled
    slot."""
    model = _model(layers=5)
    stream = stream_weights(model, device="cpu")
    monkeypatch.setattr(sim_api.compute, "wait_event", lambda event: None)
    _sim_steps(model, stream, sim_api)
    assert any("weights of layer" in r for r in sim_api.races.found)


@pytest.mark.parametrize("arch,ratio", [("opt", 1.0), ("llama-gqa", 0.0)])
def test_hf_generate_with_streamed_weights_matches_the_resident_model(arch, ratio):
    """HF decoder layers found by `decoder_layers`, streamed through two slots, compiled with
    kvpr: generate() gives the resident model's logits and tokens (GQA: ratio 0, weights still
    streamed)."""
    pytest.importorskip("transformers")
    import transformers

    def build():   # three layers, so that two slots must be refilled every step
        torch.manual_seed(0)
        cfg = hf_configs()[arch]
        cfg.num_hidden_layers = 3
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        model.generation_config.pad_token_id = 0
        return model

    ref = build()
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    want = hf_generate(ref, ids)
    model = build()
    stream = stream_weights(model)
    assert stream.num_layers == 3 and len(_layer_storages_of(stream)) == 2
    model.forward = torch.compile(model.forward, backend="kvpr", options={"ratio": ratio})
    got = hf_generate(model, ids)
    assert worst_rel_err(got.logits, want.logits) <= TOL
    assert torch.equal(got.sequences, want.sequences)
