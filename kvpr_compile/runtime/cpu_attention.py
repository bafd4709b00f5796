"""The body of ``kvpr::cpu_attend``: the query attends to K,V [start, end) of a layer where they
lie, in the CPU store, and only the partial output and its log-sum-exp go back.

Synchronous path (CPU device): ``attend`` reads the store's rows as views (no copy) and returns
``host_partial_attention``'s result (ops/attention.py).

CUDA runtime (and simulated streams): ``CpuAttention`` of a cache's runtime, one per device.
``start`` (called at the op, on the host thread that runs the graph):

    compute:  ... q (and the mask) computed -> record issued
    cpu_d2h:  wait issued; copy q, mask slice -> pinned host buffers -> record q_ready
    worker:   (a thread with its own torch thread count) wait q_ready on the host, wait the
              layer's latest store event on the host (the range's rows landed in the pinned
              store); attend from the store; write out, lse into pinned buffers
    cpu_h2d:  (issued by the worker) wait issued; copy out, lse -> fresh device tensors ->
              record done
    compute:  ``wait([out, lse])`` (the merge's only input from here): the host waits for the
              worker's job (it has then issued the H2D copies), the compute stream for done

So the host thread that runs the graph waits at the merge only, for the worker to have issued
its copies; the device's own part of the attention, and the layer-ahead loads issued before it,
are already queued by then. The device tensors the op returns are held by the graph until the
merge; the query and the mask are held by the job until the worker saw ``q_ready``.
"""
from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

from ..ops.attention import host_partial_attention, rows_as_heads, scores_fn, worker_threads
from . import host_memory

_PENDING: dict = {}   # id(out or lse tensor) -> (weakref to it, job, runtime)


def store_range(store, layer: int, start: int, end: int):
    """The store's K, V [start, end) of ``layer`` as (b, kv_heads, n, d) views: no copy."""
    return rows_as_heads(store.k[layer][start:end], store.v[layer][start:end])


def attend(store, layer: int, q, start: int, end: int, mask, scale: float, scores: int = -1,
           extras=()):
    """The synchronous path: ``host_partial_attention`` of ``q`` over the store's rows."""
    k, v = store_range(store, layer, start, end)
    return host_partial_attention(q, k, v, mask, scale, scores_fn(scores), extras)


def cpu_gap(k_new, cpu_len: int) -> list:
    """The rows an assemble holds where the CPU attends: zeros (finite: the device part masks
    them, and a masked row must not turn 0 * x into NaN), so every layout op between the
    assemble and attention sees the whole past's length."""
    if not cpu_len:
        return []
    b, h, _, d = k_new.shape
    return [k_new.new_zeros(b, h, cpu_len, d)]


class _Inline:
    """An executor that runs a job when its result is asked for (simulated streams: one host
    thread, and the worst case of a worker that starts late)."""

    def submit(self, fn, *args):
        return _Deferred(fn, args)


class _Deferred:
    def __init__(self, fn, args):
        self.fn, self.args, self.done, self.value = fn, args, False, None

    def result(self):
        if not self.done:
            self.value, self.done = self.fn(*self.args), True
            self.args = None
        return self.value


class CpuAttention:
    """The CPU part of a cache's runtime (module docstring)."""

    def __init__(self, api, device: torch.device, threaded: bool | None = None):
        """``threaded``: a worker thread (default on CUDA) or jobs run when their result is
        asked for (simulated streams, whose stream state is one per process)."""
        self.api, self.device = api, device
        self.d2h = api.new_stream(device)
        self.h2d = api.new_stream(device)
        self.pin = api.device_type == "cuda"
        if threaded if threaded is not None else self.pin:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="kvpr-cpu-attention",
                                           initializer=torch.set_num_threads,
                                           initargs=(worker_threads(),))
        else:
            self.pool = _Inline()

    def __del__(self):
        shutdown = getattr(self.pool, "shutdown", None)
        if shutdown is not None:
            shutdown(wait=False)   # a job still running finishes; nothing waits for it here

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        host = host_memory.alloc(tuple(t.shape), t.dtype, self.pin, zero=False)
        self.api.copy(host, t)
        return host

    def start(self, store, rt, layer: int, q, start: int, end: int, mask, scale: float,
              scores: int = -1, extras=()):
        """Issue the CPU's part of ``layer``'s attention; returns device tensors (out, lse)
        that a ``wait`` makes ready (see ``wait_for``)."""
        api = self.api
        current = api.current_stream(self.device)
        issued = api.new_event()
        issued.record(current)
        self.d2h.wait_event(issued)
        with api.use(self.d2h):
            q_host = self._to_host(q)
            mask_host = self._to_host(mask) if mask is not None else None
            extras_host = [self._to_host(t) for t in extras]
            q_ready = api.new_event()
            q_ready.record(self.d2h)
        b, h, n, d = q.shape
        out = torch.empty((b, h, n, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
        stored = rt.stored[layer]
        job = self.pool.submit(self._work, store, layer, (q, mask, *extras), q_host,
                               (mask_host, scores, extras_host), q_ready, stored, issued, out,
                               lse, start, end, scale)
        for t in (out, lse):
            key = id(t)
            _PENDING[key] = (weakref.ref(t, lambda _, key=key: _PENDING.pop(key, None)), job, rt)
        return out, lse

    def _work(self, store, layer, sources, q_host, scoring, q_ready, stored, issued, out, lse,
              start, end, scale):
        api = self.api
        with api.use(self.h2d):   # the worker's host work and its copies, on its own stream
            q_ready.synchronize()
            del sources           # q and the mask: their D2H copy is done
            if stored is not None:
                stored.synchronize()
            k, v = store_range(store, layer, start, end)
            mask_host, scores, extras_host = scoring
            o_cpu, lse_cpu = host_partial_attention(q_host, k, v, mask_host, scale,
                                                    scores_fn(scores), extras_host)
            o_host, lse_host = (host_memory.alloc(tuple(t.shape), t.dtype, self.pin, zero=False)
                                for t in (o_cpu, lse_cpu))
            o_host.copy_(o_cpu)
            lse_host.copy_(lse_cpu)
            self.h2d.wait_event(issued)   # out, lse: fresh memory allocated at ``issued``
            api.copy(out, o_host)
            api.copy(lse, lse_host)
            done = api.new_event()
            done.record(self.h2d)
        return done, (o_host, lse_host)


def wait_for(t: torch.Tensor, current) -> bool:
    """If ``t`` is a pending CPU-attention result: the host waits for its job, ``current`` for
    its copies; returns whether it was one."""
    pending = _PENDING.get(id(t))
    if pending is None or pending[0]() is not t:
        return False
    del _PENDING[id(t)]
    _, job, rt = pending
    done, hold = job.result()
    current.wait_event(done)
    rt.in_flight.append((done, hold))   # the pinned results, until their copies are done
    return True
