"""Which hardware profile to plan with: whatever a user passed, turned into a profile.

``resolve_profile`` takes a profile, a preset name, a JSON path, "measure", or nothing (then
$KVPR_PROFILE, then this CUDA device's measurement, else the default preset). A measurement is
cached per device as JSON (``load_or_measure``, under ``cache_dir()``), so a process measures at
most once per device and cache directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .measure import cuda_device, measure, slug
from .presets import DEFAULT_PRESET, PRESETS, preset
from .profile import HardwareProfile

ENV_PROFILE = "KVPR_PROFILE"
ENV_CACHE_DIR = "KVPR_CACHE_DIR"
MEASURE_SPEC = "measure"


def cache_dir() -> Path:
    """$KVPR_CACHE_DIR, else $XDG_CACHE_HOME/kvpr_compile, else ~/.cache/kvpr_compile."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "kvpr_compile"
    return Path.home() / ".cache" / "kvpr_compile"


def cache_path(device_name: str) -> Path:
    return cache_dir() / f"profile-{slug(device_name)}.json"


def _device_name(device: str | torch.device | int) -> str:
    return torch.cuda.get_device_name(cuda_device(device))


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
