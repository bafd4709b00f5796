"""The per-layer table of a latency Plan: split, bytes moved, predicted time, against full-KV
prefetch and the physical limit (bytes over bandwidth). Shared by `kvpr plan` and reports."""
from __future__ import annotations

MB = 1e6
MS = 1e3


def format_layers(plan) -> str:
    """The table; with a host attention rate it has a 'cpu' column (tokens attended on the
    host) after 'resident'."""
    cpu = getattr(plan, "cpu_attention_bytes_per_s", None) is not None
    tokens = plan.cpu_tokens if cpu else []
    cpu_head = f" {'cpu':>6}" if cpu else ""
    header = (f"{'layer':>5} {'ratio':>6} {'recompute':>9} {'resident':>8}{cpu_head} "
              f"{'H2D MB':>8} {'D2H MB':>7} {'link ms':>8} {'predicted ms':>12} {'full-KV ms':>10} "
              f"{'full-KV link ms':>15}")
    lines = [header, "-" * len(header)]
    store_s = plan.coefficients.store_s if plan.coefficients is not None else 0.0
    base_link = plan.baseline_h2d_bytes / plan.h2d_bytes_per_s + store_s
    for i in range(plan.num_layers):
        link = (plan.h2d_bytes[i] / plan.h2d_bytes_per_s + plan.d2h_bytes[i] / plan.d2h_bytes_per_s)
        lines.append(
            f"{i:>5} {plan.ratios[i]:>6.3f} {plan.recompute_tokens[i]:>9} "
            f"{plan.resident_tokens[i]:>8}{f' {tokens[i]:>6}' if cpu else ''} "
            f"{plan.h2d_bytes[i] / MB:>8.1f} "
            f"{plan.d2h_bytes[i] / MB:>7.2f} {link * MS:>8.3f} {plan.layer_times_s[i] * MS:>12.3f} "
            f"{plan.baseline_layer_times_s[i] * MS:>10.3f} {base_link * MS:>15.3f}")
    base_tail = plan.baseline_step_s - sum(plan.baseline_layer_times_s)
    lines.append(f"{'tail':>5} {'':>6} {'':>9} {'':>8}{' ' * len(cpu_head)} {'':>8} {'':>7} "
                 f"{'':>8} {plan.tail_s * MS:>12.3f} {base_tail * MS:>10.3f}")
    lines.append("-" * len(header))
    mean_ratio = sum(plan.ratios) / plan.num_layers
    lines.append(
        f"{'total':>5} {mean_ratio:>6.3f} {sum(plan.recompute_tokens):>9} "
        f"{sum(plan.resident_tokens):>8}{f' {sum(tokens):>6}' if cpu else ''} "
        f"{sum(plan.h2d_bytes) / MB:>8.1f} "
        f"{sum(plan.d2h_bytes) / MB:>7.2f} {plan.link_limit_s * MS:>8.3f} "
        f"{plan.predicted_step_s * MS:>12.3f} {plan.baseline_step_s * MS:>10.3f} "
        f"{plan.baseline_link_limit_s * MS:>15.3f}")
    if any(plan.resident_tokens):
        per_token = plan.coefficients.kv_bytes_per_token if plan.coefficients is not None else 0
        lines += ["", f"resident: {sum(plan.resident_tokens)} tokens of K,V in device memory "
                      f"({sum(plan.resident_tokens) * per_token / MB:.1f} MB; per layer above), "
                      f"not loaded. The runtime keeps them under the same gpu_budget_bytes: the "
                      f"budget less the slots and one assembled K,V, split evenly over the "
                      f"layers (stages/residency.py)"]
    lines += [
        "",
        f"predicted step {plan.predicted_step_s * MS:.3f} ms vs full-KV prefetch "
        f"{plan.baseline_step_s * MS:.3f} ms ({plan.speedup:.2f}x); link limit for full KV "
        f"{plan.baseline_link_limit_s * MS:.3f} ms, for this plan's bytes "
        f"{plan.link_limit_s * MS:.3f} ms",
    ]
    return "\n".join(lines)
