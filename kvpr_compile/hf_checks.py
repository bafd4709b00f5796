"""The check, before each forward of a Hugging Face model, that a ``KVPRCache`` still holds the
past the call describes.

``cache.reset()`` empties the cache; called in the middle of a generation (a logits processor,
a stopping criterion, another thread), the next step still brings generate's attention mask
over the whole past, and the model would attend to nothing and answer as if the prompt were one
token long -- no error anywhere. Two signs give it away, and the call then raises before the
model runs (nothing is written):

- a 2-D attention mask covers the past and the new tokens, so its length must be the cache's
  length plus the call's tokens (shapes only: checked on every call, no device sync);
- without a mask (recent generate() passes ``position_ids`` instead), a cache emptied by
  ``reset()`` after use gets a call whose every row starts past position 0 (``position_ids`` or
  ``cache_position``). Read only while the cache is empty: one small device read per generation.
  A fresh cache is not checked (a caller may start at an offset on purpose).

Within a checked ``generate()`` call, each forward after the first adds one token to the
sequence, so the cache may grow by what the prefill stored per token (``_check_growth``): a
model whose generate() feeds the whole sequence again and whose attention stores it all
(transformers' MPT, with any cache) would store and attend its past twice; the next forward, or
generate() itself after the last one, raises ``NotImplementedError`` instead of returning its
tokens. A generate() with a
chunked prefill (``prefill_chunk_size``) is not counted.

The checks run outside the compiled forward (a module pre-hook), so Dynamo never guards on them.

Before a ``generate()`` call's first token, what the call and its generation config say is
checked against the cache (``check_generate``), so a misfit raises before the prefill, in
words, instead of several tokens in: the prompt plus ``max_new_tokens`` must fit
``max_seq_len``, the batch (times ``num_return_sequences``) must be the cache's, and beam search
(``num_beams > 1``, which reorders the cache's rows) is refused.

``cache_kwargs(model, cache)`` (hf.py) installs the hook and the ``generate`` check once per
model, naming the cache class it checks (``KVPRCache``), so this module does not import hf.py.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

_HOOKED = "_kvpr_cache_check_hook"
_GENERATE_CHECKED = "_kvpr_generate_checked"
_IN_GENERATE = "_kvpr_in_generate"   # on a cache while a checked generate() runs on it
_RESET_HINT = (" -- was cache.reset() called in the middle of a generation? Reset between "
               "generations, and start the next one from its prompt")


def _call_tokens(kwargs) -> int | None:
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[1]
    return None


def _first_position(kwargs) -> int | None:
    """The smallest first position over the rows (cache_position, else position_ids)."""
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.numel():
        return int(position_ids[..., 0].min())
    return None


def check_cache_matches_mask(module: nn.Module, args, kwargs, cache_type: type) -> None:
    """Raise if a ``cache_type`` cache in ``kwargs`` does not hold the past the call describes."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    mask = kwargs.get("attention_mask")
    if not isinstance(cache, cache_type):
        return
    new = _call_tokens(kwargs)
    if new is None:
        return
    past = cache.get_seq_length()
    _check_not_fed_again(cache, past, new)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        if mask.shape[1] != past + new:
            raise ValueError(f"KVPRCache: the attention mask covers {mask.shape[1]} tokens but "
                             f"the cache holds {past} and this call adds {new}"
                             f"{_RESET_HINT if past == 0 else ''}; nothing was written")
        return
    if past == 0 and cache.offloaded.reset_after_use:
        first = _first_position(kwargs)
        if first is not None and first > 0:
            raise ValueError(f"KVPRCache: the cache was reset and is empty, but this call "
                             f"continues at position {first}{_RESET_HINT}; nothing was written")


@dataclass
class _Feed:
    """What one checked generate() call has fed its cache so far."""

    forwards: int = 0           # forwards so far
    past: int = 0               # the cache's length before the last one
    first_tokens: int = 0       # the first forward's new tokens
    per_token: int | None = None   # the cache's growth per token of that forward


def _check_growth(feed: _Feed, past: int) -> None:
    """A forward after the first adds one generated token to the sequence, so the cache may grow
    by what the prefill stored per token (one for most models; Dory's loops store two, CPM-Ant's
    prefix more): more means the model fed again tokens the cache already holds (its generate()
    does not cut input_ids to the new tokens and its attention stores them all), which are then
    stored and attended twice."""
    grown = past - feed.past
    if feed.forwards == 1:   # the prefill: its growth per token
        feed.per_token = -(-grown // feed.first_tokens) if feed.first_tokens else None
    elif feed.forwards >= 2 and feed.per_token is not None and grown > feed.per_token:
        raise NotImplementedError(
            f"KVPRCache: generate() step {feed.forwards} grew the cache by {grown} tokens for "
            f"one new token (the prefill stored {feed.per_token} per token): this model feeds "
            "again tokens the cache already holds (its generate() does not cut input_ids to "
            "the new tokens), so they are stored and attended twice; models whose generate() "
            "re-feeds the past are not supported. The generation is stopped and its result "
            "discarded")


def _check_not_fed_again(cache, past: int, new: int) -> None:
    """Within a checked ``generate()`` call: the growth of the cache by the last forward
    (``_check_growth``), then this forward counted."""
    feed = getattr(cache, _IN_GENERATE, None)
    if feed is None:
        return
    _check_growth(feed, past)
    if feed.forwards == 0:
        feed.first_tokens = new
    feed.forwards, feed.past = feed.forwards + 1, past


def _setting(model, kwargs, name):
    """A generation setting as generate() will see it: the call's keyword, else the call's
    ``generation_config``, else the model's."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(config, name, None)


def _prompt(args, kwargs):
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs"),
                  kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value
    return None


def check_generate(model: nn.Module, args, kwargs, cache_type: type) -> None:
    """Raise ``ValueError`` before the prefill if a ``generate(*args, **kwargs)`` call cannot
    run through its ``cache_type`` cache: beam search, another batch, too few positions."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, cache_type):
        return
    beams = _setting(model, kwargs, "num_beams") or 1
    if beams > 1:
        raise ValueError(
            f"KVPRCache: beam search (num_beams={beams}) is not supported: it reorders the "
            "cache's batch rows after every step, and the offloaded store keeps its rows in "
            "place; use greedy or sampled decoding (num_beams=1). Nothing was run")
    prompt = _prompt(args, kwargs)
    if prompt is None:
        return
    rows, length = prompt.shape[0], prompt.shape[1]
    sequences = _setting(model, kwargs, "num_return_sequences") or 1
    store = cache.offloaded
    if rows * sequences != store.batch_size:
        times = f" x num_return_sequences={sequences}" if sequences > 1 else ""
        raise ValueError(
            f"KVPRCache: generate() gets {rows} prompt rows{times} = {rows * sequences} "
            f"sequences, but the cache was made for batch_size={store.batch_size}: make it "
            f"KVPRCache(config, batch_size={rows * sequences}, ...). Nothing was run")
    new = _setting(model, kwargs, "max_new_tokens")
    if new is None:
        max_length = _setting(model, kwargs, "max_length")
        new = max_length - length if max_length is not None else None
    if new is None or new <= 0:
        return
    need = length + new - 1   # the last new token is returned, never fed back
    if need > store.max_seq_len:
        raise ValueError(
            f"KVPRCache: this generation needs {need} positions (a prompt of {length} tokens, "
            f"max_new_tokens={new}; the last token is not stored) but the cache has "
            f"max_seq_len={store.max_seq_len}: make it KVPRCache(config, batch_size, "
            f"max_seq_len=prompt + max_new_tokens = {length + new}, ...), and call "
            "cache.reset() between generations. Nothing was run")


def _checked_generate(model: nn.Module, cache_type: type):
    generate = model.generate

    @functools.wraps(generate)
    def generate_checked(*args, **kwargs):
        check_generate(model, args, kwargs, cache_type)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not isinstance(cache, cache_type) or _setting(model, kwargs, "prefill_chunk_size"):
            return generate(*args, **kwargs)   # a chunked prefill grows by more than one
        feed = _Feed()
        object.__setattr__(cache, _IN_GENERATE, feed)
        try:
            out = generate(*args, **kwargs)
        finally:
            object.__setattr__(cache, _IN_GENERATE, None)
        _check_growth(feed, cache.get_seq_length())   # the last forward's growth
        return out
    return generate_checked


def install(model: nn.Module, cache_type: type) -> None:
    """Add the check of ``cache_type`` caches as a forward pre-hook of ``model``, and the check
    of each ``generate()`` call before its prefill (once each)."""
    if getattr(model, _HOOKED, None) is None:
        handle = model.register_forward_pre_hook(
            functools.partial(check_cache_matches_mask, cache_type=cache_type), with_kwargs=True)
        object.__setattr__(model, _HOOKED, handle)
    if hasattr(model, "generate") and not getattr(model, _GENERATE_CHECKED, False):
        object.__setattr__(model, "generate", _checked_generate(model, cache_type))
        object.__setattr__(model, _GENERATE_CHECKED, True)
