"""The speed targets of protocol 1 (the decode comparison), evaluated per case (a target
that does not apply is left out).

Multi-head attention (MHA), batch * prompt >= 8192 cached tokens:
  ``limit``  kvpr at the scheduler's ratio <= 1.10 x its physical limit
  ``vs_r0``  kvpr at the scheduler's ratio >= 1.8 x faster than kvpr at ratio 0
MHA at batch 16, prompt 1024:
  ``vs_hf``  kvpr at the scheduler's ratio >= 2.2 x faster than HF's offloaded cache
Grouped-query attention (GQA), every case:
  ``vs_r0``  never slower than ratio 0 (the scheduler picks l = 0 there, so the two runs are the
             same program; a 2% margin absorbs run-to-run noise)
  ``vs_hf``  >= 1.2 x faster than HF's offloaded cache
Speed-ups are ratios of median ms per decode step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

MHA_MIN_TOKENS = 8192
LIMIT_FACTOR = 1.10
MHA_VS_R0 = 1.8
MHA_VS_HF = 2.2
MHA_VS_HF_AT = (16, 1024)
GQA_NOISE = 0.02
GQA_VS_R0 = 1.0 - GQA_NOISE
GQA_VS_HF = 1.2
KEYS = ("limit", "vs_r0", "vs_hf")


@dataclass(frozen=True)
class Target:
    key: str                 # one of KEYS
    text: str
    value: float | None      # None: a number it needs is missing (contender skipped or failed)
    op: str                  # "<=" | ">="
    threshold: float

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else num / den


def evaluate(*, mha: bool, batch: int, prompt: int, sched_ms: float | None,
             r0_ms: float | None, hf_ms: float | None, sched_limit_ms: float | None
             ) -> list[Target]:
    """Targets that apply to one case, from median ms/step of the contenders (None if missing)."""
    out: list[Target] = []
    if mha:
        if batch * prompt >= MHA_MIN_TOKENS:
            out.append(Target("limit", "kvpr-sched / its physical limit",
                              _ratio(sched_ms, sched_limit_ms), "<=", LIMIT_FACTOR))
            out.append(Target("vs_r0", "speed-up of kvpr-sched over kvpr-r0",
                              _ratio(r0_ms, sched_ms), ">=", MHA_VS_R0))
        if (batch, prompt) == MHA_VS_HF_AT:
            out.append(Target("vs_hf", "speed-up of kvpr-sched over HF offloaded",
                              _ratio(hf_ms, sched_ms), ">=", MHA_VS_HF))
    else:
        out.append(Target("vs_r0", "speed-up of kvpr-sched over kvpr-r0 (never slower)",
                          _ratio(r0_ms, sched_ms), ">=", GQA_VS_R0))
        out.append(Target("vs_hf", "speed-up of kvpr-sched over HF offloaded",
                          _ratio(hf_ms, sched_ms), ">=", GQA_VS_HF))
    return out
