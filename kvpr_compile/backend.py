"""The Dynamo backend ``kvpr``: the options checked once (options.py), then the graph through
the named stages of stages/__init__.py: find -> extract -> plan -> rewrite -> place -> lower,
or, for the throughput schedule, cut into columns instead of place and lower.

Registered through the ``torch_dynamo_backends`` entry point (setup.cfg), so
``torch.compile(model, backend="kvpr", options={...})`` works without importing this package.
The options and their meaning: options.py. ``mode=`` (e.g. HF's ``"reduce-overhead"``) is
accepted; CUDA-graph modes are ignored with a warning.
"""
from __future__ import annotations

from torch import fx

from .options import Options, parse_options   # noqa: F401  (parse_options: the public name)
from .runtime import kernels  # noqa: F401  (registers the kvpr:: ops' bodies before any graph runs)
from .stages import run, start
from .stages.compilation import refused_options


def kvpr_backend(gm: fx.GraphModule, example_inputs, **kwargs):
    try:
        c = start(gm, example_inputs, kwargs.get("options"), kwargs.get("mode"))
    except ValueError as error:   # the options: raised as kvpr's own error by the first call
        return refused_options(error)
    return run(c)
