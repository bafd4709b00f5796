"""CPU-resident storage of one offloaded cache: K, V and the per-token recompute inputs.

Layout (all sequence-major, so a layer's token range [a:b] is one contiguous block):

- ``k[layer]``, ``v[layer]``: ``(max_seq_len, batch, num_kv_heads, head_dim)``.
- ``tokens[layer]``: list of per-token input stores, ``(max_seq_len, *record_shape)``, allocated
  on first store. Entry 0 is the layer's X (the K/V projection input, record ``(batch, 1, hidden)``);
  the others are position-dependent side inputs of the recompute slice (RoPE cos/sin, ...), stored
  exactly as the program computed them for each token.
- ``token_len[layer]``: positions ``[0, token_len)`` hold valid token inputs. Writes by the
  uncompiled path (which has no X) stop that prefix from growing; the assemble step falls back to
  the stored K/V for positions past it.

Every cache is reachable from compiled graphs through a small int64 *handle* tensor
``[uid, version]`` (a graph input, guarded on shape only, so new caches reuse compiled graphs).
"""
from __future__ import annotations

import itertools
import weakref

import torch

_REGISTRY: "weakref.WeakValueDictionary[int, KVStore]" = weakref.WeakValueDictionary()
_BY_HANDLE_ID: "weakref.WeakValueDictionary[int, KVStore]" = weakref.WeakValueDictionary()
_UIDS = itertools.count(1)


class KVStore:
    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.pin = device.type == "cuda"
        shape = (max_seq_len, batch_size, num_kv_heads, head_dim)
        self.k = [self._alloc(shape, dtype) for _ in range(num_layers)]
        self.v = [self._alloc(shape, dtype) for _ in range(num_layers)]
        self.tokens: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.token_len = [0] * num_layers
        self.uid = next(_UIDS)
        self.handle = torch.tensor([self.uid, 0], dtype=torch.int64)
        _REGISTRY[self.uid] = self
        _BY_HANDLE_ID[id(self.handle)] = self   # the store keeps its handle alive: ids stay unique

    @staticmethod
    def by_handle_id(handle_id: int) -> "KVStore | None":
        """The live store whose handle tensor has this ``id`` (no read of the tensor)."""
        return _BY_HANDLE_ID.get(handle_id)

    def _alloc(self, shape, dtype, zero: bool = True) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, pin_memory=self.pin)
        return t.zero_() if zero else t

    # ---- K / V ---------------------------------------------------------------------------
    def write_kv(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' k, v ``(b, hkv, n, d)`` at positions ``[pos, pos + n)``."""
        n = k.shape[2]
        self.k[layer][pos:pos + n].copy_(k.permute(2, 0, 1, 3), non_blocking=self.pin)
        self.v[layer][pos:pos + n].copy_(v.permute(2, 0, 1, 3), non_blocking=self.pin)

    def read_kv(self, layer: int, start: int, end: int, device: torch.device):
        """K, V for positions ``[start, end)`` as ``(b, hkv, end - start, d)`` on ``device``."""
        k = self.k[layer][start:end].to(device, non_blocking=self.pin)
        v = self.v[layer][start:end].to(device, non_blocking=self.pin)
        return k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)

    # ---- per-token recompute inputs ------------------------------------------------------
    def write_tokens(self, layer: int, pos: int, records: list[torch.Tensor]) -> None:
        """Store per-token records ``(n, *record_shape)`` for positions ``[pos, pos + n)``.
        No records (a layer that never recomputes): the valid prefix ends at ``pos``."""
        if not records:
            self.invalidate_tokens(layer, pos)
            return
        stores = self.tokens[layer]
        if not stores:
            # allocated during the first compiled forward: no memset of the whole buffer. Rows
            # past token_len are never used (assemble takes stored K,V for them instead).
            stores.extend(self._alloc((self.max_seq_len, *r.shape[1:]), r.dtype, zero=False)
                          for r in records)
        if len(stores) != len(records) or any(
                s.shape[1:] != r.shape[1:] or s.dtype != r.dtype for s, r in zip(stores, records)):
            raise RuntimeError(
                f"kvpr: layer {layer}: recompute inputs {[tuple(r.shape[1:]) for r in records]} do not "
                f"match the ones stored earlier {[tuple(s.shape[1:]) for s in stores]}; "
                "call cache.reset() before running a differently shaped program on this cache")
        n = records[0].shape[0]
        for s, r in zip(stores, records):
            s[pos:pos + n].copy_(r, non_blocking=self.pin)
        if pos <= self.token_len[layer]:
            self.token_len[layer] = pos + n

    def read_tokens(self, layer: int, end: int, specs: list[tuple[tuple, torch.dtype]],
                    device: torch.device):
        """Records for positions ``[0, end)``; rows past ``token_len`` are unspecified (zeros if
        nothing was ever stored): the assemble step replaces what they produce."""
        stores = self.tokens[layer]
        if not stores:
            return [torch.zeros((end, *shape), dtype=dtype, device=device) for shape, dtype in specs]
        return [s[:end].to(device, non_blocking=self.pin) for s in stores]

    def invalidate_tokens(self, layer: int, pos: int) -> None:
        """A write without recompute inputs at ``pos`` ends the valid prefix there."""
        self.token_len[layer] = min(self.token_len[layer], pos)

    def reset(self) -> None:
        self.token_len = [0] * self.num_layers


def lookup(handle: torch.Tensor) -> KVStore:
    uid = int(handle[0])
    store = _REGISTRY.get(uid)
    if store is None:
        raise RuntimeError(f"kvpr: no live offloaded cache with id {uid}")
    return store
