"""Stage ``rewrite``: each site's cache read replaced by the kvpr steps at its layer's ratio
(passes/rewrite.py), side inputs several layers compute alike stored once
(passes/shared_inputs.py), and one report line per layer (a sliding-window layer's says so)."""
from __future__ import annotations

from .. import report as rep
from ..ops.errors import Unsupported
from ..passes.cpu_attention import plan_split
from ..passes.rewrite import rewrite_site
from ..passes.shared_inputs import shared_links
from ..ops.nodes import args_of
from ..ops.split import ratio_fraction
from ..passes.graph_utils import example_value
from .compilation import Compilation
from .residency import describe


_WINDOW_NOTE = ("sliding window: loads and recomputes only the window's past "
                "[past - window + 1, past), nothing of it resident")


def rewrite(c: Compilation) -> None:
    if not c.slices:
        return
    layer_of = {node: args_of(node).layer for node in c.slices}
    recomputing = [(layer_of[node], sl) for node, sl in c.slices.items()
                   if ratio_fraction(c.ratios[layer_of[node]]) > 0]
    links = shared_links(c.graph, recomputing)
    for node, sl in c.slices.items():
        layer = layer_of[node]
        share, cap, of_rest = c.resident.get(layer, (0.0, -1, False))
        k_new = example_value(args_of(node).k)   # read before the rewrite erases the node
        start = args_of(node).start
        windowed = not (isinstance(start, int) and start == 0)
        split, cpu_words = _cpu_split(node, c.cpu.get(layer, 0.0))
        effective = rewrite_site(c.graph, node, sl, c.ratios[layer],
                                 owned_loads=c.options.inner == "inductor",
                                 links=links.get(layer, ()), resident=share, resident_cap=cap,
                                 ratio_of_rest=of_rest, cpu_split=split)
        entry = rep.layer_entry(layer, sl, effective, c.ratios[layer], links.get(layer))
        entry.note = "; ".join(filter(None, [entry.note, cpu_words]))
        entry.cpu = float(split.frac) if split is not None else 0.0
        if windowed:
            entry.note = "; ".join(filter(None, [entry.note, _WINDOW_NOTE]))
        elif layer in c.resident and c.resident[layer][1] != 0:
            words = describe(c.resident[layer], k_new)
            entry.note = "; ".join(filter(None, [entry.note, words]))
        c.report.layers.append(entry)


def _cpu_split(node, share: float):
    """(the checked split of the layer's attention or None, the report's words about it)."""
    if share <= 0 or (isinstance(args_of(node).pos, int) and args_of(node).pos == 0):
        return None, ""   # nothing asked, or an empty past: nothing for the CPU
    try:
        split = plan_split(node, share)
    except Unsupported as e:
        return None, rep.cpu_share_refused(share, str(e))
    return split, rep.cpu_share_words(share, split.device_fused)


def record(c: Compilation) -> None:
    """Stage ``record``: the report joins ``kvpr_compile.reports()`` (later stages may still
    add to it)."""
    rep.add_report(c.report)
