"""The throughput plan as text for `kvpr plan --schedule throughput`: micro-batches, per-layer
split and bytes, predicted tokens/s against the same schedule at ratio 0 and the link limit."""
from __future__ import annotations

MB, MS = 1e6, 1e3


def format_throughput(plan, shape) -> str:
    """``shape``: the plan's `throughput_graph.StepShape` (for bytes per layer)."""
    from . import throughput_graph as tg
    from .micro_batch_words import in_words
    header = (f"{'layer':>5} {'ratio':>6} {'recompute':>9} {'H2D MB':>8} {'of which W':>10} "
              f"{'link ms':>8}")
    lines = [header, "-" * len(header)]
    spec = tg.tasks(shape)
    for j, l in enumerate(plan.recompute_tokens):
        link_s = sum(c + per_token * l for (res, c, per_token, layer) in spec.values()
                     if res == "link" and layer == j)
        h2d = shape.layer_weight_bytes + sum(
            b * (l * shape.hidden + 2 * (shape.seq_len - l) * shape.kv_hidden)
            * shape.bytes_per_element
            for b in shape.micro_batches)
        lines.append(f"{j:>5} {plan.ratios[j]:>6.3f} {l:>9} {h2d / MB:>8.1f} "
                     f"{shape.layer_weight_bytes / MB:>10.1f} {link_s * MS:>8.3f}")
    lines += [
        "-" * len(header),
        f"{in_words(plan.micro_batches)} (effective batch {plan.effective_batch}); device "
        f"working set {plan.working_set_bytes / 1e9:.2f} GB"
        + ("" if plan.gpu_budget_bytes is None else f" of {plan.gpu_budget_bytes / 1e9:.2f} GB"),
        f"predicted {plan.tokens_per_s:.1f} tokens/s ({plan.predicted_step_s * MS:.2f} ms/step) vs "
        f"{plan.baseline_tokens_per_s:.1f} tokens/s at ratio 0, weights and full K,V streamed, "
        f"pinned ({plan.speedup:.2f}x)",
        f"link limit: {plan.link_limit_s * MS:.2f} ms/step for this plan's bytes "
        f"({plan.predicted_step_s / plan.link_limit_s:.2f}x of it), "
        f"{plan.baseline_link_limit_s * MS:.2f} ms at ratio 0",
        "splits tried: " + ", ".join(
            f"m={c['micro_batches']} "
            + (f"{c['step_s'] * MS:.2f} ms" if c["fits"] else "does not fit")
            for c in plan.candidates),
    ]
    return "\n".join(lines)
