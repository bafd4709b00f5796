"""What runs a rewritten graph (the ``inner`` option).

- ``eager`` (default): the graph itself, with the kvpr steps lowered to direct calls
  (runtime/lower.py): the steps run in program order, so layer-ahead loads overlap compute.
- ``piecewise``: the same, with every piece between kvpr steps compiled by inductor
  (runtime/piecewise.py): the model's ops fused, the steps and their overlap unchanged.
- ``inductor``: the whole graph, kvpr:: custom ops included, handed to inductor. Loads then go to
  fresh tensors (inductor may recycle op outputs' memory) and wait for the whole compute stream,
  and stores copy their sources into runtime-owned buffers first (store race): correct, but the
  copies no longer overlap compute, and every kvpr op pays the dispatcher.

``eager`` is the default on every device: on a CPU inductor compiles C++ for every piece and a
piece's guard check can cost more host time than fusion saves, and on CUDA the step is bound by
the copies and the recompute's GEMMs, which fusion does not touch (measurements in
docs/design.md, "What runs the rewritten graph").
"""
from __future__ import annotations

import torch
from torch import fx

INNER = ("eager", "piecewise", "inductor")


def default_inner(example_inputs) -> str:
    return "eager"


def compile_inner(gm: fx.GraphModule, example_inputs, inner: str):
    """The callable that runs ``gm`` (already rewritten) with ``inner``."""
    if inner == "inductor":
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)
    from .runtime.lower import lower
    lowered = lower(gm)
    if inner == "piecewise":
        from .runtime.piecewise import compile_piecewise
        return compile_piecewise(lowered).forward
    return lowered.forward
