"""What the backend's stages share about one graph: ``Compilation``, made by ``start``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import fx

from .. import dynamo_watch
from .. import report as rep
from ..inner import default_inner
from ..options import Options


@dataclass
class Compilation:
    """One graph on its way through the stages (stages/__init__.py). Each stage reads what the
    earlier ones left here and adds its own part; ``compiled`` set ends the compilation."""

    gm: fx.GraphModule
    example_inputs: list
    options: Options               # checked, ``inner`` filled in
    report: rep.Report             # what the backend did to this graph (report.py)
    scan: object = None            # find: the attention sites (passes/find_sites.SiteScan)
    slices: dict = field(default_factory=dict)   # extract: cache_update node -> RecomputeSlice
    rows: object = None            # batch_rows: the batch roles when the column order can run
    budget: object = None          # batch_rows: the throughput budget check, or None
    ratios: dict = field(default_factory=dict)   # plan: layer -> requested split ratio
    resident: dict = field(default_factory=dict)  # plan: layer -> (share, cap, of_rest)
    compiled: object = None        # columns or lower: the callable Dynamo gets back

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph


def start(gm: fx.GraphModule, example_inputs, options, mode=None) -> Compilation:
    """The options checked (ValueError before anything else), ``inner`` chosen by device when
    not given, a CUDA-graph ``mode`` warned about, and an empty report for this graph."""
    options = Options.parse(options)
    dynamo_watch.install()   # a function Dynamo gives up on is reported, not silently slow
    if options.inner is None:
        options = dataclasses.replace(options, inner=default_inner(example_inputs))
    if mode in ("reduce-overhead", "max-autotune"):
        rep.cuda_graph_mode_ignored(mode)
    report = rep.Report(rep.next_graph_index(), options.inner, graph_module=gm)
    return Compilation(gm, example_inputs, options, report)
