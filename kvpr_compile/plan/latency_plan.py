"""The latency LP's result: the per-layer split of one decode step and its predicted cost
(seconds, bytes). Kept apart from the LP so that reading a plan never imports mip."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import cost_model as cm


@dataclass
class Plan:
    """Per-layer split chosen by `latency_lp.plan_split` and its predicted cost."""

    ratios: list[float]                 # l_i / s
    recompute_tokens: list[int]         # l_i
    resident_tokens: list[int]          # r_i (a GPU-resident prefix)
    predicted_step_s: float             # cost model at the integer plan
    baseline_step_s: float              # same model, ratio 0, nothing resident (full-KV prefetch)
    profile_name: str
    profile_source: str = ""
    h2d_bytes_per_s: float = 0.0
    d2h_bytes_per_s: float = 0.0
    layer_times_s: list[float] = field(default_factory=list)
    baseline_layer_times_s: list[float] = field(default_factory=list)
    tail_s: float = 0.0                 # after the last attention (the last append)
    h2d_bytes: list[int] = field(default_factory=list)
    d2h_bytes: list[int] = field(default_factory=list)
    baseline_h2d_bytes: int = 0         # per layer
    link_limit_s: float = 0.0           # plan's bytes over bandwidth
    baseline_link_limit_s: float = 0.0  # full K,V bytes over bandwidth
    lp_objective_s: float = 0.0         # LP optimum (continuous l, r)
    solve_s: float = 0.0                # wall time of build + solve
    num_layers: int = 0
    batch_size: int = 0
    seq_len: int = 0
    hidden_size: int = 0
    kv_hidden_size: int = 0
    dtype: str = ""
    gpu_budget_bytes: float | None = None
    working_set_bytes: int = 0
    overlap: str = cm.DEFAULT_OVERLAP
    coefficients: cm.LayerCoefficients | None = None
    cpu_tokens: list[int] = field(default_factory=list)   # u_i, attended on the host
    cpu_ratios: list[float] = field(default_factory=list)  # u_i / s
    cpu_attention_bytes_per_s: float | None = None        # the host rate planned with
    cpu_round_trip_s: float | None = None                 # the round trip planned with
    cpu_note: str = ""                                    # why no share, or what was assumed

    @property
    def speedup(self) -> float:
        return self.baseline_step_s / self.predicted_step_s

    def __str__(self) -> str:
        ratios = self.ratios or [0.0]
        resident = (f", {sum(self.resident_tokens)} tokens resident"
                    if any(self.resident_tokens) else "")
        if any(self.cpu_tokens):
            resident += (f", CPU share {min(self.cpu_ratios):.3f}..{max(self.cpu_ratios):.3f}"
                         f" attended on the host")
        return (f"plan [{self.profile_name}, {self.overlap} overlap, b={self.batch_size}, "
                f"s={self.seq_len}, h={self.hidden_size}, h_kv={self.kv_hidden_size}, "
                f"{self.dtype}]: recompute ratio {min(ratios):.3f}..{max(ratios):.3f} over "
                f"{self.num_layers} layers{resident}; predicted {self.predicted_step_s * 1e3:.2f} "
                f"ms/step vs full-KV prefetch {self.baseline_step_s * 1e3:.2f} ms "
                f"({self.speedup:.2f}x)")

    def to_dict(self) -> dict:
        return asdict(self)
