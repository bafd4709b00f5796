"""The CPU store of one offloaded cache: what the kvpr ops read and write, behind one handle.

A ``KVStore`` puts together
- its geometry (``geometry.py``, shared with the cache that made it),
- the K/V buffers (``kv_storage.py``, ``kv``),
- the per-token recompute inputs and their valid prefix (``token_records.py``, ``records``),
- its handle tensor, registered so that compiled graphs find it (``handles.py``),
- while the throughput schedule has split it, its micro-batch parts (``store_parts.py``),
- the device copy of each layer's resident prefix (``resident.py``, ``resident``): the store
  keeps every token too, and drops those rows whenever what it holds changes other than by a
  compiled step (an uncompiled write, a reset, new buffers, ``k_cpu``/``v_cpu`` handed out).

The ops and the CUDA runtime call the methods here (``write_kv``, ``read_kv``, ``write_tokens``,
``read_tokens``, ...), which pass the call on to the half that owns the data, so that a test can
watch every access of a store in one class.

``writes`` counts every change of what the store holds (a K/V or record write, an invalidation,
a reset, new buffers, the stored records narrowed or dropped, the K/V tensors handed out through
``OffloadedKVCache.k_cpu``, see ``changed``): a copy made from the store stays valid while it is
unchanged (the cross-call prefetch, cuda_runtime.prefetch_next).

While a store is split its own K/V buffers are released; anything that addresses it as one store
(``lookup``, ``direct.resolve``, the cache's ``k_cpu``) calls ``whole()``, which copies the parts
back first.
"""
from __future__ import annotations

import math

import torch

from . import handles
from .geometry import CacheGeometry, HasGeometry
from .handles import lookup  # noqa: F401  (the store behind a handle: ``store.lookup`` for the ops)
from .kv_storage import KVStorage
from .resident import ResidentRows
from .store_parts import merge
from .token_records import TokenRecords


class KVStore(HasGeometry):
    def __init__(self, geometry: CacheGeometry):
        self.geometry = geometry
        self.kv = KVStorage(geometry)
        self.records = TokenRecords(geometry)
        self.resident = ResidentRows(geometry.num_layers)
        self._changes = 0   # changes made outside both halves (see ``writes``)
        self.checked_write = self.checked_read = None   # geometry last accepted (checks.py)
        self.windows: tuple = ()   # per layer, the cache's sliding window (0: none; cache.py)
        self.parts: list[KVStore] | None = None   # micro-batch stores while split
        self.part_of: tuple | None = None   # a part: (weakref to its whole store, its index)
        self.uid, self.handle = handles.register(self)   # the store keeps its handle alive

    @staticmethod
    def by_handle_id(handle_id: int) -> KVStore | None:
        """The live store whose handle tensor has this ``id`` (no read of the tensor)."""
        return handles.by_handle_id(handle_id)

    # ---- what the halves hold (read-only names; see kv_storage.py, token_records.py) ------
    @property
    def k(self) -> list[torch.Tensor]:
        return self.kv.k

    @property
    def v(self) -> list[torch.Tensor]:
        return self.kv.v

    @property
    def written(self) -> list[int]:
        return self.kv.written

    @property
    def tokens(self) -> list[list[torch.Tensor]]:
        return self.records.tokens

    @property
    def token_len(self) -> list[int]:
        return self.records.token_len

    @property
    def links(self) -> list[tuple]:
        return self.records.links

    @property
    def dropped_tokens(self) -> int:
        return self.records.dropped_tokens

    # ---- accesses ------------------------------------------------------------------------
    def write_kv(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' k, v ``(b, hkv, n, d)`` at positions ``[pos, pos + n)``."""
        self.kv.write(layer, pos, k, v)

    def read_kv(self, layer: int, start: int, end: int, device: torch.device | None):
        """K, V for positions ``[start, end)`` as ``(b, hkv, end - start, d)`` on ``device``
        (None: views of the store, nothing moved)."""
        return self.kv.read(layer, start, end, device)

    def write_tokens(self, layer: int, pos: int, records: list[torch.Tensor],
                     links: tuple = ()) -> None:
        """Per-token records ``(n, *record)`` for positions ``[pos, pos + n)``
        (TokenRecords.write)."""
        self.records.write(layer, pos, records, links)

    def write_token(self, layer: int, pos: int, values: list[torch.Tensor],
                    links: tuple = ()) -> None:
        """``write_tokens`` for one token: ``values`` are its records (no leading axis)."""
        self.records.write_one(layer, pos, values, links)

    def token_sources(self, layer: int, specs: list[tuple[tuple, torch.dtype]]):
        """The stored records for ``specs`` as full-length views, or None (TokenRecords.sources)."""
        return self.records.sources(layer, specs)

    def read_tokens(self, layer: int, end: int, specs: list[tuple[tuple, torch.dtype]],
                    device: torch.device | None, start: int = 0):
        """Records for positions ``[start, end)`` on ``device`` (TokenRecords.read)."""
        return self.records.read(layer, end, specs, device, start)

    def invalidate_tokens(self, layer: int, pos: int) -> None:
        """A write without recompute inputs at ``pos`` (the uncompiled path) ends the valid
        prefix there, and the resident rows from ``pos`` on."""
        self.records.invalidate(layer, pos)
        self.resident.truncate(layer, pos)

    def covered(self, layer: int) -> int:
        """Positions ``[0, covered)`` of ``layer`` can be recomputed (TokenRecords.covered)."""
        return self.records.covered(layer)

    def stored_where_uncovered(self, layer: int, r: int, k_rec, v_rec, device):
        """The recomputed K,V of positions ``[r, r + l)`` with the rows past ``covered`` (no
        stored X there) replaced by the stored K,V."""
        l, covered = k_rec.shape[2], self.covered(layer)
        if covered >= r + l:
            return k_rec, v_rec
        keep = max(covered - r, 0)
        k_fix, v_fix = self.read_kv(layer, r + keep, r + l, device)
        return (torch.cat([k_rec[:, :, :keep], k_fix], dim=2),
                torch.cat([v_rec[:, :, :keep], v_fix], dim=2))

    # ---- the store as a whole ------------------------------------------------------------
    @property
    def writes(self) -> int:
        """Changes of what the store holds so far (module docstring); only ever grows."""
        return self._changes + self.kv.changes + self.records.changes

    def changed(self) -> None:
        """Something outside the store may have changed what it holds (its K/V handed out)."""
        self._changes += 1
        self.resident.clear()

    def reset(self) -> None:
        self.records.reset()
        self.resident.clear()
        for part in self.parts or ():
            part.reset()

    def buffers_replaced(self) -> None:
        """K/V buffers or record stores were swapped (split into / merged from micro-batch
        parts): remake the K/V views and forget every memo of the fast paths."""
        self.kv.remake_views()
        self.records.forget_memos()
        self.resident.clear()
        self._changes += 1

    def whole(self) -> KVStore:
        """This store with its micro-batch parts copied back (see store_parts.merge)."""
        if self.parts is not None:
            merge(self)
        return self

    def nbytes(self) -> dict[str, int]:
        """CPU bytes held: ``kv`` (K and V), ``x`` (each layer's first record) and ``sides`` (the
        other records; a shared one counts once, in its owner)."""
        x, sides = self.records.nbytes()
        return {"kv": self.kv.nbytes(), "x": x, "sides": sides}


def layout_bytes(num_layers: int, max_seq_len: int, batch: int, num_kv_heads: int, head_dim: int,
                 element_size: int, x_record: tuple, side_records: list[tuple],
                 shared: bool) -> dict[str, int]:
    """``KVStore.nbytes`` of a store whose every layer keeps X and ``side_records`` (per-token
    shapes), computed from shapes alone (e.g. at 7B dims). ``shared``: the side records are kept
    once (by the first layer, the others linking to it) instead of once per layer."""
    def numel(shape):
        return math.prod(shape) * max_seq_len * element_size
    sides = sum(numel(r) for r in side_records)
    return {"kv": 2 * num_layers * numel((batch, num_kv_heads, head_dim)),
            "x": num_layers * numel(x_record),
            "sides": sides if shared else num_layers * sides}
