"""Run a site's recompute slice over past tokens: K,V[:l] = slice(X[:l], side inputs[:l]).

The slice was captured from a single-token graph, so it maps one token's records (X as
``(batch, 1, hidden)``, each side input as the program computed it) to that token's
``(batch, kv_heads, 1, head_dim)`` K and V. ``torch.func.vmap`` over the record dimension turns it
into one batched computation (one GEMM for all l tokens), with shapes and constants exactly as
the program traced them. It runs behind the opaque ``kvpr::recompute`` op (slices are registered
here by id): vmap over a symbolic l under AOT tracing would specialise on l and recompile per step.
"""
from __future__ import annotations

import torch
from torch import fx


_SLICES: dict[int, "Recompute"] = {}


class Recompute:
    """A registered slice; ``const_is_tensor`` says which constants arrive as tensors vs ints."""

    def __init__(self, module: fx.GraphModule, num_token_inputs: int, const_is_tensor: list[bool]):
        self.module = module
        self.num_token_inputs = num_token_inputs
        self.const_is_tensor = const_is_tensor
        self.id = len(_SLICES)
        _SLICES[self.id] = self

    def __call__(self, tokens, tensor_consts, int_consts):
        t_iter, i_iter = iter(tensor_consts), iter(int_consts)
        consts = [next(t_iter) if is_t else next(i_iter) for is_t in self.const_is_tensor]
        in_dims = (0,) * len(tokens) + (None,) * len(consts)
        k, v = torch.func.vmap(self.module, in_dims=in_dims, out_dims=2)(*tokens, *consts)
        return k.squeeze(3), v.squeeze(3)   # (b, hkv, l, 1, d) -> (b, hkv, l, d)


def get_slice(slice_id: int) -> Recompute:
    return _SLICES[slice_id]


def split_len(past, num: int, den: int):
    """l = floor(ratio * past) for ratio = num/den; works on ints and SymInts alike."""
    return (past * num) // den


def empty_past(t: torch.Tensor) -> torch.Tensor:
    """A zero-length K/V prefix shaped like ``t`` (no recompute)."""
    return t[:, :, :0]
