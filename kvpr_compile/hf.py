"""KVPRCache: a transformers ``Cache`` over an OffloadedKVCache, for ``model.generate()``.

Usage::

    import kvpr_compile.hf
    from kvpr_compile.hf import KVPRCache, cache_kwargs
    cache = KVPRCache(model.config, batch_size=b, max_seq_len=prompt + new, dtype=model.dtype,
                      device=model.device)
    kvpr_compile.hf.compile(model, ratio=0.5)   # options as keywords, checked here
    out = model.generate(input_ids, **cache_kwargs(model, cache), max_new_tokens=new)

``compile`` compiles the model's forward, not the module: ``torch.compile(model)`` returns an
``OptimizedModule`` whose ``.generate`` calls the original, uncompiled forward. Each model gets
a compiled frame of its own (transformers decorates every model's forward with one wrapper, and
Dynamo counts its recompile limit per code object, so models compiled through the shared wrapper
would use up one limit together). A ``KVPRCache`` whose decode steps run uncompiled warns once,
naming this call.

``cache_kwargs`` names the keyword the installed transformers takes: ``cache=`` where the model's
forward has it (recent 5.x releases, which deprecate ``past_key_values=``), ``past_key_values=``
where it does not (5.17 rejects ``cache=``).

Every attention layer's ``cache.update(k, v, layer_idx)`` becomes ``OffloadedKVCache.update``, the
call the kvpr backend recognises and rewrites. Uncompiled, it is a plain CPU-offloaded cache.
Sliding-window layers (``sliding_windows``: each layer's window as transformers' own cache
builds it from the config) size their masks and return their keys as transformers' sliding
layers do, so that compiled, only the window's past is loaded or recomputed; the store keeps
every token.
Beam search (reorder) and cropping are not supported: they raise instead of corrupting the cache
(``generate(num_beams > 1)`` raises before its prefill, hf_checks.py).
Models whose cache is not one K and one V of equal width per attention layer are refused at
construction, naming what does not fit: encoder-decoder models (cross-attention K/V would share
the self-attention store), multi-head latent attention (a latent and a rope key of two widths),
hybrid and state-space models (layers with a recurrent state instead of K/V), per-layer K/V
geometry (head dims or K/V head counts that differ between layers), V of another width than K,
and decoders with cross-attention layers. Models whose forward takes no cache at all are refused
by ``cache_kwargs``, and models whose generate() feeds the past again by its check (hf_checks.py).
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import hf_checks
from .cache import OffloadedKVCache
from .options import Options


class KVPRLayer(CacheLayerMixin):
    """One layer of the cache. A sliding-window layer (``store.windows[layer_idx]`` > 0) reports
    ``is_sliding`` and sizes its mask as transformers' ``DynamicSlidingWindowLayer`` does, and
    its update returns the same keys: the last ``window - 1`` of the past and the new ones."""
    is_compileable = False   # generate() must not auto-compile it; the user compiles with kvpr

    def __init__(self, store: OffloadedKVCache, layer_idx: int, on_uncompiled=None):
        super().__init__()
        self.store = store
        self.sliding_window = store.windows[layer_idx] or None
        self.is_sliding = self.sliding_window is not None
        self.on_uncompiled = on_uncompiled   # called by an update that kvpr did not compile
        self.layer_idx = layer_idx
        self.device = store.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        if not torch.compiler.is_compiling() and self.on_uncompiled is not None:
            self.on_uncompiled(self.layer_idx)
        return self.store.update(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        past, w = self.store.seq_len(self.layer_idx), self.sliding_window
        if w and past >= w:   # the keys update returns: [past - w + 1, past + query_length)
            return w - 1 + query_length, past - w + 1
        return past + query_length, 0

    def get_seq_length(self) -> int:
        return self.store.seq_len(self.layer_idx)

    def get_max_length(self) -> int:
        return self.store.max_seq_len

    def reset(self) -> None:
        self.store.reset()

    def offload(self):
        pass  # always offloaded

    def prefetch(self):
        pass  # the kvpr runtime loads what each layer needs

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError(
            "KVPRCache does not support beam search reordering: the offloaded store keeps its "
            "batch rows in place; use greedy or sampled decoding (num_beams=1)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("KVPRCache does not support cropping")


def _dims(config):
    """(layers, kv heads, head dim, text config) as the model's attention stores K/V: a
    decoder's own layer and head counts where the config names them apart from the encoder's
    (``decoder_layers``, ``decoder_attention_heads``: the decoder of Whisper, BART, ... run as
    a causal LM, whose ``num_hidden_layers`` and ``num_attention_heads`` are the encoder's).
    Per-layer configs (``per_layer_config``) are read through their first layer:
    ``check_supported`` has refused those whose layers differ, and their global view raises on
    per-layer names."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = _per_layer(cfg)
    one = layers[0] if layers else cfg
    decoder_heads = _attr(cfg, "decoder_attention_heads")   # the decoder of an encoder-decoder
    if decoder_heads:   # config (Whisper, BART, ...: their num_attention_heads is the encoder's)
        return (_attr(cfg, "decoder_layers") or cfg.num_hidden_layers, decoder_heads,
                _attr(cfg, "head_dim") or cfg.hidden_size // decoder_heads, cfg)
    heads = _attr(one, "num_attention_heads") or cfg.num_attention_heads
    kv_heads = _attr(one, "num_key_value_heads") or _attr(one, "num_kv_heads") or heads
    if _attr(cfg, "multi_query") and not getattr(cfg, "new_decoder_architecture", True):
        kv_heads = 1  # Falcon-7B style multi-query attention
    head_dim = (_attr(one, "head_dim") or _attr(one, "dim_head")   # CPM-Ant names it dim_head
                or cfg.hidden_size // heads)
    return cfg.num_hidden_layers, kv_heads, head_dim, cfg


def _per_layer(cfg) -> list:
    """The per-layer views of a heterogeneous config (transformers' ``per_layer_config``), or
    an empty list."""
    layers = _attr(cfg, "per_layer_config")
    try:
        return list(layers) if layers is not None else []
    except TypeError:
        return []


def _per_layer_geometry(cfg) -> dict:
    """(head_dim, kv heads) -> the layers that have it, for a per-layer config."""
    geometry = {}
    for i, layer in enumerate(_per_layer(cfg)):
        kv = _attr(layer, "num_key_value_heads") or _attr(layer, "num_attention_heads")
        geometry.setdefault((_attr(layer, "head_dim"), kv), []).append(i)
    return geometry


# layer kinds (``layer_types`` / ``layers_block_type``) whose cache is one K and one V per token
_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention", "attention",
                     "global", "local", "global_attention", "local_attention"}
# model types with no attention K/V at all, whose configs may not list their layer kinds
_STATE_SPACE_TYPES = {"mamba", "mamba2", "rwkv", "xlstm", "falcon_mamba"}


def _attr(cfg, name):
    """A config attribute, or None (some configs raise on attributes that vary per layer)."""
    try:
        return getattr(cfg, name, None)
    except Exception:  # noqa: BLE001
        return None


# model types whose attention has another number of K/V heads in some layers than the config
# names (hard-coded in their modeling code)
_PER_LAYER_KV_HEADS_TYPES = {"mimo_v2_flash": "sliding-window layers have twice the K/V heads "
                                              "of the full-attention layers"}


def _check_one_geometry(cfg, name) -> None:
    """Raise unless every layer stores K and V of one head count and one width."""
    geometry = _per_layer_geometry(cfg)
    if len(geometry) > 1:
        parts = "; ".join(f"head_dim={d}, num_key_value_heads={h} in layers "
                          f"{_ranges(layers)}" for (d, h), layers in geometry.items())
        raise NotImplementedError(
            f"KVPRCache: {name} has per-layer K/V geometry (config.per_layer_config: {parts}): "
            "the offloaded store has one head_dim and one num_kv_heads for every layer, so a "
            "head_dim= or num_kv_heads= override cannot fit all of them; models whose layers "
            "differ are not supported")
    k_width = _attr(cfg, "head_dim")
    v_width = _attr(cfg, "v_head_dim")
    if v_width and k_width and v_width != k_width:
        raise NotImplementedError(
            f"KVPRCache: {name} stores V of another width than K (config.v_head_dim={v_width}, "
            f"head_dim={k_width}): the offloaded store holds K and V of one head_dim; models "
            "whose V is narrower or wider than K are not supported")
    if name in _PER_LAYER_KV_HEADS_TYPES:
        raise NotImplementedError(
            f"KVPRCache: {name}'s {_PER_LAYER_KV_HEADS_TYPES[name]}: the offloaded store has "
            "one num_kv_heads for every layer; models whose layers differ are not supported")


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = cur
    return ", ".join(runs)


def sliding_windows(config) -> list[int]:
    """Per layer, the sliding window transformers' own cache gives that layer (0: none): the
    layers of kind ``sliding_attention`` (``config.layer_types``, or every layer when the config
    names a ``sliding_window`` and no kinds), as ``DynamicCache(config=...)`` builds them.
    Chunked-attention layers read whole chunks, not a window: 0."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
        kinds, kwargs = get_layer_types_and_kwargs(cfg)
    except (ImportError, AttributeError):   # a transformers without per-layer configs
        kinds = _attr(cfg, "layer_types")
        window = _attr(cfg, "sliding_window")
        if kinds is None:
            kinds = ["sliding_attention" if window else "full_attention"] * cfg.num_hidden_layers
        kwargs = [{"sliding_window": window}] * len(kinds)
    return [int(kw.get("sliding_window") or 0) if kind == "sliding_attention" else 0
            for kind, kw in zip(kinds, kwargs)]


def check_supported(config) -> None:
    """Raise ``NotImplementedError`` naming the reason if ``config`` describes a model whose
    cache KVPRCache cannot hold exactly."""
    name = _attr(config, "model_type") or type(config).__name__
    if _attr(config, "is_encoder_decoder"):
        raise NotImplementedError(
            f"KVPRCache: {name} is an encoder-decoder model (config.is_encoder_decoder): its "
            "cross-attention K/V would go into the self-attention store; encoder-decoder models "
            "are not supported, use a decoder-only model")
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = _attr(cfg, "model_type") or name
    if _attr(cfg, "kv_lora_rank"):
        raise NotImplementedError(
            f"KVPRCache: {name} uses multi-head latent attention (MLA, kv_lora_rank="
            f"{cfg.kv_lora_rank}): its cache holds a latent and a rope key of different widths, "
            "not one K and one V per head; multi-head latent attention is not supported")
    _check_one_geometry(cfg, name)
    cross = _attr(cfg, "cross_attention_layers")
    if cross or _attr(cfg, "add_cross_attention"):
        where = f"config.cross_attention_layers={list(cross)}" if cross else (
            "config.add_cross_attention")
        raise NotImplementedError(
            f"KVPRCache: {name} has cross-attention layers ({where}): their K/V come from "
            "another input (an encoder, an image), not from the tokens, and a transformers "
            "cache holds them in layers KVPRCache does not have; models with cross-attention "
            "are not supported")
    if name in _STATE_SPACE_TYPES:
        raise NotImplementedError(
            f"KVPRCache: {name} is a state-space model (recurrent state, no attention K/V); "
            "only attention layers can be offloaded by KVPRCache")
    for attr in ("layer_types", "layers_block_type", "block_types"):
        kinds = _attr(cfg, attr)
        if not isinstance(kinds, (list, tuple)):
            continue
        other = sorted({str(k) for k in kinds} - _ATTENTION_LAYERS)
        if other:
            raise NotImplementedError(
                f"KVPRCache: {name} is a hybrid or state-space model: config.{attr} has layers of "
                f"type {', '.join(repr(k) for k in other)} (not attention with a K/V cache); "
                "only models whose every layer is attention are supported")


_UNCOMPILED = (
    "kvpr: this KVPRCache is filled by a forward that kvpr did not compile (a decode step at "
    "position {pos} ran uncompiled): the tokens are exact, but the cache is read by the slow "
    "offloaded path, without recompute or prefetch. If the model was compiled as a module: "
    "torch.compile(model, backend=\"kvpr\") does not reach model.generate(), which calls the "
    "original forward; call kvpr_compile.hf.compile(model, **options) instead. If kvpr warned "
    "that torch.compile stopped compiling a function, that warning says what to change. To use "
    "the cache uncompiled on purpose, make it with KVPRCache(..., warn_uncompiled=False).")


class KVPRCache(Cache):
    def __init__(self, config, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                 device=None, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 warn_uncompiled: bool = True):
        """K/V geometry comes from the config; ``num_kv_heads`` / ``head_dim`` override it for
        architectures that store K/V with another layout than their config names.
        Encoder-decoder, multi-head latent attention, hybrid and state-space models, per-layer
        K/V geometry, V of another width than K and cross-attention layers raise
        ``NotImplementedError`` here (see ``check_supported``). ``warn_uncompiled``: warn once
        when a decode step on a non-empty cache runs uncompiled (see ``compile``)."""
        check_supported(config)
        num_layers, kv_heads, cfg_head_dim, cfg = _dims(config)
        kv_heads, head_dim = num_kv_heads or kv_heads, head_dim or cfg_head_dim
        if dtype is None:
            dtype = getattr(cfg, "dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        windows = sliding_windows(config)
        if len(windows) != num_layers and not any(windows):   # counted over the encoder's
            windows = [0] * num_layers                         # layers (see _dims)
        self.offloaded = OffloadedKVCache(num_layers, batch_size, max_seq_len, kv_heads, head_dim,
                                          dtype=dtype, device=device or "cpu",
                                          windows=windows)
        self._warn_uncompiled = warn_uncompiled
        on_uncompiled = self._uncompiled_update if warn_uncompiled else None
        super().__init__(layers=[KVPRLayer(self.offloaded, i, on_uncompiled)
                                 for i in range(num_layers)])

    def _uncompiled_update(self, layer_idx: int) -> None:
        """An update outside any compiled graph: warn once if it is a decode step (a prefill
        alone, e.g. to read its logits, is not worth a warning)."""
        pos = self.offloaded.seq_len(layer_idx)
        if layer_idx == 0 and pos > 0 and self._warn_uncompiled:
            self._warn_uncompiled = False
            warnings.warn(_UNCOMPILED.format(pos=pos), UserWarning, stacklevel=3)

    def reset(self):
        self.offloaded.reset()


_ORIGINAL = "_kvpr_original_forward"   # on a forward compile() made: what it compiled


def _own_frame(forward):
    """``forward`` called from a function with a code object of its own: Dynamo keeps its cache
    and counts its recompile limit per code object, and transformers' decorated forwards share
    one (``can_return_tuple``'s wrapper), so every model compiled through them would share one
    limit."""
    def kvpr_forward(*args, **kwargs):
        return forward(*args, **kwargs)
    kvpr_forward.__code__ = kvpr_forward.__code__.replace()   # a distinct, equal code object
    return functools.wraps(forward)(kvpr_forward)


def compile(model, *, dynamic: bool | None = None, **options):
    """Compile ``model``'s forward with the kvpr backend, in place, so ``model.generate()`` and
    ``model(...)`` run it; returns ``model``. ``options`` are the backend's options
    (``ratio=0.5``, ``inner="piecewise"``, ...), checked here: a bad one raises kvpr's
    ``ValueError`` now, not wrapped by Dynamo at the first call. A ``torch.compile``'d module
    (``OptimizedModule``) is unwrapped first. Calling it again compiles the same forward anew
    with the new options."""
    model = getattr(model, "_orig_mod", model)
    Options.parse(options)
    forward = getattr(model.forward, _ORIGINAL, model.forward)   # not an earlier compile of it
    compiled = torch.compile(_own_frame(forward), backend="kvpr", dynamic=dynamic,
                             options=options or None)
    setattr(compiled, _ORIGINAL, forward)
    model.forward = compiled
    hf_checks.install(model, KVPRCache)   # before the first generate(), which cache_kwargs
    return model                          # (an argument of it) would come too late for


def cache_keyword(model) -> str:
    """``"cache"`` if ``model``'s forward takes a ``cache`` argument, else ``"past_key_values"``;
    ``NotImplementedError`` if it takes neither (a model without a transformers cache, e.g.
    OpenAI GPT: generate() would reject the keyword, a plain call would drop it)."""
    params = inspect.signature(type(model).forward).parameters
    if "cache" not in params and "past_key_values" not in params:
        raise NotImplementedError(
            f"KVPRCache: {type(model).__name__}.forward takes no cache (neither cache= nor "
            "past_key_values=): it recomputes the whole sequence at every step, so there is no "
            "K/V to offload; models without a transformers cache are not supported")
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for ``model.generate(...)`` and ``model(...)`` calls, with the keyword
    the installed transformers accepts without a deprecation warning (see cache_keyword).
    Also installs, once per model, the check that each call matches what the cache holds
    (hf_checks.py: a ``reset()`` in the middle of a generation raises instead of running on),
    and the check of each ``generate()`` call before its prefill (capacity, batch, beam search):
    from the next ``generate()`` on when the model was not given to ``compile``, since the
    first one was looked up before this function ran as its argument."""
    model = getattr(model, "_orig_mod", model)   # generate() runs on the wrapped module
    hf_checks.install(model, KVPRCache)
    return {cache_keyword(model): cache}
