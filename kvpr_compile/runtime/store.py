"""CPU-resident storage of one offloaded cache: K, V and the per-token recompute inputs.

Layout (all sequence-major, so a layer's token range [a:b] is one contiguous block):

- ``k[layer]``, ``v[layer]``: ``(max_seq_len, batch, num_kv_heads, head_dim)``.
- ``tokens[layer]``: list of per-token input stores, ``(max_seq_len, *record_shape)``, allocated
  on first store. Entry 0 is the layer's X (the K/V projection input, record ``(batch, 1, hidden)``);
  the others are position-dependent side inputs of the recompute slice (RoPE cos/sin, ...), stored
  exactly as the program computed them for each token.
- ``token_len[layer]``: positions ``[0, token_len)`` hold valid token inputs. Writes by the
  uncompiled path (which has no X) stop that prefix from growing; the assemble step falls back to
  the stored K/V for positions past it. Records are checked against what each graph loads and
  stores (count, shapes, dtypes): what does not fit ends the prefix instead of reaching a graph.

Every cache is reachable from compiled graphs through a small int64 *handle* tensor
``[uid, version]`` (a graph input, guarded on shape only, so new caches reuse compiled graphs).
"""
from __future__ import annotations

import itertools
import weakref

import torch

from ..report import warn_once
from . import traffic

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
        self.dropped_tokens = 0   # times stored records did not fit a graph (see token_sources)
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
        if traffic.ON: traffic.note("kv", self.k[layer][start:end], self.v[layer][start:end])  # noqa: E701
        k = self.k[layer][start:end].to(device, non_blocking=self.pin)
        v = self.v[layer][start:end].to(device, non_blocking=self.pin)
        return k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)

    # ---- per-token recompute inputs ------------------------------------------------------
    def write_tokens(self, layer: int, pos: int, records: list[torch.Tensor]) -> None:
        """Store per-token records ``(n, *record_shape)`` for positions ``[pos, pos + n)``.
        No records (a layer that never recomputes): the valid prefix ends at ``pos``.

        Graphs of one program may describe a record differently (a position table of batch 1
        in the prefill, of batch b in decode steps): a record that broadcasts to the stored
        one is written expanded; a stored record that broadcasts to the new one is widened
        first (its valid rows copied once). Anything else (another count, rank or dtype of
        records) replaces the stores with the new layout: positions before ``pos`` then have no
        usable records and assemble takes the stored K,V for them (exact, no recompute)."""
        if not records:
            self.invalidate_tokens(layer, pos)
            return
        stores = self.tokens[layer]
        if stores and not self._widen(layer, records):
            self._drop(layer, [tuple(s.shape[1:]) for s in stores],
                       [tuple(r.shape[1:]) for r in records])
            stores.clear()
        if not stores:
            # allocated during the first compiled forward: no memset of the whole buffer. Rows
            # past token_len are never used (assemble takes stored K,V for them instead).
            stores.extend(self._alloc((self.max_seq_len, *r.shape[1:]), r.dtype, zero=False)
                          for r in records)
        n = records[0].shape[0]
        for s, r in zip(stores, records):
            s[pos:pos + n].copy_(r, non_blocking=self.pin)
        if pos <= self.token_len[layer]:
            self.token_len[layer] = pos + n

    def _widen(self, layer: int, records: list[torch.Tensor]) -> bool:
        """Make every store able to hold ``records`` (see ``write_tokens``); False if a store
        cannot, with nothing changed."""
        stores = self.tokens[layer]
        if len(stores) != len(records):
            return False
        shapes = []
        for s, r in zip(stores, records):
            old, new = tuple(s.shape[1:]), tuple(r.shape[1:])
            if s.dtype != r.dtype or len(old) != len(new):
                return False
            wide = tuple(max(a, b) for a, b in zip(old, new))
            if any(a not in (1, w) or b not in (1, w) for a, b, w in zip(old, new, wide)):
                return False
            shapes.append(wide)
        valid = self.token_len[layer]
        if self.pin and any(tuple(st.shape[1:]) != w for st, w in zip(stores, shapes)):
            torch.cuda.synchronize()   # earlier D2H writes into the old rows (on the store stream)
        for i, wide in enumerate(shapes):
            if tuple(stores[i].shape[1:]) != wide:
                grown = self._alloc((self.max_seq_len, *wide), stores[i].dtype, zero=False)
                grown[:valid].copy_(stores[i][:valid])
                stores[i] = grown
        return True

    def token_sources(self, layer: int, specs: list[tuple[tuple, torch.dtype]]):
        """The stores of ``layer`` as ``(max_seq_len, *shape)`` views for records described by
        ``specs`` (stored records of size 1 in a dim are broadcast; several equal rows where
        one is wanted are narrowed once, see ``_narrow``), or None if there are none
        or they do not fit (another count, rank, size or dtype: stored by a graph that computed
        other recompute inputs). A misfit ends the valid prefix at 0, so that assemble uses the
        stored K,V for every position this read would have recomputed."""
        stores = self.tokens[layer]
        if not stores:
            return None
        out = []
        if len(stores) == len(specs):
            for i, (s, (shape, dtype)) in enumerate(zip(stores, specs)):
                held = tuple(s.shape[1:])
                if s.dtype != dtype or len(held) != len(shape):
                    break
                if any(h not in (1, w) for h, w in zip(held, shape)):
                    s = self._narrow(layer, i, shape)
                    if s is None:
                        break
                    held = tuple(s.shape[1:])
                out.append(s if held == tuple(shape) else s.expand(s.shape[0], *shape))
        if len(out) != len(specs):
            self._drop(layer, [tuple(s.shape[1:]) for s in stores], [tuple(sh) for sh, _ in specs])
            return None
        return out

    def _narrow(self, layer: int, i: int, shape) -> torch.Tensor | None:
        """Store ``i`` of ``layer`` with one row where a graph wants one and the store holds
        several equal ones (a prefill given ``(B, n)`` position_ids, decode steps without them:
        cos/sin of B equal rows, then of one). Done once, on the first misfit, and only when
        every valid row agrees: rows that differ (left padding) return None, and the caller
        falls back to the stored K,V."""
        s, valid = self.tokens[layer][i], self.token_len[layer]
        held = tuple(s.shape[1:])
        dims = [d for d, (h, w) in enumerate(zip(held, shape)) if h not in (1, w)]
        if any(shape[d] != 1 for d in dims):
            return None
        if self.pin:
            torch.cuda.synchronize()   # earlier D2H writes into these rows (on the store stream)
        first = s[:valid]
        for d in dims:
            first = first.narrow(d + 1, 0, 1)
        if not torch.equal(s[:valid], first.expand(valid, *held)):
            return None
        narrow = self._alloc((self.max_seq_len, *first.shape[1:]), s.dtype, zero=False)
        narrow[:valid].copy_(first)
        self.tokens[layer][i] = narrow
        return narrow

    def _drop(self, layer: int, held, wanted) -> None:
        """Stored records do not fit a graph: none of them is used again (exact, no recompute)."""
        self.token_len[layer] = 0
        self.dropped_tokens += 1
        warn_once(f"kvpr: layer {layer}: the per-token recompute inputs stored by an earlier graph "
                  f"{held} do not fit this graph's {wanted}; positions stored before use the stored "
                  "K,V (exact, not recomputed)")

    def read_tokens(self, layer: int, end: int, specs: list[tuple[tuple, torch.dtype]],
                    device: torch.device):
        """Records for positions ``[0, end)``; rows past ``token_len`` are unspecified (zeros if
        nothing usable was stored): the assemble step replaces what they produce."""
        sources = self.token_sources(layer, specs)
        if sources is None:
            return [torch.zeros((end, *shape), dtype=dtype, device=device) for shape, dtype in specs]
        if traffic.ON: traffic.note("tokens", *(s[:end] for s in sources))  # noqa: E701
        return [s[:end].to(device, non_blocking=self.pin) for s in sources]

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
