"""FX passes on Dynamo graphs: find attention sites, extract recompute slices, rewrite."""
from ..ops import library  # noqa: F401  (the passes name kvpr:: ops at import time)
