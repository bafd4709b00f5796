"""What runs a rewritten graph (the ``inner`` option).

- ``eager`` (default): the graph itself, with the kvpr steps lowered to direct calls
  (runtime/lower.py): the steps run in program order, so layer-ahead loads overlap compute.
- ``inductor``: the whole graph, kvpr:: custom ops included, handed to inductor. Loads then go to
  fresh tensors (inductor may recycle op outputs' memory) and wait for the whole compute stream,
  and stores copy their sources into runtime-owned buffers first (store race): correct, but the
  copies no longer overlap compute, and every kvpr op pays the dispatcher.

A piecewise inner (inductor between the kvpr steps) is not here yet: pieces whose inputs have
sizes like ``past // 2`` or ``past + 1`` without ``past`` itself fail inductor's symbol binding.
"""
from __future__ import annotations

import torch
from torch import fx

from .runtime.lower import lower

INNER = ("eager", "inductor")


def default_inner(example_inputs) -> str:
    return "eager"


def compile_inner(gm: fx.GraphModule, example_inputs, inner: str):
    """The callable that runs ``gm`` (already rewritten) with ``inner``."""
    if inner == "inductor":
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)
    return lower(gm).forward
