"""Hardware profile: the rates the KVPR cost model needs, and where they come from.

Owns `HardwareProfile` (host<->device bandwidth, GEMM rate per dtype and two device-memory
rates: strided copies and streaming reads), `measure()` (CUDA only: pinned copies, device copies
and GEMMs timed with CUDA events), the cited `PRESETS`, the per-device JSON cache
(`load_or_measure`) and `resolve_profile`, which turns whatever a user passed (a profile, a preset
name, a JSON path, "measure", or nothing) into a profile. Profiles saved before the device-memory
rates existed still load: the missing rates come from the preset of the same device
(`memory_rates_for`).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

MiB = 1 << 20
DTYPE_KEYS = ("float16", "bfloat16", "float32")
# Without TF32 (torch's default for fp32 matmul) an fp32 GEMM runs on the CUDA cores, about 1/16 of
# the dense fp16 tensor-core rate on A100 (19.5 vs 312 TFLOP/s) and H100 (67 vs 989).
FP32_FALLBACK_DIVISOR = 16.0
ENV_PROFILE = "KVPR_PROFILE"
ENV_CACHE_DIR = "KVPR_CACHE_DIR"
MEASURE_SPEC = "measure"


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
                f"read {self.mem_read_bytes_per_s / 1e9:.0f}")

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


def dtype_key(dtype: torch.dtype | str) -> str:
    """'float16' | 'bfloat16' | 'float32' for a torch dtype or its name ('torch.float16' too)."""
    name = str(dtype).removeprefix("torch.")
    name = {"half": "float16", "fp16": "float16", "bf16": "bfloat16",
            "float": "float32", "fp32": "float32"}.get(name, name)
    if name not in DTYPE_KEYS:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {DTYPE_KEYS}")
    return name


# --------------------------------------------------------------------------------------------
# Presets. Datasheet figures are peak numbers; "achievable" figures are estimates unless a
# project measurement is named.
# --------------------------------------------------------------------------------------------
# Device-memory rates (bytes read + written per second). Calibrated on the H100 run
# (benchmarks/results/2026-11-26-h100.md, NVIDIA H100 80GB HBM3, torch 2.11, fp16, llama-7b
# shape, b=16, s~1024): copy 700 GB/s is the assemble's strided concatenation (0.8 ms/layer for
# 539 MB) and the recompute's elementwise kernels (~0.75 ms/layer for 522 MB); read 1.6 TB/s is
# the eager layer with a plain DynamicCache (6.1 ms for 8 layers, each reading 404 MB of weights
# and 269 MB of K,V and concatenating 539 MB), i.e. an effective rate with the launch gaps and
# small kernels included, not HBM's 3.35 TB/s peak. H200 and A100: the H100 figures scaled by
# the datasheet HBM bandwidth (H200 4.8 TB/s, A100 80GB PCIe 1.94 TB/s, H100 SXM5 3.35 TB/s);
# estimates, not measurements.
H100_MEM_COPY_BYTES_PER_S = 700e9
H100_MEM_READ_BYTES_PER_S = 1.6e12
H100_HBM_TB_S = 3.35


def _hbm_scaled(hbm_tb_s: float) -> tuple[float, float]:
    scale = hbm_tb_s / H100_HBM_TB_S
    return H100_MEM_COPY_BYTES_PER_S * scale, H100_MEM_READ_BYTES_PER_S * scale


def _preset(name: str, device_name: str, link: float, fp16: float, fp32: float, source: str,
            memory: tuple[float, float], torch_version: str = "n/a (preset)") -> HardwareProfile:
    """A preset with the same rate both ways on the link and bf16 = fp16; memory = (copy, read)."""
    return HardwareProfile(name=name, device_name=device_name, h2d_bytes_per_s=link,
                           d2h_bytes_per_s=link,
                           flops_per_s={"float16": fp16, "bfloat16": fp16, "float32": fp32},
                           torch_version=torch_version, date="2026-11-26", source=source,
                           mem_copy_bytes_per_s=memory[0], mem_read_bytes_per_s=memory[1])


PRESETS: dict[str, HardwareProfile] = {p.name: p for p in (
    _preset("a100-pcie4", "NVIDIA A100 80GB on PCIe 4.0 x16", 25e9, 218e12, 17.5e12,
            "preset: PCIe 4.0 x16 is 31.5 GB/s per direction theoretical (PCI-SIG spec: 16 "
            "GT/s, 128b/130b); 25 GB/s pinned H2D/D2H is an estimate of the achievable rate "
            "(~80%), not measured by this project. A100 dense fp16/bf16 tensor 312 TFLOP/s and "
            "fp32 19.5 TFLOP/s are NVIDIA datasheet peaks; 218 (70%) and 17.5 (90%) TFLOP/s "
            "are estimates of achievable GEMM rates. Device memory: the H100 figures scaled "
            "by HBM bandwidth 1.94/3.35 (estimate).", _hbm_scaled(1.94)),
    _preset("h100-pcie5", "NVIDIA H100 SXM5 80GB with a PCIe 5.0 x16 host link", 52e9, 660e12,
            60e12,
            "preset: PCIe 5.0 x16 is 63 GB/s per direction theoretical (PCI-SIG spec: 32 GT/s, "
            "128b/130b); 52 GB/s pinned H2D/D2H is an estimate (~83%; this project measured 55 "
            "GB/s H2D on an H200 over Gen5), not an H100 measurement. H100 SXM5 dense "
            "fp16/bf16 tensor 989 TFLOP/s and fp32 67 TFLOP/s are NVIDIA datasheet peaks; 660 "
            "(~67%) and 60 (90%) TFLOP/s are estimates of achievable GEMM rates. Device memory: "
            "700 GB/s for strided copies and 1.6 TB/s effective reads, both derived from this "
            "project's profile of an H100 80GB HBM3 (benchmarks/results/2026-11-26-h100.md).",
            _hbm_scaled(H100_HBM_TB_S)),
    _preset("h200-pcie5", "NVIDIA H200 with a PCIe 5.0 x16 host link", 55e9, 650e12, 60e12,
            "preset: measured on an H200 by the kvpr_compile project (docs/design.md): 55 GB/s "
            "pinned H2D and fp16 GEMM at 600-700 TFLOP/s (650 used). D2H is assumed equal to "
            "H2D and bf16 equal to fp16 (not measured); fp32 60 TFLOP/s is an estimate (90% of "
            "the 67 TFLOP/s datasheet fp32 peak). Device memory: the H100 measurements scaled "
            "by HBM bandwidth 4.8/3.35 (estimate).", _hbm_scaled(4.8),
            torch_version="2.11 (lent H200 image)"),
)}
DEFAULT_PRESET = "h200-pcie5"
# A profile lacking the device-memory rates whose device matches no preset gets the slowest
# preset's (A100): with slower device memory the planner recomputes less.
MEMORY_FALLBACK_PRESET = "a100-pcie4"


def memory_rates_for(name: str, device_name: str) -> tuple[str, float, float]:
    """(where from, copy, read) device-memory rates for a profile that lacks them: the preset
    named `name`, else the preset whose GPU model (A100/H100/H200) appears in `device_name`,
    else MEMORY_FALLBACK_PRESET."""
    key = str(name).lower()
    if key not in PRESETS:
        device = str(device_name).upper()
        key = next((k for k in PRESETS if k.split("-")[0].upper() in device),
                   MEMORY_FALLBACK_PRESET)
    chosen = PRESETS[key]
    return f"preset {key}", chosen.mem_copy_bytes_per_s, chosen.mem_read_bytes_per_s


def preset(name: str) -> HardwareProfile:
    """A copy of PRESETS[name] (so callers may edit it); ValueError listing presets if unknown."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None
    return dataclasses.replace(base, flops_per_s=dict(base.flops_per_s))


# --------------------------------------------------------------------------------------------
# Measurement (CUDA only)
# --------------------------------------------------------------------------------------------
def _cuda_device(device: str | torch.device | int) -> torch.device:
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise RuntimeError(f"measure() times PCIe copies and GEMMs on a CUDA device; got {dev}. "
                           f"Use a preset instead: {', '.join(PRESETS)}")
    if not torch.cuda.is_available():
        raise RuntimeError("measure() needs a CUDA device and torch.cuda.is_available() is False; "
                           f"nothing was measured. Use a preset instead: {', '.join(PRESETS)}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _time_ms(fn, repeats: int, warmup: int, stream: torch.cuda.Stream) -> float:
    """Median CUDA-event time of `fn()` in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _copy_rates(dev: torch.device, size: int, repeats: int, warmup: int) -> tuple[float, float]:
    """(H2D, D2H) bytes/s for one pinned-host <-> device copy of `size` random bytes."""
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    host.random_(0, 256)
    gpu = torch.empty(size, dtype=torch.uint8, device=dev)
    stream = torch.cuda.current_stream(dev)
    h2d_ms = _time_ms(lambda: gpu.copy_(host, non_blocking=True), repeats, warmup, stream)
    d2h_ms = _time_ms(lambda: host.copy_(gpu, non_blocking=True), repeats, warmup, stream)
    return size / (h2d_ms / 1e3), size / (d2h_ms / 1e3)


def _memory_rates(dev: torch.device, size: int, repeats: int, warmup: int
                  ) -> tuple[float, float]:
    """(copy, read) device-memory rates in bytes/s. copy: a contiguous (b, h, s, d) fp16 tensor
    written from a permuted view of a sequence-major (s, b, h, d) one, like the assemble's reads
    of slot views (bytes read + written). read: a decode-shaped GEMM, 16 rows times a weight
    matrix of `size` bytes, i.e. how fast the layer's GEMMs stream their weights (bytes read)."""
    b, h, d = 16, 32, 128
    s = max(1, size // (b * h * d * 2))
    src = torch.empty(s, b, h, d, device=dev, dtype=torch.float16).normal_()
    dst = torch.empty(b, h, s, d, device=dev, dtype=torch.float16)
    stream = torch.cuda.current_stream(dev)
    moved = 2 * src.numel() * src.element_size()
    copy_ms = _time_ms(lambda: dst.copy_(src.permute(1, 2, 0, 3)), repeats, warmup, stream)
    del src, dst
    rows, k = 16, 4096
    weight = torch.empty(k, max(1, size // (k * 2)), device=dev, dtype=torch.float16).normal_()
    x = torch.randn(rows, k, device=dev, dtype=torch.float16)
    out = torch.empty(rows, weight.shape[1], device=dev, dtype=torch.float16)
    read_ms = _time_ms(lambda: torch.matmul(x, weight, out=out), repeats, warmup, stream)
    read = weight.numel() * weight.element_size()
    return moved / (copy_ms / 1e3), read / (read_ms / 1e3)


def _gemm_rate(dev: torch.device, dtype: torch.dtype, shape: tuple[int, int, int],
               repeats: int, warmup: int) -> float:
    m, k, n = shape
    a = torch.randn(m, k, device=dev, dtype=dtype)
    b = torch.randn(k, n, device=dev, dtype=dtype)
    out = torch.empty(m, n, device=dev, dtype=dtype)
    stream = torch.cuda.current_stream(dev)
    ms = _time_ms(lambda: torch.matmul(a, b, out=out), repeats, warmup, stream)
    return 2.0 * m * k * n / (ms / 1e3)


def measure(device: str | torch.device | int = "cuda", *, repeats: int = 10, warmup: int = 3,
            sizes: tuple[int, ...] = (64 * MiB, 256 * MiB),
            gemm_shape: tuple[int, int, int] = (16384, 4096, 8192),
            dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32),
            ) -> HardwareProfile:
    """Measure pinned H2D/D2H bandwidth, device-memory copy rates and GEMM rates on a CUDA
    device.

    Copies: random bytes in pinned host memory, each size timed with CUDA events (median of
    `repeats` after `warmup`), the best size taken as the plateau. GEMMs: [m, k] x [k, n] at a
    recompute-like shape ([b*l, h] x [h, 2*h_kv]), one rate per dtype (bf16 skipped where the
    device lacks it; fp32 runs with whatever TF32 setting torch has). Device memory, at the
    largest size: a permuting copy (mem_copy) and a decode-shaped GEMM's weight reads (mem_read;
    the presets' read rates are lower: calibrated on whole layers, launch gaps and small kernels
    included). Raises RuntimeError without
    CUDA: nothing is ever made up.
    """
    dev = _cuda_device(device)
    if repeats < 1 or warmup < 0 or not sizes:
        raise ValueError("measure() needs repeats >= 1, warmup >= 0 and at least one size")
    with torch.cuda.device(dev):
        rates = [_copy_rates(dev, int(size), repeats, warmup) for size in sizes]
        h2d = max(r[0] for r in rates)
        d2h = max(r[1] for r in rates)
        mem_copy, mem_read = _memory_rates(dev, int(max(sizes)), repeats, warmup)
        flops = {}
        for dtype in dtypes:
            if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
                continue
            flops[dtype_key(dtype)] = _gemm_rate(dev, dtype, gemm_shape, repeats, warmup)
        torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name(dev)
    m, k, n = gemm_shape
    return HardwareProfile(
        name=_slug(device_name).lower(),
        device_name=device_name,
        h2d_bytes_per_s=h2d,
        d2h_bytes_per_s=d2h,
        flops_per_s=flops,
        torch_version=torch.__version__,
        date=datetime.date.today().isoformat(),
        source="measured",
        mem_copy_bytes_per_s=mem_copy,
        mem_read_bytes_per_s=mem_read,
        notes=(f"CUDA events, median of {repeats} after {warmup} warm-up; pinned copies of "
               f"{[s // MiB for s in sizes]} MiB (best size kept); device copies of "
               f"{max(sizes) // MiB} MiB (a permuting copy; a 16-row GEMM over that many weight bytes); "
               f"GEMM {m}x{k}x{n}; "
               f"fp32 matmul precision {torch.get_float32_matmul_precision()!r}"),
    )


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "device"


def cache_dir() -> Path:
    """$KVPR_CACHE_DIR, else $XDG_CACHE_HOME/kvpr_compile, else ~/.cache/kvpr_compile."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "kvpr_compile"
    return Path.home() / ".cache" / "kvpr_compile"


def cache_path(device_name: str) -> Path:
    return cache_dir() / f"profile-{_slug(device_name)}.json"


def _device_name(device: str | torch.device | int) -> str:
    return torch.cuda.get_device_name(_cuda_device(device))


def load_or_measure(device: str | torch.device | int = "cuda", refresh: bool = False
                    ) -> HardwareProfile:
    """The cached measured profile of this CUDA device, measuring (and caching) it if there is
    none, if the cached file is unreadable, or if `refresh`."""
    path = cache_path(_device_name(device))
    if not refresh and path.is_file():
        try:
            profile = HardwareProfile.load(path)
        except (OSError, ValueError, TypeError):
            profile = None  # unreadable cache: measure again and overwrite it
        if profile is not None:
            profile.notes = (profile.notes + "; " if profile.notes else "") + f"cached at {path}"
            return profile
    profile = measure(device)
    profile.save(path)
    return profile


# --------------------------------------------------------------------------------------------
# Resolution of user input
# --------------------------------------------------------------------------------------------
def _is_cuda(device) -> bool:
    if device is None:
        return torch.cuda.is_available()
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


def _from_file(path: str | os.PathLike) -> HardwareProfile:
    try:
        profile = HardwareProfile.load(path)
    except FileNotFoundError:
        raise ValueError(f"hardware profile file {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"hardware profile file {str(path)!r} is not a valid profile: "
                         f"{exc}") from None
    original = profile.source
    profile.source = f"file: {path}"
    profile.notes = f"original source: {original}" + (f"; {profile.notes}" if profile.notes else "")
    return profile


def resolve_profile(spec: HardwareProfile | str | os.PathLike | None = None,
                    device: str | torch.device | int | None = None) -> HardwareProfile:
    """Turn `spec` into a HardwareProfile.

    spec: a HardwareProfile (returned as is); a preset name (see PRESETS); a path to a profile
    JSON file; or "measure" (the cached measurement of `device`, see load_or_measure). None means
    $KVPR_PROFILE (same forms), and if that is unset too: the cached measurement on a CUDA
    device, else the "h200-pcie5" preset (its `source` says it is a preset).
    """
    if spec is None:
        spec = os.environ.get(ENV_PROFILE) or None
    if spec is None:
        return load_or_measure(device if device is not None else "cuda") if _is_cuda(device) \
            else preset(DEFAULT_PRESET)
    if isinstance(spec, HardwareProfile):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec).strip()
        if text.lower() in PRESETS:
            return preset(text.lower())
        if text.lower() == MEASURE_SPEC:
            return load_or_measure(device if device is not None else "cuda")
        if os.path.isfile(text) or text.endswith(".json"):
            return _from_file(text)
        raise ValueError(f"unknown hardware profile {text!r}: use a preset "
                         f"({', '.join(PRESETS)}), a JSON file path, or {MEASURE_SPEC!r}")
    raise ValueError(f"a hardware profile spec is a HardwareProfile, a preset name or a path; "
                     f"got {type(spec).__name__}")
