"""CPU-resident storage of one offloaded cache: K, V and the per-token recompute inputs.

Layout (all sequence-major, so a layer's token range [a:b] is one contiguous block):

- ``k[layer]``, ``v[layer]``: ``(max_seq_len, batch, num_kv_heads, head_dim)``.
- ``tokens[layer]``: list of per-token input stores, ``(max_seq_len, *record_shape)``, allocated
  on first store. Entry 0 is the layer's X (the K/V projection input, record ``(batch, 1, hidden)``);
  the others are position-dependent side inputs of the recompute slice (RoPE cos/sin, ...), stored
  exactly as the program computed them for each token.
- ``links[layer]``: side inputs the layer shares with an earlier layer of the same graph (RoPE
  cos/sin, computed once per forward and fed to every layer): ``(index, owner, owner_index)``
  per shared record. Their rows live once, in ``tokens[owner]``; the layer's own list holds the
  rest, and a read merges both in the graph's record order (see ``token_sources``).
- ``token_len[layer]``: positions ``[0, token_len)`` hold valid token inputs. Writes by the
  uncompiled path (which has no X) stop that prefix from growing; the assemble step falls back to
  the stored K/V for positions past it. Records are checked against what each graph loads and
  stores (count, shapes, dtypes): what does not fit ends the prefix instead of reaching a graph.
  ``covered(layer)`` is the prefix a layer can recompute: its own and its owners' valid prefix.

Fast paths (host time per decode step): a write whose record layout equals the layer's last one,
and a read whose specs passed the fit check since the last layout change (``_generation``), skip
the checks; on the CPU, K,V are written and read through ``(batch, heads, seq, head_dim)`` views
made once, one indexing call per tensor, and nothing is moved when ``device`` is None.

``writes`` counts every change of what the store holds (a K/V or record write, an invalidation,
a reset, new buffers, the stored records narrowed or dropped, the K/V tensors handed out through
``OffloadedKVCache.k_cpu``): a copy made from the store stays valid while it is unchanged (the
cross-call prefetch, cuda_runtime.prefetch_next).

Every cache is reachable from compiled graphs through a small int64 *handle* tensor
``[uid, version]`` (a graph input, guarded on shape only, so new caches reuse compiled graphs).

Micro-batch parts (the throughput schedule, ``store_parts.py``): ``parts`` holds one store per
micro-batch, each sequence-major over its own rows, so a (layer, micro-batch) range is one
contiguous copy. While a store is split its own K/V buffers are released; anything that
addresses it as one store (``lookup``, ``direct.resolve``, the cache's ``k_cpu``) calls
``whole()``, which copies the parts back first.
"""
from __future__ import annotations

import itertools
import math
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
        self.links: list[tuple] = [()] * num_layers
        self.token_len = [0] * num_layers
        self._layout: list = [None] * num_layers   # record layout last written with no change
        self._fit: list = [None] * num_layers      # (generation, specs, sources) of the last fit
        self._generation = 0                       # bumped whenever any layer's stores change
        self.writes = 0   # bumped by every change of what the store holds (module docstring)
        self.checked_write = self.checked_read = None   # geometry last accepted (checks.py)
        self.buffers_replaced()
        self.dropped_tokens = 0   # times stored records did not fit a graph (see token_sources)
        self.written = [0] * num_layers   # K/V positions [0, written) were ever written
        self.parts: "list[KVStore] | None" = None   # micro-batch stores while split
        self.part_of: "tuple | None" = None   # a part: (weakref to its whole store, its index)
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
        self.writes += 1
        self.written[layer] = max(self.written[layer], pos + n)
        if self.pin:   # D2H from a side stream: the copy must not block
            self.k[layer][pos:pos + n].copy_(k.permute(2, 0, 1, 3), non_blocking=True)
            self.v[layer][pos:pos + n].copy_(v.permute(2, 0, 1, 3), non_blocking=True)
        else:
            self.k_bhsd[layer][:, :, pos:pos + n] = k
            self.v_bhsd[layer][:, :, pos:pos + n] = v

    def read_kv(self, layer: int, start: int, end: int, device: torch.device | None):
        """K, V for positions ``[start, end)`` as ``(b, hkv, end - start, d)`` on ``device``
        (None: views of the store, nothing moved)."""
        if traffic.ON: traffic.note("kv", self.k[layer][start:end], self.v[layer][start:end])  # noqa: E701
        if device is None:
            return self.k_bhsd[layer][:, :, start:end], self.v_bhsd[layer][:, :, start:end]
        k = self.k[layer][start:end].to(device, non_blocking=self.pin)
        v = self.v[layer][start:end].to(device, non_blocking=self.pin)
        return k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)

    # ---- per-token recompute inputs ------------------------------------------------------
    def write_tokens(self, layer: int, pos: int, records: list[torch.Tensor], links: tuple = ()) -> None:
        """Store per-token records ``(n, *record_shape)`` for positions ``[pos, pos + n)``.
        No records (a layer that never recomputes): the valid prefix ends at ``pos``.
        ``links``: the layer's shared side inputs, ``(index, owner, owner_index)`` each; their rows
        are written by the owner (an earlier layer of the same graph), ``records`` are the rest.

        Graphs of one program may describe a record differently (a position table of batch 1
        in the prefill, of batch b in decode steps): a record that broadcasts to the stored
        one is written expanded; a stored record that broadcasts to the new one is widened
        first (its valid rows copied once). Anything else (another count, rank or dtype of
        records, other links) replaces the stores with the new layout: positions before ``pos``
        then have no usable records and assemble takes the stored K,V for them (exact, no
        recompute)."""
        self.writes += 1
        if not records:
            self.invalidate_tokens(layer, pos)
            return
        layout = (tuple([(r.shape[1:], r.dtype) for r in records]), links)
        if layout != self._layout[layer]:
            self._arrange(layer, records, links)
            self._layout[layer] = layout
        n = records[0].shape[0]
        for s, r in zip(self.tokens[layer], records):
            s[pos:pos + n].copy_(r, non_blocking=self.pin)
        self._extend(layer, pos, n)

    def write_token(self, layer: int, pos: int, values: list[torch.Tensor], links: tuple = ()) -> None:
        """``write_tokens`` for one token: ``values`` are its records (no leading axis)."""
        if not values or self.pin or (tuple([(t.shape, t.dtype) for t in values]), links) != self._layout[layer]:
            self.write_tokens(layer, pos, [t.unsqueeze(0) for t in values], links)
            return
        self.writes += 1
        for s, t in zip(self.tokens[layer], values):
            s[pos] = t
        self._extend(layer, pos, 1)

    def _extend(self, layer: int, pos: int, n: int) -> None:
        """Records written at ``[pos, pos + n)`` extend the valid prefix if they continue it."""
        if pos <= self.token_len[layer]:
            self.token_len[layer] = pos + n

    def _arrange(self, layer: int, records: list[torch.Tensor], links: tuple) -> None:
        """Make the layer's stores hold ``records`` with ``links`` (the slow path of a write)."""
        self._generation += 1
        stores = self.tokens[layer]
        if links != self.links[layer]:
            self.links[layer] = links
            if stores:   # rows stored with other links: not usable with these
                self.token_len[layer] = 0
                stores.clear()
        if stores and not self._widen(layer, records):
            self._drop(layer, [tuple(s.shape[1:]) for s in stores],
                       [tuple(r.shape[1:]) for r in records])
            stores.clear()
        if not stores:
            # allocated during the first compiled forward: no memset of the whole buffer. Rows
            # past token_len are never used (assemble takes stored K,V for them instead).
            stores.extend(self._alloc((self.max_seq_len, *r.shape[1:]), r.dtype, zero=False)
                          for r in records)

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
        stored K,V for every position this read would have recomputed. Shared records (``links``)
        come from their owner's stores, in the graph's record order."""
        fit = self._fit[layer]
        if fit is not None and fit[0] == self._generation and (fit[1] is specs or fit[1] == specs):
            return fit[2]
        held = self._held(layer)
        if held is None:
            return None
        out = []
        if len(held) == len(specs):
            for i, (s, (shape, dtype)) in enumerate(zip(held, specs)):
                have = tuple(s.shape[1:])
                if s.dtype != dtype or len(have) != len(shape):
                    break
                if any(h not in (1, w) for h, w in zip(have, shape)):
                    s = self._narrow(*self._record_at(layer, i), shape)
                    if s is None:
                        break
                    have = tuple(s.shape[1:])
                out.append(s if have == tuple(shape) else s.expand(s.shape[0], *shape))
        if len(out) != len(specs):
            self._drop(layer, [tuple(s.shape[1:]) for s in held], [tuple(sh) for sh, _ in specs])
            return None
        self._fit[layer] = (self._generation, specs, out)
        return out

    def _held(self, layer: int) -> list[torch.Tensor] | None:
        """The layer's record stores in the graph's order, shared ones from their owners; None
        if nothing is stored (or a shared record's owner holds none)."""
        own = self.tokens[layer]
        if not own:
            return None
        links = self.links[layer]
        if not links:
            return own
        held = list(own)
        for index, owner, owner_index in sorted(links):
            if owner_index >= len(self.tokens[owner]):
                return None
            held.insert(index, self.tokens[owner][owner_index])
        return held

    def covered(self, layer: int) -> int:
        """Positions ``[0, covered)`` of ``layer`` can be recomputed: its own records and those it
        shares (valid in the owner) are stored there."""
        n = self.token_len[layer]
        for _, owner, _ in self.links[layer]:
            n = min(n, self.token_len[owner])
        return n

    def _record_at(self, layer: int, i: int) -> tuple[int, int]:
        """(layer, index) of the store holding record ``i`` of ``layer``'s read (``_held``)."""
        links = sorted(self.links[layer])
        for index, owner, owner_index in links:
            if index == i:
                return owner, owner_index
        return layer, i - sum(1 for index, _, _ in links if index < i)

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
        self._layout[layer] = None   # the write fast path must see the new layout
        self._generation += 1
        self.writes += 1
        return narrow

    def _drop(self, layer: int, held, wanted) -> None:
        """Stored records do not fit a graph: none of them is used again (exact, no recompute)."""
        self.token_len[layer] = 0
        self.dropped_tokens += 1
        self.writes += 1
        warn_once(f"kvpr: layer {layer}: the per-token recompute inputs stored by an earlier graph "
                  f"{held} do not fit this graph's {wanted}; positions stored before use the stored "
                  "K,V (exact, not recomputed)")

    def read_tokens(self, layer: int, end: int, specs: list[tuple[tuple, torch.dtype]],
                    device: torch.device | None):
        """Records for positions ``[0, end)``; rows past ``covered`` are unspecified (zeros if
        nothing usable was stored): the assemble step replaces what they produce. ``device``
        None: views of the store (zeros on the CPU if nothing fits)."""
        sources = self.token_sources(layer, specs)
        if sources is None:
            return [torch.zeros((end, *shape), dtype=dtype, device=device) for shape, dtype in specs]
        if traffic.ON: traffic.note("tokens", *(s[:end] for s in sources))  # noqa: E701
        if device is None:
            return [s[:end] for s in sources]
        return [s[:end].to(device, non_blocking=self.pin) for s in sources]

    def invalidate_tokens(self, layer: int, pos: int) -> None:
        """A write without recompute inputs at ``pos`` ends the valid prefix there."""
        self.writes += 1
        self.token_len[layer] = min(self.token_len[layer], pos)

    def reset(self) -> None:
        self.writes += 1
        self.token_len = [0] * self.num_layers
        for part in self.parts or ():
            part.reset()

    def buffers_replaced(self) -> None:
        """K/V buffers or record stores were swapped (made, or split into / merged from
        micro-batch parts): remake the (b, h, seq, d) views -- one indexing call per read or
        write -- and forget every memo of the fast paths."""
        self.k_bhsd = [t.permute(1, 2, 0, 3) if t.dim() == 4 else t for t in self.k]
        self.v_bhsd = [t.permute(1, 2, 0, 3) if t.dim() == 4 else t for t in self.v]
        self._layout = [None] * self.num_layers
        self._fit = [None] * self.num_layers
        self._generation += 1
        self.writes += 1

    def whole(self) -> "KVStore":
        """This store with its micro-batch parts copied back (see store_parts.merge)."""
        if self.parts is not None:
            from .store_parts import merge
            merge(self)
        return self

    def nbytes(self) -> dict[str, int]:
        """CPU bytes held: ``kv`` (K and V), ``x`` (each layer's first record) and ``sides`` (the
        other records; a shared one counts once, in its owner)."""
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        return {"kv": sum(size(t) for t in self.k + self.v),
                "x": sum(size(own[0]) for own in self.tokens if own),
                "sides": sum(size(t) for own in self.tokens for t in own[1:])}


def layout_bytes(num_layers: int, max_seq_len: int, batch: int, num_kv_heads: int, head_dim: int,
                 element_size: int, x_record: tuple, side_records: list[tuple],
                 shared: bool) -> dict[str, int]:
    """``KVStore.nbytes`` of a store whose every layer keeps X and ``side_records`` (per-token
    shapes), computed from shapes alone (e.g. at 7B dims). ``shared``: the side records are kept
    once (by the first layer, the others linking to it) instead of once per layer."""
    numel = lambda shape: math.prod(shape) * max_seq_len * element_size  # noqa: E731
    sides = sum(numel(r) for r in side_records)
    return {"kv": 2 * num_layers * numel((batch, num_kv_heads, head_dim)),
            "x": num_layers * numel(x_record),
            "sides": sides if shared else num_layers * sides}


def lookup(handle: torch.Tensor, whole: bool = True) -> KVStore:
    """The store behind ``handle``; ``whole=False``: as it is, micro-batch parts and all."""
    uid = int(handle[0])
    store = _REGISTRY.get(uid)
    if store is None:
        raise RuntimeError(f"kvpr: no live offloaded cache with id {uid}")
    return store.whole() if whole else store
