"""Input checks of one cache access against the cache's geometry, run where values are concrete.

The kvpr ops call these at run time, before they touch the store, so a compiled graph never
reads a cache's ``batch_size``, ``max_seq_len``, dtype or device while Dynamo traces it: no guard
on them, and one compiled graph serves caches of any capacity and batch size. Bad input raises
before anything is written, and the Python-side lengths (updated by Dynamo after the graph
returns) stay as they were, so the cache is intact.

Host time: a decode step checks every layer with the same geometry. Each store remembers the
last geometry it accepted for writes and for reads (``checked_write``, ``checked_read``); a call
with the same one checks only what differs per layer (the layer index, the capacity).
"""
from __future__ import annotations

import torch

_WHO = "OffloadedKVCache.update"
_SIZING = (". Make the cache with max_seq_len >= prompt + max_new_tokens (every token a "
           "sequence will hold), and call cache.reset() between sequences; nothing was written")
_BATCH_HINT = (". Make the cache with the batch size the model runs (for generate(): the "
               "prompt's rows x num_return_sequences)")
_DIMS = ("batch", "num_kv_heads", "n_new", "head_dim")


def _misfit(store, shape) -> str:
    """Which of a K/V's dims differ from the cache's, in words."""
    want = (store.batch_size, store.num_kv_heads, None, store.head_dim)
    wrong = [f"{name} {got} (the cache has {name if name != 'batch' else 'batch_size'}="
             f"{expected})" for name, got, expected in zip(_DIMS, shape, want)
             if expected is not None and got != expected]
    return ", ".join(wrong)


def check_layer(store, layer: int) -> None:
    if not 0 <= layer < store.num_layers:
        raise IndexError(f"OffloadedKVCache: layer {layer} out of range [0, {store.num_layers})")


def _check_device(store, device: torch.device, what: str) -> None:
    if device.type != store.device.type or (
            store.device.index is not None and device.index != store.device.index):
        raise ValueError(f"{_WHO}: {what} is on {device}, cache computes on {store.device}")


def check_write(store, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """New tokens' ``k, v`` ``(batch, kv_heads, n, head_dim)`` appended at ``pos`` of ``layer``."""
    check_layer(store, layer)
    seen = (k.shape, v.shape, k.dtype, v.dtype, k.device, v.device)
    if seen != store.checked_write:
        _check_kv(store, k, v)
        store.checked_write = seen
    n = k.shape[2]
    if pos + n > store.max_seq_len:
        raise ValueError(f"OffloadedKVCache: layer {layer} holds {pos} tokens; {n} more exceed "
                         f"max_seq_len={store.max_seq_len}{_SIZING}")


def _check_kv(store, k: torch.Tensor, v: torch.Tensor) -> None:
    n = k.shape[2] if k.dim() == 4 else -1
    want = (store.batch_size, store.num_kv_heads, n, store.head_dim)
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or tuple(t.shape) != want:
            what = _misfit(store, t.shape) if t.dim() == 4 and name == "k" else ""
            rows = t.dim() == 4 and t.shape[0] != store.batch_size
            raise ValueError(
                f"{_WHO}: {name} has {what or 'shape ' + str(tuple(t.shape))}; it must be "
                f"(batch={store.batch_size}, num_kv_heads={store.num_kv_heads}, n_new, "
                f"head_dim={store.head_dim}){' like k' if name == 'v' else ''}, got "
                f"{tuple(t.shape)}{_BATCH_HINT if rows else ''}")
        if t.dtype != store.dtype:
            raise TypeError(f"{_WHO}: {name} has dtype {t.dtype}, cache holds {store.dtype}")
        _check_device(store, t.device, name)


def check_read(store, layer: int, end: int, batch: int, heads: int, head_dim: int,
               dtype: torch.dtype, device: torch.device) -> None:
    """A load of positions ``[.., end)`` of ``layer`` for a graph whose K/V are
    ``(batch, heads, *, head_dim)`` of ``dtype`` on ``device``."""
    check_layer(store, layer)
    seen = (batch, heads, head_dim, dtype, device)
    if seen != store.checked_read:
        _check_geometry(store, batch, heads, head_dim, dtype, device)
        store.checked_read = seen
    if end > store.max_seq_len:
        raise ValueError(f"OffloadedKVCache: layer {layer} read up to position {end} exceeds "
                         f"max_seq_len={store.max_seq_len}{_SIZING}")


def _check_geometry(store, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                    device) -> None:
    if (batch, heads, head_dim) != (store.batch_size, store.num_kv_heads, store.head_dim):
        raise ValueError(
            f"{_WHO}: k has {_misfit(store, (batch, heads, None, head_dim))}; it must be "
            f"(batch={store.batch_size}, num_kv_heads={store.num_kv_heads}, n_new, "
            f"head_dim={store.head_dim}), the compiled step has (batch={batch}, "
            f"num_kv_heads={heads}, head_dim={head_dim})")
    if dtype != store.dtype:
        raise TypeError(f"{_WHO}: k has dtype {dtype}, cache holds {store.dtype}")
    _check_device(store, torch.device(device), "k")


def check_token_read(store, layer: int, end: int, specs) -> None:
    """A load of per-token records ``[0, end)`` of ``layer``; ``specs[0]`` describes X, whose
    record is ``(batch, 1, hidden)``. Checked before the store compares what it holds with what
    the graph wants, so a bad cache raises instead of discarding stored X."""
    check_layer(store, layer)
    batch = specs[0][0][0] if specs and specs[0][0] else store.batch_size
    if batch != store.batch_size:
        raise ValueError(f"{_WHO}: k has batch {batch} (the cache has batch_size="
                         f"{store.batch_size}); it must be (batch={store.batch_size}, "
                         f"num_kv_heads={store.num_kv_heads}, n_new, head_dim={store.head_dim}), "
                         f"the compiled step has batch={batch}")
    if end > store.max_seq_len:
        raise ValueError(f"OffloadedKVCache: layer {layer} read up to position {end} exceeds "
                         f"max_seq_len={store.max_seq_len}{_SIZING}")
