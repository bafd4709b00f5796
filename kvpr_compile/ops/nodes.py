"""Named views of a ``kvpr::`` op node's arguments: ``args_of(node).layer``, not ``node.args[1]``.

One NamedTuple per op, its fields the op's schema arguments in order (tests/test_op_nodes.py
checks them against the schemas), so a signature change is made here and in library.py, and
every reader names what it reads. ``args_of`` binds a node's positional and keyword arguments
and fills the schema defaults (``owned=False``, ``shared=None``) a node may leave out. The
views are read-only: passes that build op nodes pass a plain tuple (or ``tuple(view)``).

Also here: the op overloads graphs hold as targets, and the ``kvpr_role`` names the rewrite gives
the nodes it inserts (``meta["custom"]["kvpr_role"]``), which the placement pass, the lowering
and the column cut read.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import fx

from . import library  # noqa: F401  (the ops below must exist)

_kvpr = torch.ops.kvpr
CACHE_UPDATE = _kvpr.cache_update.default
LOAD_KV = _kvpr.load_kv.default
LOAD_TOKENS = _kvpr.load_tokens.default
WAIT = _kvpr.wait.default
STORE_TOKENS = _kvpr.store_tokens.default
ASSEMBLE = _kvpr.assemble.default
PREFETCH_NEXT = _kvpr.prefetch_next.default
CPU_ATTEND = _kvpr.cpu_attend.default
WEIGHTS_READY = _kvpr.weights_ready.default
WEIGHTS_RELEASE = _kvpr.weights_release.default

# Roles of the nodes the rewrite inserts; a layer's loads (and their split) move as one group.
ROLE = "kvpr_role"
LOAD_ROLES = ("split", "load_tokens", "load_kv")


def role_of(node: fx.Node) -> str | None:
    """The ``kvpr_role`` the rewrite gave ``node`` (None for any other node)."""
    return (node.meta.get("custom") or {}).get(ROLE)


class CacheUpdate(NamedTuple):
    handle: Any
    k: Any
    v: Any
    layer: Any
    pos: Any
    start: Any = 0   # a sliding window's first key (0: the whole past)


class LoadKv(NamedTuple):
    handle: Any
    layer: Any
    start: Any
    end: Any
    batch: Any
    heads: Any
    head_dim: Any
    dtype: Any
    device: Any
    owned: Any = False


class LoadTokens(NamedTuple):
    handle: Any
    layer: Any
    end: Any
    shapes: Any
    ranks: Any
    dtypes: Any
    device: Any
    owned: Any = False
    start: Any = 0


class Wait(NamedTuple):
    tensors: Any


class StoreTokens(NamedTuple):
    handle: Any
    layer: Any
    pos: Any
    k: Any
    v: Any
    inputs: Any
    tdims: Any
    shared: Any = None


class PrefetchNext(NamedTuple):
    handle: Any
    layer: Any
    past: Any
    new: Any
    num: Any
    den: Any
    shapes: Any
    ranks: Any
    dtypes: Any
    batch: Any
    heads: Any
    head_dim: Any
    dtype: Any
    device: Any
    resident_num: Any = 0
    resident_den: Any = 1
    resident_cap: Any = -1
    ratio_of_rest: Any = False
    cpu_num: Any = 0
    cpu_den: Any = 1

    def residency(self) -> tuple:
        """(num, den, cap, of_rest): the resident rule of the next call's first layer."""
        return self.resident_num, self.resident_den, self.resident_cap, self.ratio_of_rest


class Assemble(NamedTuple):
    handle: Any
    layer: Any
    k_rec: Any
    v_rec: Any
    k_load: Any
    v_load: Any
    k_new: Any
    v_new: Any
    resident: Any = 0
    resident_num: Any = 0
    resident_den: Any = 1
    resident_cap: Any = -1
    start: Any = 0   # a sliding window's first position (never with a resident prefix)
    cpu_len: Any = 0

    def residency(self) -> tuple:
        """(resident, num, den, cap): the resident prefix's length and capacity rule."""
        return self.resident, self.resident_num, self.resident_den, self.resident_cap


class CpuAttend(NamedTuple):
    handle: Any
    layer: Any
    q: Any
    start: Any
    end: Any
    mask: Any
    scale: Any
    scores: Any
    extras: Any


class WeightsHook(NamedTuple):   # weights_ready and weights_release
    handle: Any
    layer: Any


VIEWS = {CACHE_UPDATE: CacheUpdate, LOAD_KV: LoadKv, LOAD_TOKENS: LoadTokens, WAIT: Wait,
         STORE_TOKENS: StoreTokens, PREFETCH_NEXT: PrefetchNext, ASSEMBLE: Assemble,
         CPU_ATTEND: CpuAttend,
         WEIGHTS_READY: WeightsHook, WEIGHTS_RELEASE: WeightsHook}
_PACKETS = {op.overloadpacket: view for op, view in VIEWS.items()}


def is_kvpr(node) -> bool:
    """Whether ``node`` calls a ``kvpr::`` op (overload or packet)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and (
        node.target in VIEWS or node.target in _PACKETS)


def args_of(node: fx.Node):
    """The named arguments of the kvpr op node ``node`` (defaults filled in)."""
    view = VIEWS.get(node.target) or _PACKETS.get(node.target)
    if view is None:
        raise TypeError(f"{node.name} calls {node.target}, not a kvpr:: op")
    return view(*node.args, **node.kwargs)
