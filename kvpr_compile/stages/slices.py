"""Stage ``extract``: each site's recompute slice (X and the nodes X -> K,V); a site that
cannot be rewritten stays a plain offloaded-cache read, reported."""
from __future__ import annotations

from .. import report as rep
from ..passes.graph_utils import param_derived, to_networkx
from ..ops.errors import Unsupported
from ..passes.recompute_slice import extract_slice
from ..passes.rewrite import check_rewritable
from .compilation import Compilation


def extract(c: Compilation) -> None:
    if not c.scan.sites:
        return
    params, nxg = param_derived(c.graph), to_networkx(c.graph)
    for site in c.scan.sites:
        try:
            check_rewritable(site.cache_node)
            c.slices[site.cache_node] = extract_slice(nxg, site.cache_node, params)
        except Unsupported as err:
            rep.site_left_unchanged(c.report, site.cache_node.name, site.layer, err)
