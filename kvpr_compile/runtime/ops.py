"""The ``kvpr::`` custom ops: the only places where compiled graphs touch the CPU store.

Op boundaries (the CUDA runtime fills in the same ones with streams and events):

- ``cache_update``: the uncompiled contract; store new K,V, return the full K,V on the device.
- ``load_kv``: K,V for positions ``[start, end)`` (the streamed part). ``owned=True`` (graphs run
  by inductor, which may recycle op outputs' memory) loads into fresh tensors, not device slots.
- ``load_tokens``: per-token recompute inputs (X and side inputs) for positions ``[0, end)``.
- ``wait``: the loaded tensors are ready for use (declared as mutating them so that nothing
  reorders a read before it, under functionalization too).
- ``store_tokens``: append new tokens' K, V and recompute inputs.
- ``assemble``: recomputed ``[0, l)`` ++ loaded ``[l, past)`` ++ new tokens, with a fallback to
  stored K,V where the recompute inputs were never stored (cache filled by uncompiled code).
- ``prefetch_next``: after a step's last assemble, the first layer's loads of the next call
  (cuda_runtime.prefetch_next; nothing on the CPU). It returns nothing and writes nothing the
  graph reads: graphs handed to inductor do not get it (passes/prefetch.py).

Every op takes the cache's handle tensor; ops with side effects declare it mutated.
On CUDA each op hands over to ``cuda_runtime`` (side streams, events, device slots); on CPU to
``direct``'s synchronous functions, the same ones the compiled step calls.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cuda_runtime, direct
from .checks import check_read, check_token_read, check_write
from .store import lookup


@torch.library.custom_op("kvpr::cache_update", mutates_args=("handle",))
def cache_update(handle: Tensor, k: Tensor, v: Tensor, layer: int, pos: int) -> tuple[Tensor, Tensor]:
    store = lookup(handle)
    check_write(store, layer, pos, k, v)
    handle[1] += 1   # the cache's version: every op that writes the store bumps it
    if cuda_runtime.handles(k.device):
        return cuda_runtime.runtime(store, k.device).cache_update(store, k, v, layer, pos)
    return direct.cpu_cache_update(store, k, v, layer, pos)


@cache_update.register_fake
def _(handle, k, v, layer, pos):
    b, h, n, d = k.shape
    return k.new_empty(b, h, pos + n, d), v.new_empty(b, h, pos + n, d)


@torch.library.custom_op("kvpr::load_kv", mutates_args=())
def load_kv(handle: Tensor, layer: int, start: int, end: int, batch: int, heads: int,
            head_dim: int, dtype: torch.dtype, device: torch.device,
            owned: bool = False) -> tuple[Tensor, Tensor]:
    store = lookup(handle)
    check_read(store, layer, end, batch, heads, head_dim, dtype, device)
    if cuda_runtime.handles(device):  # views (b, heads, n, d) of a sequence-major device slot
        return cuda_runtime.runtime(store, device).load_kv(store, layer, start, end, batch, heads,
                                                            head_dim, dtype, owned)
    k, v = store.read_kv(layer, start, end, device)
    return k.contiguous(), v.contiguous()


@load_kv.register_fake
def _(handle, layer, start, end, batch, heads, head_dim, dtype, device, owned=False):
    if cuda_runtime.handles(device):  # same strides as the real slot views
        shape = (end - start, batch, heads, head_dim)
        return (torch.empty(shape, dtype=dtype, device=device).permute(1, 2, 0, 3),
                torch.empty(shape, dtype=dtype, device=device).permute(1, 2, 0, 3))
    shape = (batch, heads, end - start, head_dim)
    return (torch.empty(shape, dtype=dtype, device=device),
            torch.empty(shape, dtype=dtype, device=device))


# Record dtypes travel as small ints (schemas have no list-of-dtype type).
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.bool)


def record_specs(likes) -> tuple[list, list[int], list[int]]:
    """(flat shapes, ranks, dtype codes) describing per-token records shaped like ``likes``."""
    shapes, ranks, codes = [], [], []
    for t in likes:
        shapes.extend(t.shape)
        ranks.append(t.dim())
        codes.append(DTYPES.index(t.dtype))
    return shapes, ranks, codes


def _split_specs(shapes, ranks, codes):
    out, i = [], 0
    for r, c in zip(ranks, codes):
        out.append((tuple(shapes[i:i + r]), DTYPES[c]))
        i += r
    return out


@torch.library.custom_op("kvpr::load_tokens", mutates_args=())
def load_tokens(handle: Tensor, layer: int, end: int, shapes: list[int], ranks: list[int],
                dtypes: list[int], device: torch.device, owned: bool = False) -> list[Tensor]:
    specs = _split_specs(shapes, ranks, dtypes)
    store = lookup(handle)
    check_token_read(store, layer, end, specs)
    if cuda_runtime.handles(device):  # views (end, *record) of a device slot
        return cuda_runtime.runtime(store, device).load_tokens(store, layer, end, specs, owned)
    loaded = store.read_tokens(layer, end, specs, device)
    return [t.clone() if t.device.type == "cpu" else t for t in loaded]


@load_tokens.register_fake
def _(handle, layer, end, shapes, ranks, dtypes, device, owned=False):
    return [torch.empty((end, *shape), dtype=dtype, device=device)
            for shape, dtype in _split_specs(shapes, ranks, dtypes)]


@torch.library.custom_op("kvpr::wait", mutates_args=("tensors",))
def wait(tensors: list[Tensor]) -> None:
    """Synchronous loads (CPU) are ready as soon as they return; on CUDA the current stream
    waits for the copy events of the slots the tensors are views of."""
    cuda_runtime.wait(tensors)


@torch.library.custom_op("kvpr::store_tokens", mutates_args=("handle",))
def store_tokens(handle: Tensor, layer: int, pos: int, k: Tensor, v: Tensor,
                 inputs: list[Tensor], tdims: list[int], shared: Optional[list[int]] = None) -> None:
    """``shared``: flat ``(index, owner, owner_index)`` triples, the side inputs this layer
    reads from an earlier layer's records (stored once per graph; see store.py ``links``)."""
    store = lookup(handle)
    check_write(store, layer, pos, k, v)
    links = direct.links_of(shared)
    if cuda_runtime.handles(k.device):  # asynchronous, on the D2H stream
        # staged: inductor, which runs these ops, may reuse the sources' memory right after
        records = direct.records(inputs, tdims, k.shape[2])
        cuda_runtime.runtime(store, k.device).store_tokens_staged(store, layer, pos, k, v, records, links)
    else:
        direct.cpu_store(store, layer, pos, k, v, inputs, tdims, links)
    handle[1] += 1


@torch.library.custom_op("kvpr::prefetch_next", mutates_args=())
def prefetch_next(handle: Tensor, layer: int, past: int, new: int, num: int, den: int,
                  shapes: list[int], ranks: list[int], dtypes: list[int], batch: int, heads: int,
                  head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    if cuda_runtime.handles(device):
        direct.stream_prefetch_next(lookup(handle), layer, past, new, num, den,
                                    _split_specs(shapes, ranks, dtypes), batch, heads, head_dim,
                                    dtype, device)


@prefetch_next.register_fake
def _(handle, layer, past, new, num, den, shapes, ranks, dtypes, batch, heads, head_dim, dtype, device):
    return None


@torch.library.custom_op("kvpr::assemble", mutates_args=())
def assemble(handle: Tensor, layer: int, k_rec: Tensor, v_rec: Tensor, k_load: Tensor,
             v_load: Tensor, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
    store = lookup(handle)
    if cuda_runtime.handles(k_new.device):
        return cuda_runtime.runtime(store, k_new.device).assemble(store, layer, k_rec, v_rec, k_load,
                                                                  v_load, k_new, v_new)
    return direct.cpu_assemble(store, layer, k_rec, v_rec, k_load, v_load, k_new, v_new)


@assemble.register_fake
def _(handle, layer, k_rec, v_rec, k_load, v_load, k_new, v_new):
    b, h, _, d = k_new.shape
    s = k_rec.shape[2] + k_load.shape[2] + k_new.shape[2]
    return k_new.new_empty(b, h, s, d), v_new.new_empty(b, h, s, d)

