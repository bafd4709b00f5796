"""Where a bench run runs, and what it says when a CUDA-only run finds no CUDA device."""
from __future__ import annotations

NO_CUDA = ("kvpr bench: no CUDA device here (torch.cuda.is_available() is False). The benchmark "
           "times decode steps against the host-to-device link, which a CPU run cannot show.\n"
           "  On any machine, `kvpr demo` shows exactness and the bytes each decode step loads "
           "from the CPU store.\n"
           "  `kvpr bench --cpu-smoke` runs this benchmark's code end to end on toy CPU models "
           "(its timings mean nothing).")


def device_of(args):
    """The device the run asks for: ``--cpu``, ``--device``, else CUDA where there is one."""
    import torch
    if args.cpu:
        return torch.device("cpu")
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
