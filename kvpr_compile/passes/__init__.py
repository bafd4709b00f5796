"""FX passes on Dynamo graphs: find attention sites, extract recompute slices, rewrite."""
