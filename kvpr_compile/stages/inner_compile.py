"""Stage ``lower``: the rewritten graph handed to the ``inner`` compiler (inner.py), unless the
column order already made the callable."""
from __future__ import annotations

from ..inner import compile_inner
from .compilation import Compilation


def lower(c: Compilation) -> None:
    if c.compiled is None:
        c.compiled = compile_inner(c.gm, c.example_inputs, c.options.inner)
