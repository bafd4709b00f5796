"""Simulated streams and events for running the CUDA runtime's logic on CPU, with a race check.

``SimApi`` replaces ``cuda_runtime.API``: copies run synchronously on CPU tensors, while every
stream keeps a vector clock (an entry per stream: how far into that stream's queue it is known
to have run). Recording an event snapshots the stream's clock; ``wait_event`` / ``wait_stream``
merge a snapshot in. An access to a storage at (stream S, tick t) happens-before a later access
on stream R iff R's clock has ``clock[S] >= t`` at that point.

``Races`` logs accesses to storages (reads and writes, with their stream's clock) and collects
every pair of conflicting accesses (write/write, read/write, write/read) to overlapping bytes that
is not ordered: on a real GPU those could run in either order.

Reads are asynchronous and so are frees: ``SimApi.watch_release(t)`` marks a device tensor that
an asynchronous copy reads; when its storage is released (the last Python reference dropped) the
release is logged as a write of the whole storage on the compute stream, which is what the
caching allocator allows from then on (any later kernel may reuse the memory). Releasing it
before the copy's event is known to be done (held in ``in_flight`` until then) is therefore a
race, and so is a copy into memory reused from a released block without waiting for the compute
stream. ``SimEvent.query`` never reports completion by default (a device far behind the host);
``SimApi(complete_after=n)`` completes an event once n more events have been recorded, and the
host then knows that everything the event covers is done (merged into every stream's clock).
"""
from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict

import torch


class SimStream:
    def __init__(self, api: "SimApi", name: str):
        self.api, self.name = api, name
        self.clock: dict[str, int] = {name: 0}

    def tick(self) -> int:
        self.clock[self.name] += 1
        return self.clock[self.name]

    def _merge(self, other: dict[str, int]) -> None:
        for k, t in other.items():
            if k != self.name:
                self.clock[k] = max(self.clock.get(k, 0), t)

    def wait_event(self, event: "SimEvent") -> None:
        if event.snapshot is not None:
            self._merge(event.snapshot)

    def wait_stream(self, other: "SimStream") -> None:
        self.api.stream_waits[(self.name, other.name)] += 1
        self._merge(other.clock)

    def synchronize(self) -> None:
        self.api.host_knows(self.clock)


class SimEvent:
    def __init__(self, api: "SimApi"):
        self.api = api
        self.snapshot: dict[str, int] | None = None
        self.recorded_at = 0

    def record(self, stream: SimStream) -> None:
        stream.tick()
        self.snapshot = dict(stream.clock)
        self.api.records += 1
        self.recorded_at = self.api.records

    def synchronize(self) -> None:
        """The host waits for what the event covers: from then on it knows all of it ran."""
        if self.snapshot is not None:
            self.api.host_knows(self.snapshot)

    def query(self) -> bool:
        """Done once ``api.complete_after`` more events were recorded (never by default: a
        device far behind the host). Seeing it done, the host knows all it covers has run."""
        lag = self.api.complete_after
        if self.snapshot is None:
            return True
        if lag is None or self.api.records - self.recorded_at < lag:
            return False
        self.api.host_knows(self.snapshot)
        return True


def _span(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage, first byte, end byte) that ``t`` covers."""
    size = t.element_size()
    start = t.storage_offset() * size
    extent = 0 if t.numel() == 0 else 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.untyped_storage().data_ptr(), start, start + extent * size


class Races:
    def __init__(self):
        self.log: dict[int, list[tuple[str, int, int, SimStream, int, str]]] = defaultdict(list)
        self.found: list[str] = []
        self.accesses = 0

    def forget(self, t: torch.Tensor) -> None:
        """``t`` is fresh host memory (a store buffer): on a GPU it shares no history with device
        tensors, but here every tensor is CPU memory, and the allocator may hand it the address of
        a released simulated device tensor, whose logged release would then look like a race
        with the first copy that reads the store."""
        key, lo, hi = _span(t)
        self.log[key] = [e for e in self.log[key] if e[2] <= lo or hi <= e[1]]

    def _access(self, kind: str, stream: SimStream, t: torch.Tensor, what: str) -> None:
        self.access_span(kind, stream, _span(t), what)

    def access_span(self, kind: str, stream: SimStream, span: tuple[int, int, int],
                    what: str) -> None:
        key, lo, hi = span
        if hi <= lo:
            return
        tick = stream.tick()
        self.accesses += 1
        for k, a, b, s, when, w in self.log[key]:
            if (kind == "read" and k == "read") or b <= lo or hi <= a:
                continue
            if s is not stream and stream.clock.get(s.name, 0) < when:
                self.found.append(f"{kind} of {what} on {stream.name} not ordered after "
                                  f"{k} of {w} on {s.name}")
        self.log[key].append((kind, lo, hi, stream, tick, what))

    def read(self, stream: SimStream, t: torch.Tensor, what: str) -> None:
        self._access("read", stream, t, what)

    def write(self, stream: SimStream, t: torch.Tensor, what: str) -> None:
        self._access("write", stream, t, what)


class SimApi:
    """Drop-in for ``cuda_runtime.CudaApi`` on the CPU device."""
    device_type = "cpu"

    def __init__(self, complete_after: int | None = None):
        self.races = Races()
        self.compute = SimStream(self, "compute")
        self.current = self.compute
        self.streams: list[SimStream] = [self.compute]
        self.stream_waits: dict[tuple[str, str], int] = defaultdict(int)
        self.complete_after = complete_after
        self.records = 0
        self.watched: set[int] = set()    # storages whose release is logged
        self.releases = 0

    def host_knows(self, clock: dict[str, int]) -> None:
        """The host saw work up to ``clock`` finish: whatever it enqueues next runs after it."""
        for stream in self.streams:
            stream._merge(clock)

    def watch_release(self, t: torch.Tensor, what: str) -> None:
        """Log the release of ``t``'s storage as a compute-stream write of all of it."""
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.watched or storage.nbytes() == 0:
            return
        self.watched.add(ptr)
        span = (ptr, 0, storage.nbytes())

        def released():
            self.watched.discard(ptr)
            self.releases += 1
            self.races.access_span("write", self.compute, span,
                                   f"release of {what} (memory reusable)")
        weakref.finalize(storage, released)

    def is_watched(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self.watched

    def normalize(self, device) -> torch.device:
        return torch.device(device)

    def current_stream(self, device) -> SimStream:
        return self.current

    def new_stream(self, device) -> SimStream:
        self.streams.append(SimStream(self, f"side{len(self.streams)}"))
        return self.streams[-1]

    @contextlib.contextmanager
    def use(self, stream: SimStream):
        saved, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = saved

    def new_event(self) -> SimEvent:
        return SimEvent(self)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.races.read(self.current, src, "copy source")
        self.races.write(self.current, dst, "copy destination")
        dst.copy_(src)
