"""The ``kvpr::`` custom ops: their schemas and fake kernels, the only places where compiled
graphs touch the CPU store.

Op boundaries (the CUDA runtime fills in the same ones with streams and events):

- ``cache_update``: the uncompiled contract; store new K,V, return K,V ``[start, pos + n)`` on the
  device (``start`` > 0: a sliding window's first key; the whole past otherwise).
- ``load_kv``: K,V for positions ``[start, end)`` (the streamed part). ``owned=True`` (graphs run
  by inductor, which may recycle op outputs' memory) loads into fresh tensors, not device slots.
- ``load_tokens``: per-token recompute inputs (X and side inputs) for positions ``[start, end)``
  (``start`` > 0 when a resident prefix ``[0, start)`` sits on the device).
- ``wait``: the loaded tensors are ready for use (declared as mutating them so that nothing
  reorders a read before it, under functionalization too).
- ``store_tokens``: append new tokens' K, V and recompute inputs.
- ``assemble``: resident ``[0, r)`` ++ recomputed ``[r, r + l)`` ++ loaded ``[r + l, past)`` ++
  new tokens, with a fallback to stored K,V where the recompute inputs were never stored (cache
  filled by uncompiled code). The resident rows are the cache's device copy of the prefix
  (runtime/resident.py): the concatenation reads them once, with no staging copy; rows the
  device does not hold yet are copied there from the store first, and the new tokens are
  appended to them while they fit (``resident_num/den`` and ``resident_cap`` give the capacity).
  ``start`` > 0 (a sliding window, never with a resident prefix): the past begins there, the
  recomputed rows are ``[start, start + l)``.
  ``cpu_len`` > 0: the past's last ``cpu_len`` tokens are not loaded (the CPU attends to
  them, ``cpu_attend``): zeros stand in their rows, which the device's part masks out.
- ``cpu_attend``: the query attends to K,V [start, end) of the layer where they lie, in the CPU
  store (no copy), returning the partial output and its log-sum-exp (float32, on the query's
  device) for an exact merge with the device's part (ops/attention.py). On CUDA the result is
  in flight until a ``wait`` on it (runtime/cpu_attention.py).
- ``prefetch_next``: after a step's last assemble, the first layer's loads of the next call
  (nothing on the CPU). It returns nothing and writes nothing the graph reads: graphs handed to
  inductor do not get it (passes/prefetch.py).
- ``weights_ready`` / ``weights_release``: a streamed layer's weights are in their device slot /
  no longer read (runtime/weight_stream.py).

Every op takes the cache's (or weight stream's) handle tensor; ops with side effects declare it
mutated. The bodies here only refuse: the runtime registers the real ones
(``torch.library.register_kernel(op, None, fn)``: runtime/kernels.py, runtime/weight_stream.py),
which the dispatcher then calls exactly as it would a body defined here. ``load_kv``'s fake
result has the strides of the runtime's device slots where the runtime streams (``slot_views``,
registered with the kernels).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .specs import split_specs


def _unimplemented(name: str):
    raise RuntimeError(f"kvpr::{name} has no implementation in this process: import "
                       "kvpr_compile.runtime.kernels (kvpr_compile.cache and the kvpr backend do)")


def _no_slot_views(device) -> bool:
    _unimplemented("load_kv (its fake kernel)")


_SLOT_VIEWS: list[Callable] = [_no_slot_views]


def set_slot_views(rule: Callable) -> None:
    """``rule(device)``: whether the runtime returns loads on ``device`` as views of a
    sequence-major device slot (the fake kernels then give the same strides)."""
    _SLOT_VIEWS[0] = rule


@torch.library.custom_op("kvpr::cache_update", mutates_args=("handle",))
def cache_update(handle: Tensor, k: Tensor, v: Tensor, layer: int, pos: int,
                 start: int = 0) -> tuple[Tensor, Tensor]:
    _unimplemented("cache_update")


@cache_update.register_fake
def _(handle, k, v, layer, pos, start=0):
    b, h, n, d = k.shape
    return k.new_empty(b, h, pos - start + n, d), v.new_empty(b, h, pos - start + n, d)


@torch.library.custom_op("kvpr::load_kv", mutates_args=())
def load_kv(handle: Tensor, layer: int, start: int, end: int, batch: int, heads: int,
            head_dim: int, dtype: torch.dtype, device: torch.device,
            owned: bool = False) -> tuple[Tensor, Tensor]:
    _unimplemented("load_kv")


@load_kv.register_fake
def _(handle, layer, start, end, batch, heads, head_dim, dtype, device, owned=False):
    if _SLOT_VIEWS[0](device):  # same strides as the real slot views
        shape = (end - start, batch, heads, head_dim)
        return (torch.empty(shape, dtype=dtype, device=device).permute(1, 2, 0, 3),
                torch.empty(shape, dtype=dtype, device=device).permute(1, 2, 0, 3))
    shape = (batch, heads, end - start, head_dim)
    return (torch.empty(shape, dtype=dtype, device=device),
            torch.empty(shape, dtype=dtype, device=device))


@torch.library.custom_op("kvpr::load_tokens", mutates_args=())
def load_tokens(handle: Tensor, layer: int, end: int, shapes: list[int], ranks: list[int],
                dtypes: list[int], device: torch.device, owned: bool = False,
                start: int = 0) -> list[Tensor]:
    _unimplemented("load_tokens")


@load_tokens.register_fake
def _(handle, layer, end, shapes, ranks, dtypes, device, owned=False, start=0):
    return [torch.empty((end - start, *shape), dtype=dtype, device=device)
            for shape, dtype in split_specs(shapes, ranks, dtypes)]


@torch.library.custom_op("kvpr::wait", mutates_args=("tensors",))
def wait(tensors: list[Tensor]) -> None:
    """Synchronous loads (CPU) are ready as soon as they return; on CUDA the current stream
    waits for the copy events of the slots the tensors are views of."""
    _unimplemented("wait")


@torch.library.custom_op("kvpr::store_tokens", mutates_args=("handle",))
def store_tokens(handle: Tensor, layer: int, pos: int, k: Tensor, v: Tensor,
                 inputs: list[Tensor], tdims: list[int],
                 shared: Optional[list[int]] = None) -> None:
    """``shared``: flat ``(index, owner, owner_index)`` triples, the side inputs this layer
    reads from an earlier layer's records (stored once per graph; see store.py ``links``)."""
    _unimplemented("store_tokens")


@torch.library.custom_op("kvpr::prefetch_next", mutates_args=())
def prefetch_next(handle: Tensor, layer: int, past: int, new: int, num: int, den: int,
                  shapes: list[int], ranks: list[int], dtypes: list[int], batch: int, heads: int,
                  head_dim: int, dtype: torch.dtype, device: torch.device, resident_num: int = 0,
                  resident_den: int = 1, resident_cap: int = -1,
                  ratio_of_rest: bool = False, cpu_num: int = 0, cpu_den: int = 1) -> None:
    """The resident rule (``resident_num/den``, ``cap``) and ``ratio_of_rest`` as the layer's
    assemble and loads have them: the next call's loads start after its resident prefix; the
    CPU share ``cpu_num/cpu_den`` (0: none) as its loads have it: they stop where the CPU's
    range starts."""
    _unimplemented("prefetch_next")


@prefetch_next.register_fake
def _(handle, layer, past, new, num, den, shapes, ranks, dtypes, batch, heads, head_dim, dtype,
      device, resident_num=0, resident_den=1, resident_cap=-1, ratio_of_rest=False, cpu_num=0,
      cpu_den=1):
    return None


@torch.library.custom_op("kvpr::assemble", mutates_args=())
def assemble(handle: Tensor, layer: int, k_rec: Tensor, v_rec: Tensor, k_load: Tensor,
             v_load: Tensor, k_new: Tensor, v_new: Tensor, resident: int = 0,
             resident_num: int = 0, resident_den: int = 1,
             resident_cap: int = -1, start: int = 0,
             cpu_len: int = 0) -> tuple[Tensor, Tensor]:
    _unimplemented("assemble")


@assemble.register_fake
def _(handle, layer, k_rec, v_rec, k_load, v_load, k_new, v_new, resident=0, resident_num=0,
      resident_den=1, resident_cap=-1, start=0, cpu_len=0):
    b, h, _, d = k_new.shape
    s = resident + k_rec.shape[2] + k_load.shape[2] + cpu_len + k_new.shape[2]
    return k_new.new_empty(b, h, s, d), v_new.new_empty(b, h, s, d)


@torch.library.custom_op("kvpr::cpu_attend", mutates_args=())
def cpu_attend(handle: Tensor, layer: int, q: Tensor, start: int, end: int,
               mask: Optional[Tensor], scale: float, scores: int,
               extras: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``scores``: the index of the layer's per-score ops (ops/attention.py
    ``register_scores``), -1 for none; ``extras``: their tensor operands (masks), sliced to the
    range's key columns."""
    _unimplemented("cpu_attend")


@cpu_attend.register_fake
def _(handle, layer, q, start, end, mask, scale, scores, extras):
    b, h, n, d = q.shape
    return (torch.empty((b, h, n, d), dtype=torch.float32, device=q.device),
            torch.empty((b, h, n), dtype=torch.float32, device=q.device))


@torch.library.custom_op("kvpr::weights_ready", mutates_args=("handle",))
def weights_ready(handle: Tensor, layer: int) -> None:
    _unimplemented("weights_ready")


@torch.library.custom_op("kvpr::weights_release", mutates_args=("handle",))
def weights_release(handle: Tensor, layer: int) -> None:
    _unimplemented("weights_release")
