"""The GPU check's environment record on a machine without nvidia-smi: every field present,
the missing ones with the reason."""
from __future__ import annotations

import json

from benchmarks import gpu_env


def test_env_without_nvidia_smi_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPR_CALL_ID", "call-7")
    monkeypatch.setattr(gpu_env, "nvidia_smi", lambda: {"error": "not run: no nvidia-smi"})
    assert gpu_env.main([str(tmp_path / "env.json")]) == 0
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["call_id"] == "call-7" and env["torch"] and env["transformers"]
    assert env["driver"] == "none (no nvidia-smi)" and env["numa_node"].startswith("unknown")


def test_numa_node_path_from_a_bus_id(monkeypatch):
    seen = []

    def fake_open(path):
        seen.append(path)
        raise FileNotFoundError(2, "No such file", path)
    monkeypatch.setattr("builtins.open", fake_open)
    assert gpu_env.numa_node("00000000:4E:00.0").startswith("unknown (")
    assert seen == ["/sys/bus/pci/devices/0000:4e:00.0/numa_node"]
