"""Tiny configs for the model sweep (benchmarks/model_sweep.py): any causal-LM model type of the
installed transformers, shrunk to a model that builds and runs in seconds on a CPU.

``tiny_config(model_type)`` starts from the type's default config and sets every size it names
(layers, hidden, heads, K/V heads, head dim, MLP, vocabulary, experts, sliding window) to a small
value, in the names that config uses (``hidden_size`` / ``n_embd`` / ``d_model``, ...): a size
the default config does not name is not passed, so no stray attribute reaches the model. Composite
configs (a text model with a vision or audio tower) get each sub-config shrunk too, the text one
like a decoder, the others to a one-layer tower. ``OVERRIDES`` holds what a type needs beyond that:
some of the ``LAYOUTS`` tests/test_hf_models.py builds (multi-query Falcon, GPT-J's rotary dim,
...) and configs whose validators tie sizes together in ways the generic shrink cannot know.
Token ids are set inside the small vocabulary (an embedding's ``padding_idx`` must fit it).
"""
from __future__ import annotations

TEXT = {   # a decoder's sizes, by every name transformers configs give them
    "vocab_size": 128, "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2,
    "decoder_layers": 2, "hidden_size": 64, "n_embd": 64, "d_model": 64,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "ffn_dim": 128,
    "n_inner": 128, "d_ff": 128, "decoder_ffn_dim": 128, "ffn_hidden_size": 128,
    "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
    # mixtures of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_top_k": 2, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
}
TOWER = {  # a vision / audio tower's sizes: one small layer
    "hidden_size": 32, "num_hidden_layers": 1, "num_layers": 1, "depth": 1,
    "num_attention_heads": 2, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64,
    "projection_dim": 32, "vision_output_dim": 32,
}
SLIDING_WINDOW = 4   # below prompt + new tokens, so that sliding layers slide within the sweep
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

GQA = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
# layouts worth a config of their own (tests/test_hf_models.py builds each): q/k norms,
# interleaved fused QKV, multi-query, partial/interleaved RoPE, ALiBi
LAYOUTS = {
    "qwen3": dict(GQA, head_dim=16),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4),
    "falcon": dict(hidden_size=64, num_attention_heads=4, multi_query=True,
                   new_decoder_architecture=False),
    "gemma2": dict(GQA, head_dim=16),
    "stablelm": GQA,
    "cohere": GQA,
    "olmo2": GQA,
    "gptj": dict(n_embd=64, n_head=4, rotary_dim=8),
    "bloom": dict(hidden_size=64, n_head=4),
    "gpt_bigcode": dict(n_embd=64, n_head=4, multi_query=True),
    # interleaved RoPE whose rotate-half is stack(...).reshape_as(k)
    "roformer": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     is_decoder=True),
}
OVERRIDES = {
    **{name: LAYOUTS[name] for name in ("qwen3", "gpt_neox", "falcon", "gemma2", "gptj",
                                        "bloom", "gpt_bigcode")},
    # validators that tie sizes together
    "gpt_neo": dict(num_layers=2, attention_types=[[["global", "local"], 1]], window_size=4),
    "xlnet": dict(d_head=16),
    "prophetnet": dict(num_hidden_layers=None, num_encoder_layers=2, num_decoder_layers=2),
    "gemma4_assistant": dict(hidden_size_per_layer_input=0),
    "codegen": dict(rotary_dim=8),
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
                 attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 2, "moe_top_k": 1}),
    "dots3_note_text": dict(num_key_value_heads=4),
    "dots3_note.text_config": dict(num_key_value_heads=4),
    "zaya": dict(num_experts_per_tok=1),
    "mamba2": dict(num_heads=8),   # hidden * expand = num_heads * head_dim
    "dory": dict(sliding_window=1024),   # its eager masks mis-size below the prompt length
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default",
                                                                    "rope_theta": 10000.0}}),
    # Gemma-3n: its last layers reuse the K/V of earlier ones (four layers, two of them sharing)
    "gemma3n_text": dict(num_hidden_layers=4, num_kv_shared_layers=2,
                         layer_types=["sliding_attention", "full_attention"] * 2,
                         activation_sparsity_pattern=[0.0] * 4, laurel_rank=8,
                         hidden_size_per_layer_input=16),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "reformer": dict(axial_pos_embds_dim=[32, 32]),
    # layer patterns that leave two layers without attention (then nothing for kvpr to see)
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1]),
    "bailing_hybrid": dict(layer_group_size=2),
}


def _names(cfg) -> set:
    """The names ``cfg`` takes as sizes: its fields (not the attributes its ``__post_init__``
    derives from them, such as GPT-BigCode's ``num_key_value_heads`` from ``multi_query``) and
    their aliases."""
    fields = getattr(type(cfg), "__dataclass_fields__", None)
    names = set(fields) if fields else set(vars(cfg))
    return names | set(getattr(cfg, "attribute_map", {}) or {})


def _shrunk(cfg, sizes: dict) -> dict:
    """The entries of ``sizes`` that ``cfg`` names; the sliding window shrunk where it has one."""
    names = _names(cfg)
    out = {k: v for k, v in sizes.items() if k in names}
    if "kv_lora_rank" in names:   # multi-head latent attention: its head dims are its own
        out.pop("head_dim", None)
        out.pop("num_key_value_heads", None)
    try:
        window = getattr(cfg, "sliding_window", None)
    except Exception:  # noqa: BLE001 -- per-layer configs raise on some global names
        window = None
    if isinstance(window, int) and window > SLIDING_WINDOW:
        out["sliding_window"] = SLIDING_WINDOW
    return out


def tiny_kwargs(model_type: str) -> dict:
    """The keywords ``tiny_config`` passes to ``AutoConfig.for_model(model_type, ...)``."""
    from transformers import AutoConfig
    try:
        default = AutoConfig.for_model(model_type)
    except Exception:  # noqa: BLE001 -- a default its own validators refuse: the overrides fix it
        default = AutoConfig.for_model(model_type, **OVERRIDES.get(model_type, {}))
    kwargs = {**TOKENS, "is_decoder": True}
    subs = getattr(default, "sub_configs", None) or {}
    for key in subs:
        sub = getattr(default, key, None)
        if sub is None or not hasattr(sub, "to_dict"):
            continue
        text = "text" in key or "decoder" in key
        small = {**TOKENS, **_shrunk(sub, TEXT if text else TOWER)} if text else \
            _shrunk(sub, TOWER)
        small.update(OVERRIDES.get(f"{model_type}.{key}", {}))
        kwargs[key] = type(sub)(**small)
    kwargs.update(_shrunk(default, TEXT))
    kwargs.update(OVERRIDES.get(model_type, {}))
    return {k: v for k, v in kwargs.items() if v is not None}


def tiny_config(model_type: str):
    """A small config of ``model_type`` (see the module docstring); where the type's causal-LM
    class takes one of its sub-configs (MusicGen's decoder), that sub-config."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cfg = AutoConfig.for_model(model_type, **tiny_kwargs(model_type))
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""), None)
    wanted = getattr(cls, "config_class", None)
    if wanted is not None and not isinstance(cfg, wanted):
        for key in getattr(cfg, "sub_configs", None) or {}:
            if isinstance(getattr(cfg, key, None), wanted):
                return getattr(cfg, key)
    return cfg


def build_model(model_type: str, cfg):
    """The type's causal-LM model of ``cfg`` (its own class where ``tiny_config`` gave a
    sub-config, which the auto mapping does not list)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""), None)
    if cls is not None and type(cfg) is cls.config_class:
        return cls._from_config(cfg)
    return transformers.AutoModelForCausalLM.from_config(cfg)
