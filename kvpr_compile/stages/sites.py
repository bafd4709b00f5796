"""Stage ``find``: the attention sites whose K,V come from an offloaded-cache read."""
from __future__ import annotations

from .. import report as rep
from ..passes.find_sites import find_sites
from .compilation import Compilation


def find(c: Compilation) -> None:
    c.scan = find_sites(c.graph)
    c.report.skipped.extend(c.scan.skipped)
    if not c.scan.sites:
        rep.nothing_to_rewrite(c.report, attention_seen=bool(c.scan.skipped))
