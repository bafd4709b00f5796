"""The environment of a GPU check, as JSON: ``python -m benchmarks.gpu_env OUT.json``.

Versions (Python, torch, transformers, CUDA, mip), whether ``backend="kvpr"`` resolves by name,
which pinned-cache calls this torch has, and from ``nvidia-smi``: name, driver, memory, SM and
memory clocks (current and max), power draw and limit, PCIe generation and width (current and
max), the bus id and the GPU's NUMA node (``/sys/bus/pci/devices/<bus>/numa_node``). Anything
that cannot be read is recorded as the reason. ``$KVPR_CALL_ID`` tags the call.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

SMI_FIELDS = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm",
              "clocks.mem", "clocks.max.mem", "power.draw", "power.limit",
              "pcie.link.gen.current", "pcie.link.gen.max", "pcie.link.width.current",
              "pcie.link.width.max", "pci.bus_id", "persistence_mode")


def nvidia_smi() -> dict:
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"not run: {exc}"}
    line = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
    if not line:
        return {"error": f"no output (exit {proc.returncode}): {proc.stderr.strip()[:200]}"}
    return dict(zip(SMI_FIELDS, (v.strip() for v in line.split(","))))


def numa_node(bus_id: str | None) -> str:
    if not bus_id:
        return "unknown (no bus id)"
    bus = bus_id.lower()
    bus = bus[4:] if bus.count(":") == 2 and len(bus.split(":")[0]) == 8 else bus
    path = f"/sys/bus/pci/devices/{bus}/numa_node"
    try:
        return open(path).read().strip()
    except OSError as exc:
        return f"unknown ({exc.strerror}: {path})"


def collect() -> dict:
    import torch
    import transformers
    info = {"call_id": os.environ.get("KVPR_CALL_ID"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "cores": os.cpu_count(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "kvpr_by_name": "kvpr" in torch.compiler.list_backends(exclude_tags=()),
            "host_cache_calls": {
                "torch.accelerator.empty_host_cache":
                    hasattr(getattr(torch, "accelerator", None), "empty_host_cache"),
                "torch.cuda.host_memory_stats": hasattr(torch.cuda, "host_memory_stats")}}
    try:
        import mip
        info["mip"] = getattr(mip, "__version__", "importable")
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        info["mip"] = f"not importable: {exc}"
    smi = nvidia_smi()
    info["nvidia_smi"] = smi
    info["driver"] = smi.get("driver_version", "none (no nvidia-smi)")
    info["numa_node"] = numa_node(smi.get("pci.bus_id"))
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = collect()
    text = json.dumps(info, indent=2)
    print(text)
    if argv:
        with open(argv[0], "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
