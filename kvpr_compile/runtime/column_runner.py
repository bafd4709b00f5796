"""Run a lowered kvpr graph in the throughput schedule's column order.

For each layer segment j (column_order.py: the backend cuts the lowered graph and hands the cut
over) and each micro-batch k: segment j on micro-batch k's rows, with one environment of values
per micro-batch. Per call:

1. the batch (a ``rows`` input's dim 0, or the ``batch`` input) is split into m micro-batches,
   sizes differing by at most one (larger first; ``plan.throughput_graph.even_split``); m larger
   than the batch is a ValueError naming both, raised before anything is written;
2. each cache the graph reads is split into one store per micro-batch (``store_parts.split``; the
   first call pays the copy, later calls find the parts) and micro-batch k's segments get part k's
   handle, so its cache steps touch only its rows, each (layer, micro-batch) range one copy;
3. ``rows`` inputs are sliced (views), ``batch`` inputs become the micro-batch's size, ``shared``
   inputs pass as they are;
4. per segment: its ``weights_ready`` hooks once, the segment for every micro-batch (its cache
   loads issued one micro-batch ahead, below), its ``weights_release`` hooks once; values no
   later segment reads are dropped;
5. ``rows`` outputs are concatenated in batch order, ``shared`` ones come from micro-batch 0.

Cache loads one micro-batch ahead: a segment's loads are a module of their own (``prefetch``,
column_order.py), and micro-batch k+1's loads of layer j are issued right before micro-batch
k's body of layer j runs; before layer j's last micro-batch, layer j+1's micro-batch 0 loads are
issued (when everything they read is there: with one micro-batch, that is the layer-ahead
prefetch of the latency schedule). So (j, k+1)'s copies are queued behind (j, k)'s compute,
and the parts of a cache, which share their whole store's slot pool (cuda_runtime.py), hold
two (layer, micro-batch) slots: the one (j, k) reads and the one being filled; (j, k+2)'s loads
take (j, k)'s slot once its assemble freed it. A prefetch not issued ahead runs right before its
body.
"""
from __future__ import annotations

import torch
from torch import fx

from ..ops.errors import Unsupported
from .column_order import ColumnCut
from .store import KVStore, lookup
from .store_parts import split


class ColumnRunner:
    def __init__(self, cut: ColumnCut, roles, micro_batches, check_budget=None):
        """``cut``: column_order.cut of the lowered graph; ``roles``: passes.batch_rows.BatchRows
        (its inputs' roles); ``micro_batches``: int m, or a function of the batch giving m
        (planned); ``check_budget(sizes, store)``: raises if the working set of these
        micro-batches does not fit (or None)."""
        self.segments, self.out_node, self.cut_rule = cut.segments, cut.output, cut.rule
        self.placeholders = cut.placeholders
        self.roles = dict(zip(cut.placeholders, roles.inputs))
        for h in cut.handles:
            if h not in self.roles:
                raise Unsupported(f"the cache handle {h.name} is not an input of the graph")
            self.roles[h] = "cache"
        self.out_roles = roles.outputs
        self.micro_batches = micro_batches
        self.check_budget = check_budget
        self.last_sizes: tuple[int, ...] | None = None

    def _batch(self, args) -> int:
        for p, a in zip(self.placeholders, args):
            if self.roles[p] == "rows":
                return a.shape[0]
        for p, a in zip(self.placeholders, args):
            if self.roles[p] == "batch":
                return int(a)
        raise RuntimeError("kvpr: throughput step without a batch input")

    def sizes(self, batch: int) -> tuple[int, ...]:
        from ..plan.throughput_graph import even_split
        m = self.micro_batches
        if callable(m):
            m = min(m(batch), batch)
        elif m > batch:
            raise ValueError(f"kvpr: options['micro_batches']={m} is larger than the batch "
                             f"({batch} rows)")
        return even_split(batch, m)

    def __call__(self, *args):
        sizes = self.sizes(self._batch(args))
        self.last_sizes = sizes
        envs = [{} for _ in sizes]
        for p, a in zip(self.placeholders, args):
            role = self.roles[p]
            if role == "cache":
                store = _store_of(a)
                if self.check_budget is not None:
                    self.check_budget(sizes, store)
                parts = [store.whole()] if len(sizes) == 1 else split(store, sizes)
                for env, part in zip(envs, parts):
                    env[p] = part.handle if part is not store else a
            elif role == "rows":
                row = 0
                for env, size in zip(envs, sizes):
                    env[p] = a.narrow(0, row, size)
                    row += size
            elif role == "batch":
                for env, size in zip(envs, sizes):
                    env[p] = size
            else:
                for env in envs:
                    env[p] = a
        first = envs[0]
        issued: set[tuple[int, int]] = set()
        count = len(envs)
        for s, seg in enumerate(self.segments):
            for target, hook_args in seg.before:
                target(*fx.node.map_arg(hook_args, lambda n: first[n]))
            for k, env in enumerate(envs):
                self._prefetch(s, k, envs, issued)   # not issued ahead: now
                self._prefetch(*((s, k + 1) if k + 1 < count else (s + 1, 0)), envs, issued)
                outs = seg.module(*[env[n] for n in seg.inputs])
                env.update(zip(seg.outputs, outs))
            for target, hook_args in seg.after:
                target(*fx.node.map_arg(hook_args, lambda n: first[n]))
            for env in envs:
                for n in seg.drop:
                    env.pop(n, None)
        leaves, spec = torch.utils._pytree.tree_flatten(self.out_node.args[0])
        results, roles = [], iter(self.out_roles)
        for leaf in leaves:
            if not isinstance(leaf, fx.Node):
                results.append(leaf)
                continue
            role = next(roles)
            if role == "rows":
                results.append(torch.cat([env[leaf] for env in envs], dim=0))
            else:
                results.append(first[leaf])
        return torch.utils._pytree.tree_unflatten(results, spec)

    def _prefetch(self, s: int, k: int, envs, issued: set) -> None:
        """Issue segment ``s``'s loads for micro-batch ``k`` unless done (or there is no such
        segment, or something they read is not computed yet)."""
        if s >= len(self.segments) or (s, k) in issued:
            return
        seg, env = self.segments[s], envs[k]
        if seg.prefetch is None or any(n not in env for n in seg.prefetch_inputs):
            return
        issued.add((s, k))
        outs = seg.prefetch(*[env[n] for n in seg.prefetch_inputs])
        env.update(zip(seg.prefetch_outputs, outs))


def _store_of(handle: torch.Tensor) -> KVStore:
    """The store behind ``handle`` as it is (not made whole: its parts are what the step uses)."""
    store = KVStore.by_handle_id(id(handle))
    return store if store is not None and store.handle is handle else lookup(handle, whole=False)
