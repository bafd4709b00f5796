"""One call that sets a model up for the throughput schedule (for benchmarks and scripts).

``compile_throughput(model, batch_size, micro_batches)`` streams the decoder layers' weights from
(pinned) CPU memory when they do not fit the device budget, or whenever ``stream=True``
(``runtime/weight_stream.py``), and compiles with ``backend="kvpr"``, ``dynamic=True`` (the
column order re-sizes the batch, so it must be symbolic) and ``schedule="throughput"``. A
transformers model gets its ``forward`` compiled in place (so ``generate`` uses it); any other
module is wrapped. Time ``setup.step(tokens, cache)`` (or the model's ``generate``) as usual::

    setup = compile_throughput(model, batch_size=64, micro_batches=4)
    logits = setup.step(tokens, cache)          # prefill, then one decode step per call
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ThroughputSetup:
    step: object                 # the compiled callable: the model (wrapped) or its forward
    weights: object              # the WeightStream, or None when the weights stay resident
    options: dict                # the backend options it was compiled with

    @property
    def placement(self) -> str:
        return "streamed" if self.weights is not None else "resident"


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def device_budget(device) -> int | None:
    """Free device memory (CUDA), or None (no limit: a CPU shares the host's memory)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def compile_throughput(model: nn.Module, batch_size: int, micro_batches: int | None = None, *,
                       stream: bool | str = "auto", gpu_budget_bytes: float | None = None,
                       device=None, num_slots: int = 2, **options) -> ThroughputSetup:
    """Stream weights if asked (``stream=True``) or if ``stream="auto"`` and the parameters do not
    fit ``gpu_budget_bytes`` (default: the free device memory), then compile for the throughput
    schedule with ``micro_batches`` (None: planned). Other keyword arguments are backend options
    (``ratio``, ``profile``, ...). ``micro_batches`` larger than ``batch_size`` is a ValueError."""
    from .plan.throughput_graph import even_split
    from .runtime.weight_stream import stream_weights
    if micro_batches is not None:
        even_split(batch_size, micro_batches)   # ValueError naming both numbers, before anything
    if stream not in (True, False, "auto"):
        raise ValueError(f"stream must be True, False or 'auto', got {stream!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    budget = gpu_budget_bytes if gpu_budget_bytes is not None else device_budget(device)
    streamed = stream is True or (stream == "auto" and budget is not None
                                  and parameter_bytes(model) > budget)
    weights = stream_weights(model, device=device, num_slots=num_slots) if streamed else None
    options = {"schedule": "throughput", "micro_batches": micro_batches,
               "gpu_budget_bytes": gpu_budget_bytes, **options}
    if hasattr(model, "generate"):   # transformers: generate() calls model.forward
        model.forward = torch.compile(model.forward, backend="kvpr", dynamic=True, options=options)
        step = model.forward
    else:
        step = torch.compile(model, backend="kvpr", dynamic=True, options=options)
    return ThroughputSetup(step, weights, options)
