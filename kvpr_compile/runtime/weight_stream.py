"""Layer weights that live in (pinned) CPU memory and are copied layer-ahead into a few static
device slots, for models whose weights do not fit on the device.

``stream_weights(model)`` keeps every decoder layer's parameters in one flat host buffer per
dtype and gives the device ``num_slots`` flat buffers; layer i's parameters become fixed views
of slot ``i % num_slots`` (stable addresses: nothing is swapped at run time, so compiled graphs
and hooks see the same parameter objects every step). Around each layer's forward:

    before layer i (pre-hook, ``kvpr::weights_ready``): if slot i % k does not hold layer i yet,
        load it now; the compute stream waits for the slot's copy event
    after layer i (hook, ``kvpr::weights_release``): the compute stream records the slot's free
        event, and the copy stream starts loading the next layer the slot serves (i + k, or
        after the last layer the slot's first one, for the next step) once that event has passed

The hooks call custom ops, so under ``torch.compile`` Dynamo records them in the graph in
program order like any other op of the model; run uncompiled, the hooks do the same work. A slot
is only ever filled after the free event of its last reader and read after its ready event; a
layer used out of order (or twice) is loaded on demand, so the result never depends on the order.
Stream and event calls go through ``cuda_runtime.API`` (simulated streams in the tests); on a CPU
device the copies are synchronous.
"""
from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor, nn

from ..ops import library
from . import cuda_runtime

_REGISTRY: "weakref.WeakValueDictionary[int, WeightStream]" = weakref.WeakValueDictionary()
_UIDS = itertools.count(1)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: the ModuleList holding the most parameters."""
    best, size = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = module, n
    if best is None:
        raise ValueError("stream_weights: no nn.ModuleList of layers found; pass layers=")
    return best


class _Slot:
    def __init__(self, buffers: dict, new_event):
        self.buffers = buffers          # dtype -> flat device tensor
        self.holds: int | None = None   # layer whose weights are (being) copied in
        self.ready = new_event()        # copy stream: that copy is done
        self.free = new_event()         # compute stream: the last reader of the slot is queued
        self.used = False               # free has been recorded at least once


class WeightStream:
    """The host store and device slots of one model's layer weights (see the module doc)."""

    def __init__(self, layers, device, num_slots: int = 2):
        layers = list(layers)
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be an integer >= 1, got {num_slots!r}")
        if not layers:
            raise ValueError("stream_weights: no layers to stream")
        self.device = torch.device(device)
        self.api = cuda_runtime.API if cuda_runtime.handles(self.device) else None
        self.num_layers, self.num_slots = len(layers), min(num_slots, len(layers))
        pin = self.device.type == "cuda"
        # per layer: [(module, name, dtype, offset, shape)], and one flat host buffer per dtype
        self.entries, self.host = [], []
        for layer in layers:
            entries, sizes = [], {}
            for module in layer.modules():
                for name, p in module.named_parameters(recurse=False):
                    entries.append((module, name, p.dtype, sizes.get(p.dtype, 0), tuple(p.shape)))
                    sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
            host = {dt: torch.empty(n, dtype=dt, pin_memory=pin) for dt, n in sizes.items()}
            for module, name, dt, off, shape in entries:
                src = getattr(module, name).detach()
                host[dt][off:off + src.numel()].copy_(src.reshape(-1))
            self.entries.append(entries)
            self.host.append(host)
        new_event = self.api.new_event if self.api else (lambda: None)
        self.slots = []
        for j in range(self.num_slots):
            need: dict = {}
            for i in range(j, self.num_layers, self.num_slots):
                for dt, buf in self.host[i].items():
                    need[dt] = max(need.get(dt, 0), buf.numel())
            self.slots.append(_Slot({dt: torch.empty(n, dtype=dt, device=self.device)
                                     for dt, n in need.items()}, new_event))
        for i, entries in enumerate(self.entries):   # parameters become fixed slot views
            slot = self.slots[i % self.num_slots]
            for module, name, dt, off, shape in entries:
                n = 1
                for s in shape:
                    n *= s
                view = slot.buffers[dt][off:off + n].view(shape)
                module._parameters[name] = nn.Parameter(view, requires_grad=False)
        self.copy_stream = self.api.new_stream(self.device) if self.api else None
        self.on_demand = 0   # loads ready() had to issue itself: the prefetch missed
        self.uid = next(_UIDS)
        self.handle = torch.tensor([self.uid], dtype=torch.int64)
        _REGISTRY[self.uid] = self
        for i in range(self.num_slots):
            self.start(i)

    def bytes_on_device(self) -> int:
        return sum(b.numel() * b.element_size() for s in self.slots for b in s.buffers.values())

    def bytes_on_host(self) -> int:
        return sum(b.numel() * b.element_size() for h in self.host for b in h.values())

    def start(self, layer: int) -> None:
        """Copy layer's weights into its slot once the slot's last reader is done."""
        slot = self.slots[layer % self.num_slots]
        slot.holds = layer
        pairs = [(slot.buffers[dt][:src.numel()], src) for dt, src in self.host[layer].items()]
        if self.api is None:
            for dst, src in pairs:
                dst.copy_(src)
            return
        if slot.used:
            self.copy_stream.wait_event(slot.free)
        with self.api.use(self.copy_stream):
            for dst, src in pairs:
                self.api.copy(dst, src)
            slot.ready.record(self.copy_stream)

    def ready(self, layer: int) -> None:
        slot = self.slots[layer % self.num_slots]
        if slot.holds != layer:   # used out of order: load it now
            self.on_demand += 1
            self.start(layer)
        if self.api is not None:
            self.api.current_stream(self.device).wait_event(slot.ready)

    def release(self, layer: int) -> None:
        slot = self.slots[layer % self.num_slots]
        if self.api is not None:
            slot.free.record(self.api.current_stream(self.device))
            slot.used = True
        # the next layer this slot serves, in cyclic order (the next step's first ones last)
        following = layer + self.num_slots
        if following >= self.num_layers:
            following = layer % self.num_slots
        if slot.holds != following:
            self.start(following)


def lookup(handle: Tensor) -> WeightStream:
    stream = _REGISTRY.get(int(handle[0]))
    if stream is None:
        raise RuntimeError(f"kvpr: no live weight stream with id {int(handle[0])}")
    return stream


def weights_ready(handle: Tensor, layer: int) -> None:
    """The body of ``kvpr::weights_ready`` (defined in ops/library.py)."""
    lookup(handle).ready(layer)


def weights_release(handle: Tensor, layer: int) -> None:
    """The body of ``kvpr::weights_release``."""
    lookup(handle).release(layer)


torch.library.register_kernel(library.weights_ready, None, weights_ready)
torch.library.register_kernel(library.weights_release, None, weights_release)


def stream_weights(model: nn.Module, layers=None, device=None, num_slots: int = 2) -> WeightStream:
    """Keep ``layers``' weights (default: the decoder layers, see ``decoder_layers``) in CPU
    memory, pinned when ``device`` is CUDA, with ``num_slots`` layers' worth on ``device``
    (default: where the model's first parameter is); the rest of the model (embeddings, head,
    norms, buffers) moves to ``device``. Returns the WeightStream; its hooks stay on the layers
    for the model's life."""
    layers = decoder_layers(model) if layers is None else layers
    if device is None:
        device = next(model.parameters()).device
    stream = WeightStream(layers, device, num_slots)
    model.to(stream.device)   # the rest of the model (layers' slot views are there already)
    model._kvpr_weight_stream = stream   # the registry holds it weakly: the model keeps it alive
    handle = stream.handle
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(
            lambda module, args, i=i: torch.ops.kvpr.weights_ready(handle, i))
        layer.register_forward_hook(
            lambda module, args, out, i=i: torch.ops.kvpr.weights_release(handle, i))
    return stream
