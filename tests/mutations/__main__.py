"""Run the mutation check: ``python -m tests.mutations [-k NAME] [--list] [--keep]``.

1. Copies the working tree (tracked and untracked, not ignored files: ``git ls-files``) into a
   temporary directory; the working tree itself is never modified.
2. Checks that every selected breakage's snippet occurs exactly once in its file; one that does
   not is reported by name (the catalog must be kept current as the code moves).
3. Runs the union of the selected tests on the unbroken copy (the baseline): they must pass,
   or a "caught" would mean nothing.
4. For each breakage alone: patches a copy, runs its tests with ``PYTHONPATH`` pointing at that
   copy, restores the file (``-j N``: N breakages at once, each in its own copy). Caught = pytest
   reports failed tests (exit code 1); a collection or usage error, or a timeout, is reported as
   such and counts as not caught.

Prints a table ``breakage | caught? | seconds | failed tests``; exits non-zero if any breakage
survives, errs, or no longer applies.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .catalog import BREAKAGES, Breakage

ROOT = Path(__file__).resolve().parents[2]


def scratch_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def problem(copy: Path, b: Breakage) -> str | None:
    """Why ``b`` cannot be applied to ``copy``, or None."""
    path = copy / b.path
    if not path.is_file():
        return f"file {b.path} not found"
    count = path.read_text().count(b.old)
    if count != 1:
        found = "not found" if count == 0 else f"found {count} times"
        return f"snippet {found} in {b.path}: {b.old!r}"
    return None


def run_pytest(copy: Path, tests, timeout: float) -> tuple[str, float, list[str]]:
    """(outcome, seconds, failed test ids); outcome: passed | failed | error (rc N) | timeout."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "--no-header",
           *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, []
    seconds = time.perf_counter() - start
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)
    outcome = {0: "passed", 1: "failed"}.get(proc.returncode, f"error (rc {proc.returncode})")
    if outcome.startswith("error"):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        print(f"    pytest {outcome}:\n{tail}", file=sys.stderr)
    return outcome, seconds, failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutations",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="select", action="append", default=[], metavar="NAME",
                        help="only breakages whose name contains NAME (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the breakages and their tests")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run of the selected tests on the unbroken copy")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (600)")
    parser.add_argument("-j", "--jobs", type=int, default=1,
                        help="breakages run at once, each in its own scratch copy (1)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch copies and print their paths")
    args = parser.parse_args(argv)

    chosen = [b for b in BREAKAGES if not args.select or any(s in b.name for s in args.select)]
    if not chosen:
        parser.error(f"no breakage matches {args.select}")
    if args.list:
        for b in chosen:
            print(f"{b.name}: {b.path}: {b.what or b.old!r}")
            for t in b.tests:
                print(f"    {t}")
        return 0

    copies = [Path(tempfile.mkdtemp(prefix="kvpr-mutations-")) for _ in range(max(1, args.jobs))]
    try:
        for copy in copies:
            scratch_copy(copy)
        copy = copies[0]
        problems = {b.name: problem(copy, b) for b in chosen}
        for name, why in problems.items():
            if why:
                print(f"NOT APPLIED {name}: {why}", file=sys.stderr)
        runnable = [b for b in chosen if not problems[b.name]]
        if runnable and not args.no_baseline:
            union = list(dict.fromkeys(t for b in runnable for t in b.tests))
            print(f"baseline: {len(union)} test selections on the unbroken copy ...", flush=True)
            outcome, seconds, failed = run_pytest(copy, union, args.timeout * 2)
            print(f"baseline: {outcome} in {seconds:.0f} s", flush=True)
            if outcome != "passed":
                print(f"the selected tests do not pass unbroken ({', '.join(failed) or outcome}): "
                      "fix them before reading any result", file=sys.stderr)
                return 2
        free = list(copies)

        def attempt(b: Breakage):
            copy = free.pop()
            path = copy / b.path
            original = path.read_text()
            path.write_text(original.replace(b.old, b.new))
            try:
                outcome, seconds, failed = run_pytest(copy, b.tests, args.timeout)
            finally:
                path.write_text(original)
                free.append(copy)
            verdict = {"failed": "yes", "passed": "NO (survived)"}.get(outcome, outcome.upper())
            print(f"{b.name}: {verdict} ({seconds:.0f} s)", flush=True)
            return b.name, verdict, seconds, ", ".join(f.split("::", 1)[-1] for f in failed)

        with ThreadPoolExecutor(max_workers=len(copies)) as pool:
            done = dict((row[0], row) for row in pool.map(attempt, runnable))
        rows = [done.get(b.name) or (b.name, "NOT APPLIED", None, problems[b.name]) for b in chosen]
        width = max(len(r[0]) for r in rows)
        print(f"\n| {'breakage':<{width}} | caught? | seconds | failed tests |")
        print(f"|{'-' * (width + 2)}|---------|---------|--------------|")
        for name, verdict, seconds, detail in rows:
            secs = "-" if seconds is None else f"{seconds:.0f}"
            print(f"| {name:<{width}} | {verdict} | {secs} | {detail} |")
        bad = [r[0] for r in rows if r[1] != "yes"]
        missed = f"; not caught: {', '.join(bad)}" if bad else ""
        print(f"\n{len(rows) - len(bad)}/{len(rows)} caught" + missed)
        return 1 if bad else 0
    finally:
        for copy in copies:
            if args.keep:
                print(f"scratch copy kept at {copy}")
            else:
                shutil.rmtree(copy, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
