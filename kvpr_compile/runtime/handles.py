"""The handle registry: how compiled graphs reach a cache's store.

Every store gets a small int64 *handle* tensor ``[uid, version]`` when it is made. Graphs take
it as an input (guarded on shape only, so new caches reuse compiled graphs) and the kvpr ops
find the store behind it: ``lookup`` reads the uid, ``by_handle_id`` needs no read of the tensor
(the compiled step's direct calls, where the handle is the very tensor the store made). Both
registries hold stores weakly: a cache that is gone is not kept alive by having been compiled.
"""
from __future__ import annotations

import itertools
import weakref

import torch

_BY_UID: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_BY_HANDLE_ID: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_UIDS = itertools.count(1)


def register(store) -> tuple[int, torch.Tensor]:
    """A new (uid, handle) for ``store``, which must keep the handle alive (ids stay unique)."""
    uid = next(_UIDS)
    handle = torch.tensor([uid, 0], dtype=torch.int64)
    _BY_UID[uid] = store
    _BY_HANDLE_ID[id(handle)] = store
    return uid, handle


def by_handle_id(handle_id: int):
    """The live store whose handle tensor has this ``id`` (no read of the tensor), or None."""
    return _BY_HANDLE_ID.get(handle_id)


def lookup(handle: torch.Tensor, whole: bool = True):
    """The store behind ``handle``; ``whole=False``: as it is, micro-batch parts and all."""
    uid = int(handle[0])
    store = _BY_UID.get(uid)
    if store is None:
        raise RuntimeError(f"kvpr: no live offloaded cache with id {uid}")
    return store.whole() if whole else store
