"""Stage ``rewrite``: each site's cache read replaced by the kvpr steps at its layer's ratio
(passes/rewrite.py), side inputs several layers compute alike stored once
(passes/shared_inputs.py), and one report line per layer."""
from __future__ import annotations

from .. import report as rep
from ..passes.rewrite import rewrite_site
from ..passes.shared_inputs import shared_links
from ..runtime.recompute import ratio_fraction
from .compilation import Compilation


def rewrite(c: Compilation) -> None:
    if not c.slices:
        return
    recomputing = [(node.args[3], sl) for node, sl in c.slices.items()
                   if ratio_fraction(c.ratios[node.args[3]]) > 0]
    links = shared_links(c.graph, recomputing)
    for node, sl in c.slices.items():
        layer = node.args[3]
        effective = rewrite_site(c.graph, node, sl, c.ratios[layer],
                                 owned_loads=c.options.inner == "inductor",
                                 links=links.get(layer, ()))
        c.report.layers.append(rep.layer_entry(layer, sl, effective, c.ratios[layer],
                                               links.get(layer)))


def record(c: Compilation) -> None:
    """Stage ``record``: the report joins ``kvpr_compile.reports()`` (later stages may still
    add to it)."""
    rep.add_report(c.report)
