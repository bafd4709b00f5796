"""The per-token half of a cache's CPU store: the recompute inputs of every stored token.

Layout (sequence-major like K/V, so a layer's token range is one contiguous block):

- ``tokens[layer]``: list of per-token input stores, ``(max_seq_len, *record_shape)``, allocated
  on first store. Entry 0 is the layer's X (the K/V projection input, record
  ``(batch, 1, hidden)``); the others are position-dependent side inputs of the recompute slice
  (RoPE cos/sin, ...), stored exactly as the program computed them for each token.
- ``links[layer]``: side inputs the layer shares with an earlier layer of the same graph (RoPE
  cos/sin, computed once per forward and fed to every layer): ``(index, owner, owner_index)``
  per shared record. Their rows live once, in ``tokens[owner]``; the layer's own list holds the
  rest, and a read merges both in the graph's record order (see ``sources``).
- ``token_len[layer]``: positions ``[0, token_len)`` hold valid token inputs. Writes by the
  uncompiled path (which has no X) stop that prefix from growing; the assemble step falls back to
  the stored K/V for positions past it. Records are checked against what each graph loads and
  stores (count, shapes, dtypes): what does not fit ends the prefix instead of reaching a graph.
  ``covered(layer)`` is the prefix a layer can recompute: its own and its owners' valid prefix.

Graphs of one program may describe a record differently (a position table of batch 1 in the
prefill, of batch b in decode steps): stores are widened (``_widen``) or narrowed (``_narrow``)
once to the shape that serves both, anything else replaces them (``_arrange``) or ends the prefix
(``_drop``).

Fast paths (host time per decode step): a write whose record layout equals the layer's last one,
and a read whose specs passed the fit check since the last layout change (``_generation``), skip
the checks. ``changes`` counts every change of what the records hold (the store's ``writes``).
"""
from __future__ import annotations

import torch

from ..report import warn_once
from . import host_memory, traffic
from .geometry import CacheGeometry


class TokenRecords:
    def __init__(self, geometry: CacheGeometry):
        self.geometry = geometry
        self.pin = geometry.pinned
        self.changes = 0
        self.dropped_tokens = 0   # times stored records did not fit a graph (see sources)
        self._generation = 0      # bumped whenever any layer's stores change
        self.links: list[tuple] = [()] * geometry.num_layers
        self.release()

    def release(self) -> None:
        """No records stored for any layer (made, or split into micro-batch parts)."""
        n = self.geometry.num_layers
        self.tokens: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.token_len = [0] * n
        self.forget_memos()

    def forget_memos(self) -> None:
        """Stores were swapped: forget every memo of the fast paths."""
        n = self.geometry.num_layers
        self._layout: list = [None] * n   # record layout last written with no change
        self._fit: list = [None] * n      # (generation, specs, sources) of the last fit
        self._generation += 1
        self.changes += 1

    def _alloc(self, record_shape, dtype: torch.dtype) -> torch.Tensor:
        # no memset of the whole buffer: rows past token_len are never used (assemble takes the
        # stored K,V for them instead)
        return host_memory.alloc((self.geometry.max_seq_len, *record_shape), dtype, self.pin,
                                 zero=False)

    # ---- writes --------------------------------------------------------------------------
    def write(self, layer: int, pos: int, records: list[torch.Tensor], links: tuple = ()) -> None:
        """Store per-token records ``(n, *record_shape)`` for positions ``[pos, pos + n)``.
        No records (a layer that never recomputes): the valid prefix ends at ``pos``.
        ``links``: the layer's shared side inputs, ``(index, owner, owner_index)`` each; their rows
        are written by the owner (an earlier layer of the same graph), ``records`` are the rest.

        A record that broadcasts to the stored one is written expanded; a stored record that
        broadcasts to the new one is widened first (its valid rows copied once). Anything else
        (another count, rank or dtype of records, other links) replaces the stores with the new
        layout: positions before ``pos`` then have no usable records and assemble takes the
        stored K,V for them (exact, no recompute)."""
        self.changes += 1
        if not records:
            self.invalidate(layer, pos)
            return
        layout = (tuple([(r.shape[1:], r.dtype) for r in records]), links)
        if layout != self._layout[layer]:
            self._arrange(layer, records, links)
            self._layout[layer] = layout
        n = records[0].shape[0]
        for s, r in zip(self.tokens[layer], records):
            s[pos:pos + n].copy_(r, non_blocking=self.pin)
        self._extend(layer, pos, n)

    def write_one(self, layer: int, pos: int, values: list[torch.Tensor],
                  links: tuple = ()) -> None:
        """``write`` for one token: ``values`` are its records (no leading axis)."""
        if not values or self.pin or (
                tuple([(t.shape, t.dtype) for t in values]), links) != self._layout[layer]:
            self.write(layer, pos, [t.unsqueeze(0) for t in values], links)
            return
        self.changes += 1
        for s, t in zip(self.tokens[layer], values):
            s[pos] = t
        self._extend(layer, pos, 1)

    def invalidate(self, layer: int, pos: int) -> None:
        """A write without recompute inputs at ``pos`` ends the valid prefix there."""
        self.changes += 1
        self.token_len[layer] = min(self.token_len[layer], pos)

    def reset(self) -> None:
        self.changes += 1
        self.token_len = [0] * self.geometry.num_layers

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
            stores.extend(self._alloc(r.shape[1:], r.dtype) for r in records)

    def _widen(self, layer: int, records: list[torch.Tensor]) -> bool:
        """Make every store able to hold ``records`` (see ``write``); False if a store cannot,
        with nothing changed."""
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
                grown = self._alloc(wide, stores[i].dtype)
                grown[:valid].copy_(stores[i][:valid])
                stores[i] = grown
        return True

    # ---- reads ---------------------------------------------------------------------------
    def sources(self, layer: int, specs: list[tuple[tuple, torch.dtype]]):
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

    def read(self, layer: int, end: int, specs: list[tuple[tuple, torch.dtype]],
             device: torch.device | None, start: int = 0):
        """Records for positions ``[start, end)``; rows past ``covered`` are unspecified (zeros
        if nothing usable was stored): the assemble step replaces what they produce. ``device``
        None: views of the store (zeros on the CPU if nothing fits)."""
        sources = self.sources(layer, specs)
        if sources is None:
            return [torch.zeros((end - start, *shape), dtype=dtype, device=device)
                    for shape, dtype in specs]
        if traffic.ON:
            traffic.note("tokens", *(s[start:end] for s in sources))
        if device is None:
            return [s[start:end] for s in sources]
        return [s[start:end].to(device, non_blocking=self.pin) for s in sources]

    def covered(self, layer: int) -> int:
        """Positions ``[0, covered)`` of ``layer`` can be recomputed: its own records and those it
        shares (valid in the owner) are stored there."""
        n = self.token_len[layer]
        for _, owner, _ in self.links[layer]:
            n = min(n, self.token_len[owner])
        return n

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
        narrow = self._alloc(first.shape[1:], s.dtype)
        narrow[:valid].copy_(first)
        self.tokens[layer][i] = narrow
        self._layout[layer] = None   # the write fast path must see the new layout
        self._generation += 1
        self.changes += 1
        return narrow

    def _drop(self, layer: int, held, wanted) -> None:
        """Stored records do not fit a graph: none of them is used again (exact, no recompute)."""
        self.token_len[layer] = 0
        self.dropped_tokens += 1
        self.changes += 1
        warn_once(f"kvpr: layer {layer}: the per-token recompute inputs stored by an earlier "
                  f"graph {held} do not fit this graph's {wanted}; positions stored before use "
                  "the stored K,V (exact, not recomputed)")

    def nbytes(self) -> tuple[int, int]:
        """(x, sides): bytes of each layer's first record and of the others (a shared one counts
        once, in its owner)."""
        def size(t):
            return t.numel() * t.element_size()
        return (sum(size(own[0]) for own in self.tokens if own),
                sum(size(t) for own in self.tokens for t in own[1:]))
