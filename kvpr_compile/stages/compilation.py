"""What the backend's stages share about one graph: ``Compilation``, made by ``start``; and
``refused_options``, what the backend returns instead when the options are wrong."""
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
    cpu: dict = field(default_factory=dict)       # plan: layer -> share attended on the CPU
    latency_budget: object = None  # plan: the budget the resident rows were placed under
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


def refused_options(error: ValueError):
    """The callable the backend hands Dynamo when ``start`` rejected the options: it raises
    kvpr's ``error`` itself when the compiled function is called (before anything runs), at the
    same call that compiled it. Raised from the backend, Dynamo would wrap it into
    ``BackendCompilerFailed``, whose text leads with torch's and asks for a bug report to
    PyTorch; the message of an option error is kvpr's sentence, first."""
    def kvpr_options_refused(*args, **kwargs):
        raise ValueError(*error.args)
    return kvpr_options_refused
