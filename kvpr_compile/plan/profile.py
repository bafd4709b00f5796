"""HardwareProfile: the rates of one GPU and its host link that the KVPR cost model needs.

Host<->device bandwidth, the GEMM rate per dtype and two device-memory rates (strided copies and
streaming reads), optionally the host's rates for attending on the CPU (bytes of K,V per second
per dtype, the torch thread count measured with, and a small D2H + H2D round trip), with where
they came from (``source``), checked when made, and saved to / loaded from JSON. Where the
numbers come from is elsewhere: presets.py (cited figures), measure.py (this GPU, timed),
host_measure.py (this host, timed), resolve.py (whatever a user passed). A profile saved before
the device-memory rates existed still loads: the missing rates come from device_memory.py. One
without the host rates loads with them None: no CPU share is planned without a rate.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .device_memory import memory_rates_for

DTYPE_KEYS = ("float16", "bfloat16", "float32")
# Without TF32 (torch's default for fp32 matmul) an fp32 GEMM runs on the CUDA cores, about 1/16 of
# the dense fp16 tensor-core rate on A100 (19.5 vs 312 TFLOP/s) and H100 (67 vs 989).
FP32_FALLBACK_DIVISOR = 16.0


@dataclass
class HardwareProfile:
    """Rates of one GPU + host link. Bandwidths in bytes/s, GEMM rates in FLOP/s."""

    name: str
    device_name: str
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    flops_per_s: dict[str, float]
    torch_version: str
    date: str
    source: str  # "measured" | "preset: <cite>" | "file: <path>"
    notes: str = ""
    # Device memory, bytes/s. mem_copy (bytes read + written): strided copies such as the
    # assemble (a permuted (s, b, h, d) view into a contiguous (b, h, s, d) tensor) and the
    # recompute's elementwise passes; mem_read (bytes read): the layer's streaming reads
    # (weights, K,V in attention). None (a profile saved before these existed): filled by
    # `memory_rates_for`.
    mem_copy_bytes_per_s: float | None = None
    mem_read_bytes_per_s: float | None = None
    # The host attending to K,V where they lie (CPU co-attention): bytes of K+V attended per
    # second at decode shapes, per dtype key; the torch thread count that rate was measured with
    # (the CPU worker's); the round trip of a small D2H + H2D with the host waiting for each, in
    # seconds (None where it was not measured, e.g. without CUDA). None: not measured.
    cpu_attention_bytes_per_s: dict[str, float] | None = None
    cpu_attention_threads: int | None = None
    round_trip_s: float | None = None

    def __post_init__(self) -> None:
        if self.mem_copy_bytes_per_s is None or self.mem_read_bytes_per_s is None:
            source, copy, read = memory_rates_for(self.name, self.device_name)
            filled = [what for what, value in (("mem_copy_bytes_per_s", self.mem_copy_bytes_per_s),
                                               ("mem_read_bytes_per_s", self.mem_read_bytes_per_s))
                      if value is None]
            self.mem_copy_bytes_per_s = copy if self.mem_copy_bytes_per_s is None \
                else self.mem_copy_bytes_per_s
            self.mem_read_bytes_per_s = read if self.mem_read_bytes_per_s is None \
                else self.mem_read_bytes_per_s
            note = f"{', '.join(filled)} not in the profile: taken from {source}"
            self.notes = f"{self.notes}; {note}" if self.notes else note
        for what in ("h2d_bytes_per_s", "d2h_bytes_per_s", "mem_copy_bytes_per_s",
                     "mem_read_bytes_per_s"):
            value = getattr(self, what)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{what} must be a positive finite number, got {value!r}")
        if not self.flops_per_s:
            raise ValueError("flops_per_s needs at least one of " + ", ".join(DTYPE_KEYS))
        for key, value in self.flops_per_s.items():
            if key not in DTYPE_KEYS:
                raise ValueError(f"flops_per_s key {key!r} is not one of {DTYPE_KEYS}")
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"flops_per_s[{key!r}] must be positive and finite, got {value!r}")
        self._check_host_rates()

    def _check_host_rates(self) -> None:
        """ValueError naming the field unless the optional host rates are None or sensible."""
        rates = self.cpu_attention_bytes_per_s
        if rates is not None:
            if not isinstance(rates, dict):
                raise ValueError(f"cpu_attention_bytes_per_s is a mapping of dtype to bytes/s "
                                 f"(or None), got {rates!r}")
            for key, value in rates.items():
                if key not in DTYPE_KEYS:
                    raise ValueError(f"cpu_attention_bytes_per_s key {key!r} is not one of "
                                     f"{DTYPE_KEYS}")
                if not _positive(value):
                    raise ValueError(f"cpu_attention_bytes_per_s[{key!r}] must be a positive "
                                     f"finite number of bytes/s, got {value!r}")
        threads = self.cpu_attention_threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise ValueError(f"cpu_attention_threads must be an integer >= 1 (or None), got "
                             f"{threads!r}")
        trip = self.round_trip_s
        if trip is not None and not (_number(trip) and math.isfinite(trip) and trip >= 0):
            raise ValueError(f"round_trip_s must be a finite number of seconds >= 0 (or None), "
                             f"got {trip!r}")

    def cpu_attention_rate(self, dtype: torch.dtype | str) -> float | None:
        """Bytes of K,V the host attends per second in ``dtype``; None where not measured."""
        rates = self.cpu_attention_bytes_per_s or {}
        value = rates.get(dtype_key(dtype))
        return None if value is None else float(value)

    def flops(self, dtype: torch.dtype | str) -> float:
        """GEMM rate for `dtype`; a missing fp16/bf16 entry borrows the other one, a missing fp32
        entry is the half-precision rate / 16 (CUDA cores, no TF32)."""
        key = dtype_key(dtype)
        rates = self.flops_per_s
        if key in rates:
            return float(rates[key])
        half = rates.get("float16", rates.get("bfloat16"))
        if key in ("float16", "bfloat16") and half is not None:
            return float(half)
        if key == "float32" and half is not None:
            return float(half) / FP32_FALLBACK_DIVISOR
        raise ValueError(f"profile {self.name!r} has no GEMM rate usable for {key} "
                         f"(has {sorted(rates)})")

    def summary(self) -> str:
        rates = ", ".join(f"{k} {v / 1e12:.0f}" for k, v in self.flops_per_s.items())
        return (f"{self.name}: H2D {self.h2d_bytes_per_s / 1e9:.1f} GB/s, "
                f"D2H {self.d2h_bytes_per_s / 1e9:.1f} GB/s, GEMM TFLOP/s {rates}, device "
                f"memory GB/s copy {self.mem_copy_bytes_per_s / 1e9:.0f} "
                f"read {self.mem_read_bytes_per_s / 1e9:.0f}{self._host_summary()}")

    def _host_summary(self) -> str:
        if not self.cpu_attention_bytes_per_s:
            return ""
        rates = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in self.cpu_attention_bytes_per_s.items())
        trip = ("not measured" if self.round_trip_s is None
                else f"{self.round_trip_s * 1e6:.0f} us")
        return (f", host attention GB/s {rates} ({self.cpu_attention_threads} threads), "
                f"round trip {trip}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "HardwareProfile":
        if not isinstance(data, dict):
            raise ValueError(f"a hardware profile is a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise ValueError(f"hardware profile JSON lacks {missing}")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["flops_per_s"] = {str(k): float(v) for k, v in dict(kwargs["flops_per_s"]).items()}
        for key in ("mem_copy_bytes_per_s", "mem_read_bytes_per_s"):
            if kwargs.get(key) is not None:
                kwargs[key] = float(kwargs[key])
        rates = kwargs.get("cpu_attention_bytes_per_s")
        if isinstance(rates, dict):
            kwargs["cpu_attention_bytes_per_s"] = {str(k): _as_float(v) for k, v in rates.items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "HardwareProfile":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json() + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HardwareProfile":
        return cls.from_json(Path(path).read_text())


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value) -> bool:
    return _number(value) and math.isfinite(value) and value > 0


def _as_float(value):
    """float(value) for a JSON number, the value itself otherwise (then the check names it)."""
    return float(value) if _number(value) else value


def dtype_key(dtype: torch.dtype | str) -> str:
    """'float16' | 'bfloat16' | 'float32' for a torch dtype or its name ('torch.float16' too)."""
    name = str(dtype).removeprefix("torch.")
    name = {"half": "float16", "fp16": "float16", "bf16": "bfloat16",
            "float": "float32", "fp32": "float32"}.get(name, name)
    if name not in DTYPE_KEYS:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {DTYPE_KEYS}")
    return name
