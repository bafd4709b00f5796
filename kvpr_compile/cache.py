"""OffloadedKVCache: the user-facing KV cache whose contents live in CPU memory.

Uncompiled, ``update`` is an ordinary offloaded cache (store the new K,V in CPU memory, return
the full K,V on the compute device): slow and exactly right, the reference for every test.
Compiled with ``backend="kvpr"``, the same call site is rewritten into partial recompute plus
loads; see ``kvpr_compile.passes``.

Storage layout, per layer (``k_cpu[i]``, ``v_cpu[i]``): ``(max_seq_len, batch, num_kv_heads,
head_dim)``, sequence-major, pinned when ``device`` is CUDA. Positions ``[0, seq_len(i))`` are
valid. The sizes, dtype and device are one ``CacheGeometry`` (``runtime/geometry.py``), shared with
the cache's store.

Throughput schedule (``options={"schedule": "throughput"}``): the compiled step keeps one store
per micro-batch (``runtime/store_parts.py``), each ``(max_seq_len, rows, kv_heads, head_dim)``
over its own rows. ``k_cpu`` / ``v_cpu`` still are the whole batch's tensors: reading them copies
the parts back into that layout first (and the next throughput step splits again), so what they
show and what is written into them is what the next step uses.

Sliding-window layers (``windows``: per layer, the number of keys a query attends to, itself
included; 0 or None: every key) return only the keys their next queries can see, as transformers'
``DynamicSlidingWindowLayer`` does: once the layer holds ``pos >= w`` tokens, K,V
``[pos - w + 1, pos + n)``; before, the whole past. The store still keeps every token (each one
is in the windows of the next ``w - 1`` queries, and ``k_cpu``, ``reset`` and the uncompiled
path read the cache as a whole); compiled, only the window is loaded or recomputed.

Under compilation ``update`` reads only the handle tensor and the per-layer length (an int that
Dynamo makes dynamic after its first change), so one compiled graph serves every cache: the
geometry checks run inside the kvpr ops (``runtime/checks.py``), where values are concrete.
"""
from __future__ import annotations

import torch

from .runtime import kernels  # noqa: F401  (registers the kvpr:: ops' bodies)
from .runtime.checks import check_write
from .runtime.geometry import CacheGeometry, HasGeometry
from .runtime.store import KVStore


class OffloadedKVCache(HasGeometry):
    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device="cpu",
                 windows=None):
        self.geometry = CacheGeometry(num_layers, batch_size, max_seq_len, num_kv_heads, head_dim,
                                      dtype, device)   # checks the sizes
        self._store = KVStore(self.geometry)
        self._lengths = [0] * num_layers
        self.reset_after_use = False   # reset() emptied a cache that held tokens (hf_checks.py)
        self._layer_names = tuple(str(i) for i in range(num_layers))
        self.windows = _windows(windows, num_layers)
        self._store.windows = self.windows   # what a compile sees through the handle

    @property
    def k_cpu(self) -> list[torch.Tensor]:
        return self._exposed().k

    @property
    def v_cpu(self) -> list[torch.Tensor]:
        return self._exposed().v

    def _exposed(self):
        """The whole store, whose tensors the caller may write: counted as a change of it."""
        store = self._store.whole()
        store.changed()
        return store

    @property
    def handle(self) -> torch.Tensor:
        return self._store.handle

    def seq_len(self, layer_idx: int = 0) -> int:
        return self._lengths[layer_idx]

    def reset(self) -> None:
        self.reset_after_use = self.reset_after_use or any(self._lengths)
        self._lengths = [0] * self.num_layers
        self._store.reset()

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Append ``k, v`` ``(batch, num_kv_heads, n_new, head_dim)``; return the full K, V (a
        sliding-window layer's: from its window's first key on, see the module docstring)."""
        if not 0 <= layer_idx < len(self._lengths):   # the list's length is guarded anyway
            raise IndexError(f"OffloadedKVCache: layer {layer_idx} out of range "
                             f"[0, {len(self._lengths)})")
        # Under dynamic=True Dynamo makes an int read from the cache object (HF's layer index) a
        # graph input; a string constant looked up by it is guarded, so the layer stays a constant
        layer_idx = int(self._layer_names[layer_idx])
        pos = self._lengths[layer_idx]
        if not torch.compiler.is_compiling():
            # Uncompiled: check here (a meta tensor would reach the op's fake kernel). Compiled:
            # the kvpr ops check at run time, so tracing reads no batch_size / max_seq_len /
            # dtype / device of the cache and Dynamo puts no guard on them.
            check_write(self._store, layer_idx, pos, k, v)
        w = self.windows[layer_idx]
        # the same test as transformers' sliding layers' get_mask_sizes (one guard for both)
        start = pos - w + 1 if w and pos >= w else 0
        k_all, v_all = torch.ops.kvpr.cache_update(self._store.handle, k, v, layer_idx, pos,
                                                   start)
        self._lengths[layer_idx] = pos + k.shape[2]
        return k_all, v_all


def _windows(windows, num_layers: int) -> tuple[int, ...]:
    """Per-layer sliding windows as ints (0: none), checked."""
    if windows is None:
        return (0,) * num_layers
    out = tuple(int(w or 0) for w in windows)
    if len(out) != num_layers or any(w < 0 for w in out):
        raise ValueError(f"OffloadedKVCache: windows must give one window >= 0 (0 or None: "
                         f"none) per layer ({num_layers}), got {list(windows)!r}")
    return out
