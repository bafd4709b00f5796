"""Hardware profiles: presets, JSON, flops fallback, cache, resolve_profile, measure()."""
from __future__ import annotations

import json

import pytest
import torch

from kvpr_compile.plan import measure, profile, resolve
from kvpr_compile.plan.presets import PRESETS
from kvpr_compile.plan.profile import HardwareProfile
from kvpr_compile.plan.resolve import resolve_profile

pytestmark = pytest.mark.quick

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.delenv("KVPR_PROFILE", raising=False)
    monkeypatch.setenv("KVPR_CACHE_DIR", str(tmp_path / "cache"))


def _profile(**overrides) -> HardwareProfile:
    fields = dict(name="test", device_name="Test GPU", h2d_bytes_per_s=10e9, d2h_bytes_per_s=9e9,
                  flops_per_s={"float16": 100e12}, torch_version="x", date="2026-01-01",
                  source="measured")
    fields.update(overrides)
    return HardwareProfile(**fields)


def test_presets_exist_with_cited_realistic_numbers():
    assert set(PRESETS) == {"a100-pcie4", "h100-pcie5", "h200-pcie5"}
    for name, p in PRESETS.items():
        assert p.name == name and p.source.startswith("preset: ")
        assert set(p.flops_per_s) == {"float16", "bfloat16", "float32"}
        assert 10e9 < p.h2d_bytes_per_s < 64e9   # below PCIe 5.0 x16's 63 GB/s theoretical
        assert p.flops(torch.float32) < p.flops(torch.float16)
    assert PRESETS["a100-pcie4"].h2d_bytes_per_s < 31.5e9          # PCIe 4.0 theoretical
    assert PRESETS["a100-pcie4"].flops(torch.float16) < 312e12      # datasheet peak
    h200 = PRESETS["h200-pcie5"]
    assert h200.h2d_bytes_per_s == 55e9   # the project measurement in docs/design.md
    assert 600e12 <= h200.flops(torch.float16) <= 700e12
    assert "measured on an H200" in h200.source
    for p in PRESETS.values():
        assert "datasheet" in p.source and "estimate" in p.source


def test_json_round_trip_and_file_save(tmp_path):
    p = PRESETS["a100-pcie4"]
    again = HardwareProfile.from_json(p.to_json())
    assert again == p and again is not p
    path = tmp_path / "p.json"
    p.save(path)
    assert HardwareProfile.load(path) == p
    assert json.loads(path.read_text())["h2d_bytes_per_s"] == 25e9


def test_from_json_rejects_bad_input():
    with pytest.raises(ValueError, match="lacks"):
        HardwareProfile.from_json('{"name": "x"}')
    data = PRESETS["h200-pcie5"].to_dict()
    data["h2d_bytes_per_s"] = -1
    with pytest.raises(ValueError, match="h2d_bytes_per_s"):
        HardwareProfile.from_dict(data)
    data = PRESETS["h200-pcie5"].to_dict()
    data["flops_per_s"] = {"int8": 1e15}
    with pytest.raises(ValueError, match="int8"):
        HardwareProfile.from_dict(data)


def test_flops_fallbacks():
    p = _profile(flops_per_s={"float16": 160e12})
    assert p.flops(torch.float16) == 160e12
    assert p.flops(torch.bfloat16) == 160e12
    assert p.flops(torch.float32) == 160e12 / profile.FP32_FALLBACK_DIVISOR
    assert p.flops("torch.float16") == 160e12
    q = _profile(flops_per_s={"bfloat16": 80e12, "float32": 5e12})
    assert q.flops(torch.float16) == 80e12 and q.flops(torch.float32) == 5e12
    with pytest.raises(ValueError, match="no GEMM rate"):
        _profile(flops_per_s={"float32": 5e12}).flops(torch.float16)
    with pytest.raises(ValueError, match="unsupported dtype"):
        p.flops(torch.int8)


def test_resolve_profile_forms(tmp_path, monkeypatch):
    p = _profile()
    assert resolve_profile(p) is p
    a100 = resolve_profile("a100-pcie4")
    assert a100 == PRESETS["a100-pcie4"]
    a100.flops_per_s["float16"] = 1.0          # a copy: the preset itself is untouched
    assert PRESETS["a100-pcie4"].flops_per_s["float16"] == 218e12
    assert resolve_profile("H200-PCIE5").name == "h200-pcie5"

    path = tmp_path / "mine.json"
    p.save(path)
    from_file = resolve_profile(str(path))
    assert from_file.h2d_bytes_per_s == 10e9 and from_file.source == f"file: {path}"
    assert "measured" in from_file.notes

    monkeypatch.setenv("KVPR_PROFILE", str(path))
    assert resolve_profile().source == f"file: {path}"
    monkeypatch.setenv("KVPR_PROFILE", "h100-pcie5")
    assert resolve_profile(device="cpu").name == "h100-pcie5"
    assert resolve_profile("a100-pcie4").name == "a100-pcie4"   # an explicit spec wins


def test_resolve_profile_default_off_cuda_is_h200_preset():
    prof = resolve_profile(None, device="cpu")
    assert prof.name == "h200-pcie5" and prof.source.startswith("preset: ")
    if not HAS_CUDA:
        assert resolve_profile().name == "h200-pcie5"


def test_resolve_profile_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="a100-pcie4, h100-pcie5, h200-pcie5"):
        resolve_profile("rtx-9090")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_profile(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid profile"):
        resolve_profile(str(bad))
    monkeypatch.setenv("KVPR_PROFILE", "nope")
    with pytest.raises(ValueError, match="unknown hardware profile 'nope'"):
        resolve_profile()


def test_cache_dir_precedence(monkeypatch, tmp_path):
    assert resolve.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("KVPR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve.cache_dir() == tmp_path / "xdg" / "kvpr_compile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve.cache_dir() == tmp_path / "home" / ".cache" / "kvpr_compile"


def test_load_or_measure_caches_per_device(monkeypatch):
    calls = []

    def fake_measure(device):
        calls.append(device)
        return _profile(name=f"run{len(calls)}", device_name="Fake GPU/80GB")

    monkeypatch.setattr(resolve, "measure", fake_measure)
    monkeypatch.setattr(resolve, "_device_name", lambda device: "Fake GPU/80GB")
    first = resolve.load_or_measure("cuda")
    assert calls == ["cuda"] and first.name == "run1"
    path = resolve.cache_path("Fake GPU/80GB")
    assert path.is_file() and path.parent == resolve.cache_dir() and "/" not in path.name[8:]
    second = resolve.load_or_measure("cuda")
    assert calls == ["cuda"] and second.name == "run1" and "cached at" in second.notes
    third = resolve.load_or_measure("cuda", refresh=True)
    assert len(calls) == 2 and third.name == "run2"
    path.write_text("garbage")                    # an unreadable cache is measured again
    assert resolve.load_or_measure("cuda").name == "run3"


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA error path")
def test_measure_raises_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        measure.measure()
    with pytest.raises(RuntimeError, match="preset"):
        measure.measure("cpu")
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_profile(None, device="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_profile("measure")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_measure_on_cuda():
    p = measure.measure(repeats=3, warmup=1, sizes=(64 << 20,), gemm_shape=(4096, 4096, 4096))
    assert p.source == "measured" and p.torch_version == torch.__version__
    assert 1e9 < p.h2d_bytes_per_s < 200e9 and 1e9 < p.d2h_bytes_per_s < 200e9
    assert 1e12 < p.flops(torch.float16) < 5e15
    assert 50e9 < p.mem_copy_bytes_per_s < 20e12 and 50e9 < p.mem_read_bytes_per_s < 20e12
    assert "not in the profile" not in p.notes                      # measured, not filled in
    assert HardwareProfile.from_json(p.to_json()) == p


def test_presets_carry_device_memory_rates_calibrated_on_the_h100():
    h100, h200, a100 = (PRESETS[n] for n in ("h100-pcie5", "h200-pcie5", "a100-pcie4"))
    assert h100.mem_copy_bytes_per_s == 700e9                       # the H100 trace's assemble
    assert h200.mem_copy_bytes_per_s == pytest.approx(700e9 * 4.8 / 3.35)   # HBM ratio
    for p in PRESETS.values():
        assert p.mem_copy_bytes_per_s < p.mem_read_bytes_per_s < 5e12
    assert a100.mem_read_bytes_per_s < h100.mem_read_bytes_per_s < h200.mem_read_bytes_per_s
    assert "copy 700" in h100.summary()


def test_old_profile_json_without_memory_rates_still_loads(tmp_path, monkeypatch):
    """A profile cached before the device-memory rates existed: they come from the preset of
    the same GPU model (or the A100 preset for an unknown GPU), and the notes say so."""
    old = dict(name="nvidia-h100-80gb-hbm3", device_name="NVIDIA H100 80GB HBM3",
               h2d_bytes_per_s=10e9, d2h_bytes_per_s=9e9, flops_per_s={"float16": 100e12},
               torch_version="2.11", date="2026-11-26", source="measured", notes="")
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = resolve_profile(str(path))
    assert loaded.mem_copy_bytes_per_s == PRESETS["h100-pcie5"].mem_copy_bytes_per_s
    assert loaded.mem_read_bytes_per_s == PRESETS["h100-pcie5"].mem_read_bytes_per_s
    assert "preset h100-pcie5" in loaded.notes and loaded.h2d_bytes_per_s == 10e9
    # through the per-device cache too
    monkeypatch.setattr(resolve, "_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(resolve, "measure", lambda device: pytest.fail("cache not used"))
    cached = resolve.cache_path("NVIDIA H100 80GB HBM3")
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps(old))
    assert resolve.load_or_measure("cuda").mem_copy_bytes_per_s == 700e9
    unknown = {**old, "name": "rtx", "device_name": "Some Other GPU"}
    fallback = HardwareProfile.from_dict(unknown)
    assert fallback.mem_copy_bytes_per_s == PRESETS["a100-pcie4"].mem_copy_bytes_per_s
    # a rate given is kept; only the missing one is filled
    half = HardwareProfile.from_dict({**old, "mem_copy_bytes_per_s": 123e9})
    assert half.mem_copy_bytes_per_s == 123e9
    assert half.mem_read_bytes_per_s == PRESETS["h100-pcie5"].mem_read_bytes_per_s
    with pytest.raises(ValueError, match="mem_copy_bytes_per_s"):
        HardwareProfile.from_dict({**old, "mem_copy_bytes_per_s": 0})
