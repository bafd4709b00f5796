"""The bottom layer: the ``kvpr::`` ops as graphs name them, below every pass and the runtime.

- ``library.py``: the op definitions and fake kernels (their real bodies are registered by
  ``runtime/kernels.py`` and ``runtime/weight_stream.py``);
- ``nodes.py``: named views of an op node's arguments (``args_of(node).layer``);
- ``specs.py``: the record-spec codec (per-token record shapes and dtypes as schema ints);
- ``split.py``: the split rule (how many past tokens a ratio recomputes);
- ``errors.py``: ``Unsupported``, the refusal every pass and the column cut raise.

``passes/``, ``runtime/`` and ``plan/`` depend on this package, never it on them.
"""
from . import library  # noqa: F401  (defines the kvpr:: ops: graphs name them at import time)
