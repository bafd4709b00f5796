"""KVPRCache refuses, at construction and with a message naming the reason, models whose cache
is not one K and one V of equal width per attention layer (configs only: nothing downloaded)."""
from __future__ import annotations

import pytest
import transformers as tf

from kvpr_compile.hf import KVPRCache

pytestmark = pytest.mark.quick

SMALL = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
             vocab_size=64)

REFUSED = [
    ("t5", lambda: tf.T5Config(d_model=32, d_kv=8, num_heads=4, num_layers=2, vocab_size=64),
     ["encoder-decoder", "is_encoder_decoder"]),
    ("bart", lambda: tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, vocab_size=64),
     ["encoder-decoder"]),
    ("deepseek_v2", lambda: tf.DeepseekV2Config(**SMALL, kv_lora_rank=16, q_lora_rank=None,
                                                qk_rope_head_dim=4, qk_nope_head_dim=8,
                                                v_head_dim=8),
     ["multi-head latent attention", "kv_lora_rank=16"]),
    ("deepseek_v3", lambda: tf.DeepseekV3Config(**SMALL, kv_lora_rank=16, qk_rope_head_dim=4,
                                                qk_nope_head_dim=8, v_head_dim=8),
     ["multi-head latent attention"]),
    ("jamba", lambda: tf.JambaConfig(**SMALL), ["hybrid", "linear_attention", "jamba"]),
    ("bamba", lambda: tf.BambaConfig(**SMALL, mamba_n_heads=8, mamba_d_head=8),
     ["hybrid", "linear_attention", "bamba"]),
    ("qwen3_next", lambda: tf.Qwen3NextConfig(**SMALL), ["hybrid", "linear_attention"]),
    ("mamba", lambda: tf.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64),
     ["state-space", "mamba"]),
    ("falcon_h1", lambda: tf.FalconH1Config(), ["hybrid", "'hybrid'"]),
    # per-layer head dims (Gemma-4 style): transformers' global view raises on head_dim
    ("gemma4", lambda: tf.AutoConfig.for_model("gemma4"),
     ["per-layer K/V geometry", "head_dim=256", "head_dim=512", "layers 5, 11"]),
    # V narrower than K, sliding layers with more K/V heads (MiMo-V2-Flash style)
    ("mimo_v2_flash", lambda: tf.AutoConfig.for_model("mimo_v2_flash"),
     ["V of another width than K", "v_head_dim=128", "head_dim=192"]),
    ("mimo_v2_flash-equal-widths", lambda: tf.AutoConfig.for_model("mimo_v2_flash",
                                                                   v_head_dim=192),
     ["twice the K/V heads"]),
    # cross-attention decoders (Mllama style; GPT-2 with add_cross_attention)
    ("mllama", lambda: tf.AutoConfig.for_model("mllama"),
     ["cross-attention layers", "cross_attention_layers=[3, 8"]),
    ("gpt2-cross-attention", lambda: tf.GPT2Config(n_layer=2, add_cross_attention=True),
     ["cross-attention layers", "add_cross_attention"]),
]


@pytest.mark.parametrize("name,make,words", REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_models_are_refused_by_name(name, make, words):
    with pytest.raises(NotImplementedError) as err:
        KVPRCache(make(), batch_size=2, max_seq_len=16)
    msg = str(err.value)
    assert msg.startswith("KVPRCache:")
    for word in words:
        assert word in msg


ACCEPTED = [
    ("llama", lambda: tf.LlamaConfig(**SMALL, num_key_value_heads=2)),
    ("gemma3", lambda: tf.Gemma3TextConfig(**SMALL, head_dim=8, num_key_value_heads=2)),
    ("qwen2", lambda: tf.Qwen2Config(**SMALL, num_key_value_heads=2)),
]


@pytest.mark.parametrize("name,make", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_attention_only_decoders_are_accepted(name, make):
    cache = KVPRCache(make(), batch_size=2, max_seq_len=16)
    assert cache.offloaded.num_layers == 2


def test_per_layer_geometry_is_refused_even_with_overrides():
    """A head_dim= override cannot fit layers of two widths: refused in words, not transformers'
    AmbiguousGlobalPerLayerAttributeError from reading the global head_dim."""
    with pytest.raises(NotImplementedError, match=r"^KVPRCache: gemma4_text has per-layer K/V "
                                                  r"geometry.*override cannot fit"):
        KVPRCache(tf.AutoConfig.for_model("gemma4"), 1, 8, head_dim=256, num_kv_heads=4)
