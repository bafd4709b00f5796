"""The parent side of benchmark protocol 2: one process per contender, two rounds, a deadline.

Round 1 runs the contenders in an order shuffled with a recorded seed, round 2 in the reverse
order, so a contender that gains or loses from its position shows it as a round difference.
Rounds are the outer loop over the cases (round 1 of every case, then round 2), so a run cut
short by its deadline still has one round of each case. Each child is
``python -m kvpr_compile.bench.protocol --wait SPEC OUT`` (protocol.py); the parent only collects
its JSON. With ``prestart`` the next child is started while the current one runs: it imports
torch, transformers and the bench, then waits for a line on stdin before touching the device,
so the interpreter's start-up is off the run's clock but no two contenders ever run together.
Before letting a child go the parent checks the deadline against that contender's time in the
previous round (else the slowest child so far): one that cannot finish is recorded absent ("no
time left"). A CUDA-only contender on a CPU is recorded absent without a process.
``in_process=True`` runs the children as function calls (the quick CPU test); the file then says
so.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .contenders import CUDA_ONLY

CHILD_CAP_S = 240.0      # one contender's process never runs longer than this


def orders(names, seed: int, rounds: int = 2) -> list[list[str]]:
    """Round 1 shuffled with ``seed``, round 2 reversed (and so on, alternating)."""
    first = list(names)
    random.Random(seed).shuffle(first)
    return [first if i % 2 == 0 else first[::-1] for i in range(rounds)]


def process_order(cases: list[dict], names, *, rounds: int, seed: int) -> list[dict]:
    """Every child's spec, in run order: round by round, case by case, the round's order."""
    plan = orders(names, seed, rounds)
    return [{**case, "case": index, "contender": name, "round": r, "order": position}
            for r, order in enumerate(plan, start=1) for index, case in enumerate(cases)
            for position, name in enumerate(order, start=1)]


def _absent(spec: dict, reason: str, status: str = "absent") -> dict:
    return {"contender": spec["contender"], "status": status, "reason": reason}


def _tag(spec: dict) -> str:
    return f"case{spec.get('case', 0)}-{spec['contender']}-r{spec['round']}"


@dataclass
class Child:
    spec: dict
    proc: subprocess.Popen
    out: Path
    err: Path


def start_child(spec: dict, workdir: Path) -> Child:
    """A child that imports and then waits for ``go``."""
    tag = _tag(spec)
    spec_path, out, err = (workdir / f"{tag}.spec.json", workdir / f"{tag}.json",
                           workdir / f"{tag}.stderr.txt")
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, "-m", "kvpr_compile.bench.protocol", "--wait",
                             str(spec_path), str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=err.open("w"),
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), text=True)
    return Child(spec, proc, out, err)


def stop(child: Child) -> None:
    if child.proc.poll() is None:
        child.proc.kill()
        child.proc.wait()


def finish_child(child: Child, timeout_s: float) -> dict:
    """Let ``child`` go and collect its JSON (an error record with stderr's tail otherwise)."""
    try:
        child.proc.stdin.write("go\n")
        child.proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    try:
        code = child.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop(child)
        return _absent(child.spec, f"timed out after {timeout_s:.0f} s", "error")
    if not child.out.is_file():
        tail = " | ".join(child.err.read_text().strip().splitlines()[-5:])
        return _absent(child.spec, f"child exited {code} without a result: {tail}", "error")
    return json.loads(child.out.read_text())


def run_child(spec: dict, workdir: Path, timeout_s: float) -> dict:
    """One contender in a fresh interpreter, started now."""
    workdir.mkdir(parents=True, exist_ok=True)
    return finish_child(start_child(spec, workdir), timeout_s)


def run_in_process(spec: dict) -> dict:
    import torch

    from .protocol import run_spec
    torch.compiler.reset()
    try:
        return run_spec(spec)
    finally:
        torch.compiler.reset()


def run_all(specs: list[dict], *, deadline: float | None, workdir: Path | None,
            in_process: bool = False, prestart: bool = True, log=None, on_result=None
            ) -> list[dict]:
    """Every spec's result, in order; ``deadline`` is a ``time.monotonic()`` value or None;
    ``on_result(results so far)`` after each child (e.g. to save)."""
    if not in_process:
        workdir.mkdir(parents=True, exist_ok=True)
    results, slowest, took = [], 0.0, {}
    pending: Child | None = None
    try:
        for i, spec in enumerate(specs):
            left = None if deadline is None else deadline - time.monotonic()
            started = time.monotonic()
            need = 1.2 * took.get(spec["contender"], slowest)   # its own last time, if known
            if spec.get("device") == "cpu" and spec["contender"] in CUDA_ONLY:
                res = _absent(spec, f"needs CUDA ({CUDA_ONLY[spec['contender']]})")
            elif left is not None and left < max(10.0, need):
                res = _absent(spec, f"no time left ({left:.0f} s) for round {spec['round']}")
                if pending is not None and pending.spec is spec:
                    stop(pending)
                    pending = None
            elif in_process:
                res = run_in_process(spec)
            else:
                if pending is not None and pending.spec is spec:
                    child, pending = pending, None
                else:
                    child = start_child(spec, workdir)
                following = next((s for s in specs[i + 1:] if not (
                    s.get("device") == "cpu" and s["contender"] in CUDA_ONLY)), None)
                if prestart and pending is None and following is not None:
                    pending = start_child(following, workdir)
                cap = CHILD_CAP_S if left is None else min(CHILD_CAP_S, left)
                res = finish_child(child, cap)
            if res["status"] != "absent":
                took[spec["contender"]] = time.monotonic() - started
                slowest = max(slowest, took[spec["contender"]])
            res.update(round=spec["round"], order=spec["order"], case=spec.get("case", 0),
                       parent_s=time.monotonic() - started)
            results.append(res)
            if on_result is not None:
                on_result(list(results))
            if log is not None:
                log(f"case {spec.get('case', 0)} round {spec['round']} #{spec['order']} "
                    f"{spec['contender']}: {res['status']} {res.get('reason', '')} "
                    f"[{res['parent_s']:.1f} s]")
    finally:
        if pending is not None:
            stop(pending)
    return results


def collect(results: list[dict], case: int, names, plan: list[list[str]]) -> dict:
    """One case's share of ``run_all``'s results, as assemble.build_row takes it."""
    mine = {n: [] for n in names}
    for res in results:
        if res.get("case", 0) == case:
            mine[res["contender"]].append(res)
    return {"orders": plan, "results": mine}
