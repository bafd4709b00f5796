"""Tell the user, once and in words, when Dynamo stops compiling a function.

After ``torch._dynamo.config.recompile_limit`` graphs for one function (or the accumulated limit)
Dynamo runs every later call that needs a new graph *uncompiled*: for a model with an
OffloadedKVCache that is the exact but slow offloaded path, without kvpr's recompute and
prefetch, and torch says so only in a log line. The kvpr backend installs a handler on the logger
that emits that line (``torch._dynamo.convert_frame``) and turns it into a warning.

``recent_graph_break`` reads Dynamo's graph-break counter for the reason of the latest break,
which the warning about a graph with only some of the cache's layers quotes.
"""
from __future__ import annotations

import logging
import re

import torch

from . import report as rep

_LOGGER = "torch._dynamo.convert_frame"
_HIT = re.compile(r"hit config\.(\w*recompile_limit|\w*cache_size_limit) \((\d+)\)")
_FUNCTION = re.compile(r"function: (.*)")


def limit_message(text: str) -> str | None:
    """The warning for a Dynamo log line, or None if the line is not about a recompile limit."""
    hit = _HIT.search(text)
    if hit is None:
        return None
    function = _FUNCTION.search(text)
    name = function.group(1).strip() if function else "a compiled function"
    limit, count = hit.groups()
    return (f"kvpr: torch.compile stopped compiling {name}: it reached "
            f"torch._dynamo.config.{limit} ({count} graphs). Calls that need another graph now run "
            "UNCOMPILED: results stay exact, but the KV cache is read by the slow offloaded path "
            "without kvpr's recompute and prefetch. Raise torch._dynamo.config."
            f"{limit} (e.g. to 64) or find what changes between calls with "
            "TORCH_LOGS=recompiles. A decorator's wrapper (such as transformers' "
            "deprecate_kwarg, reached after a graph break) counts the graphs of every function "
            "it wraps together; Hugging Face models compiled as model.forward = "
            "torch.compile(model.forward) share one limit that way: "
            "kvpr_compile.hf.compile(model) gives each model a compiled frame of its own.")


class _LimitHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = limit_message(record.getMessage())
        except Exception:  # noqa: BLE001 - a logging handler must never raise
            return
        if message is not None:
            rep.warn_once(message)


_HANDLER = _LimitHandler(level=logging.WARNING)


def install() -> None:
    """Idempotent: attach the handler to Dynamo's compile logger."""
    logger = logging.getLogger(_LOGGER)
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)


def recent_graph_break(limit: int = 400) -> str | None:
    """The reason of the latest new graph break Dynamo counted in this process, shortened to its
    first line and its debug context (``torch._dynamo.utils.counters["graph_break"]``, a
    Counter of reason strings in the order first seen), or None when it counted none."""
    try:
        reasons = list(torch._dynamo.utils.counters["graph_break"])
    except Exception:  # noqa: BLE001 - the counter is Dynamo's, not a promise
        return None
    if not reasons:
        return None
    lines = [line.strip() for line in str(reasons[-1]).splitlines() if line.strip()]
    context = [line for line in lines[1:] if line.startswith("Developer debug context:")]
    text = " ".join(lines[:1] + [c.split(":", 1)[1].strip() for c in context if ":" in c])
    return text if len(text) <= limit else text[:limit - 3] + "..."
