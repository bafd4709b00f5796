"""The parent side of benchmark protocol 2: one process per contender, two rounds, a deadline.

Round 1 runs the contenders in an order shuffled with a recorded seed, round 2 in the reverse
order, so a contender that gains or loses from its position shows it as a round difference.
Each child is ``python -m kvpr_compile.bench.protocol SPEC OUT`` (protocol.py) under a timeout;
the parent only collects its JSON. Before starting a child the parent checks the deadline against
the slowest child so far: one that cannot finish is recorded absent ("no time left"), so a run cut
short still writes a file. ``in_process=True`` runs the children as function calls (the fast CPU
test); the file then says so.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_CAP_S = 240.0      # one contender's process never runs longer than this


def orders(names, seed: int, rounds: int = 2) -> list[list[str]]:
    """Round 1 shuffled with ``seed``, round 2 reversed (and so on, alternating)."""
    first = list(names)
    random.Random(seed).shuffle(first)
    return [first if i % 2 == 0 else first[::-1] for i in range(rounds)]


def _absent(name: str, reason: str) -> dict:
    return {"contender": name, "status": "absent", "reason": reason}


def run_child(spec: dict, workdir: Path, timeout_s: float, log=None) -> dict:
    """One contender in a fresh interpreter; its JSON, or an error record with stderr's tail."""
    tag = f"{spec['contender']}-r{spec['round']}"
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "kvpr_compile.bench.protocol",
                               str(spec_path), str(out_path)], capture_output=True, text=True,
                              timeout=timeout_s, env=env)
        err, code = proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        code = None
    (workdir / f"{tag}.stderr.txt").write_text(err or "")
    if log is not None:
        log(f"{tag}: exit {code} after {time.perf_counter() - started:.1f} s")
    if code is None:
        return {**_absent(spec["contender"], f"timed out after {timeout_s:.0f} s"),
                "status": "error"}
    if not out_path.is_file():
        tail = "\n".join((err or "").strip().splitlines()[-5:])
        return {"contender": spec["contender"], "status": "error",
                "reason": f"child exited {code} without a result: {tail}"}
    return json.loads(out_path.read_text())


def run_in_process(spec: dict) -> dict:
    import torch

    from .protocol import run_spec
    torch.compiler.reset()
    try:
        return run_spec(spec)
    finally:
        torch.compiler.reset()


def run_rounds(base: dict, names, *, rounds: int, order_seed: int, deadline: float | None,
               workdir: Path | None = None, in_process: bool = False, log=None) -> dict:
    """{"orders": [[name...] per round], "results": {name: [child result per round]},
    "in_process": bool}. ``deadline``: a ``time.monotonic()`` value, or None."""
    plan = orders(names, order_seed, rounds)
    results: dict[str, list[dict]] = {n: [] for n in names}
    slowest = 0.0
    tmp = None
    if workdir is None and not in_process:
        tmp = tempfile.TemporaryDirectory(prefix="kvpr-bench-")
        workdir = Path(tmp.name)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        for r, order in enumerate(plan, start=1):
            for position, name in enumerate(order, start=1):
                spec = {**base, "contender": name, "round": r, "order": position}
                started = time.monotonic()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left < max(10.0, 1.2 * slowest):
                    res = _absent(name, f"no time left ({left:.0f} s) for round {r}")
                elif in_process:
                    res = run_in_process(spec)
                else:
                    cap = CHILD_CAP_S if left is None else min(CHILD_CAP_S, left)
                    res = run_child(spec, workdir, cap, log)
                if res["status"] != "absent":
                    slowest = max(slowest, time.monotonic() - started)
                res.update(round=r, order=position)
                results[name].append(res)
                if log is not None:
                    log(f"round {r} #{position} {name}: {res['status']} {res.get('reason', '')}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"orders": plan, "results": results, "in_process": in_process}
