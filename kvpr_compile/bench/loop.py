"""Greedy decoding over a Hugging Face causal LM's ``forward`` with an explicit cache object.

Each call is ``forward(input_ids=..., <cache kwarg>=cache, use_cache=True, logits_to_keep=1)``;
the next token is the argmax of the last position, kept on the device (no host sync per step).
The cache keyword is ``cache`` in recent transformers and ``past_key_values`` in older ones
(``kvpr_compile.hf.cache_keyword``); it and ``logits_to_keep`` are looked up in the model's
signature, so the loop runs on both.
"""
from __future__ import annotations

import inspect

import torch


def forward_kwargs(model) -> tuple[str, bool]:
    """(name of the cache keyword, whether ``logits_to_keep`` is accepted) for ``model.forward``."""
    from ..hf import cache_keyword
    params = inspect.signature(type(model).forward).parameters
    return cache_keyword(model), "logits_to_keep" in params


class GreedyDecoder:
    """``prefill(ids)`` then ``step()`` repeatedly; ``tokens()`` is everything generated."""

    def __init__(self, model, forward, cache):
        self.forward = forward
        self.cache = cache
        self.cache_kw, self.keep = forward_kwargs(model)
        self._tokens: list[torch.Tensor] = []

    def _call(self, ids: torch.Tensor) -> torch.Tensor:
        kwargs = {self.cache_kw: self.cache, "use_cache": True}
        if self.keep:
            kwargs["logits_to_keep"] = 1
        logits = self.forward(input_ids=ids, **kwargs).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        self._tokens.append(nxt)
        return nxt

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._call(input_ids)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        return self._call(self._tokens[-1])

    def tokens(self) -> torch.Tensor:
        """(batch, generated) on the CPU."""
        return torch.cat(self._tokens, dim=1).cpu()
