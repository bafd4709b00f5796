"""The protocol-2 results file: its schema, a validator, a never-overwriting writer, and the
assembler that joins one call's parts (case documents, the tests' junit XML, env.json).

    {"protocol": 2, "device", "torch", "transformers", "driver", "h2d_gbps", "d2h_gbps",
     "tests": {"passed", "failed"},
     "rows": [{"model", "attention": "MHA"|"GQA", "layers", "batch", "prompt", "t_star_ms",
               "kv_link_ms", "split": [float],
               "contenders": {NAME: {"median_ms", "p10_ms", "p90_ms", "steps", "repeats",
                                     "host_ms", "order", "token_agreement", "flags": [str]}}}]}

Rows and contenders may carry more keys (rounds, counters, floors, the absent contenders with
their reasons, the withheld headline ratios); the ones above are required. ``host_ms`` and
``token_agreement`` may be null where a contender has none (generate calls sync per step; the
copy pipeline makes no tokens), ``t_star_ms`` where no resident ran. Files are
``<YYYY-MM-DD>-<card>-v2.json``; a name taken in any folder checked gets ``-2``, ``-3``...

    python -m kvpr_compile.bench.schema assemble [PART.json...] [--junit X] [--env E]
        [--throughput T.json] [--host-rates H.json] [--profile P.json]
        -o DIR [--also-check DIR] [--date D] [--tag v2]
    python -m kvpr_compile.bench.schema validate FILE.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from .contenders import ALL_NAMES

PROTOCOL = 2
TOP = {"protocol": int, "device": str, "torch": str, "transformers": str, "driver": str,
       "h2d_gbps": float, "d2h_gbps": float, "tests": dict, "rows": list}
ROW = {"model": str, "attention": str, "layers": int, "batch": int, "prompt": int,
       "t_star_ms": (float, type(None)), "kv_link_ms": float, "split": list, "contenders": dict}
CONTENDER = {"median_ms": float, "p10_ms": float, "p90_ms": float, "steps": int, "repeats": int,
             "host_ms": (float, type(None)), "order": int,
             "token_agreement": (float, type(None)), "flags": list}


def _typed(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def _check(obj: dict, fields: dict, where: str) -> list[str]:
    errors = [f"{where}: missing {k!r}" for k in fields if k not in obj]
    errors += [f"{where}: {k!r} is {type(obj[k]).__name__}" for k, kind in fields.items()
               if k in obj and not _typed(obj[k], kind)]
    return errors


def validate(doc: dict) -> list[str]:
    """Every way ``doc`` departs from the protocol-2 schema (empty: valid)."""
    errors = _check(doc, TOP, "file")
    if doc.get("protocol") != PROTOCOL:
        errors.append(f"file: protocol is {doc.get('protocol')!r}, not {PROTOCOL}")
    tests = doc.get("tests", {})
    if not all(_typed(tests.get(k), int) for k in ("passed", "failed")):
        errors.append("file: tests needs int passed and failed")
    for i, row in enumerate(doc.get("rows", [])):
        where = f"rows[{i}]"
        errors += _check(row, ROW, where)
        if row.get("attention") not in ("MHA", "GQA"):
            errors.append(f"{where}: attention {row.get('attention')!r}")
        if not all(_typed(x, float) for x in row.get("split", [])):
            errors.append(f"{where}: split holds non-numbers")
        for name, c in row.get("contenders", {}).items():
            if name not in ALL_NAMES:
                errors.append(f"{where}: unknown contender {name!r}")
            errors += _check(c, CONTENDER, f"{where}.{name}")
            if not all(isinstance(f, str) for f in c.get("flags", [])):
                errors.append(f"{where}.{name}: flags must be strings")
    return errors


def free_path(date: str, card: str, folders, tag: str = "v2") -> Path:
    """``folders[0]/<date>-<card>-<tag>.json``, or with ``-2``, ``-3``... where any folder in
    ``folders`` already holds that name (a committed file is never overwritten)."""
    folders = [Path(f) for f in folders]
    n = 1
    while True:
        name = f"{date}-{card}-{tag}" + (f"-{n}" if n > 1 else "") + ".json"
        if not any((f / name).exists() for f in folders):
            return folders[0] / name
        n += 1


def write(doc: dict, date: str, folders, tag: str = "v2") -> Path:
    errors = validate(doc)
    if errors:
        raise ValueError("not a protocol-2 document: " + "; ".join(errors[:5]))
    path = free_path(date, card_of(doc["device"]), folders, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def card_of(device: str) -> str:
    from .results import card
    return card(device)


def throughput_rows(doc: dict) -> list[dict]:
    """The rows of a ``kvpr bench --schedule throughput --json`` document, each flagged unless
    it names its micro-batches (a row without them ran the latency schedule)."""
    from .flags import NO_MICRO_BATCHES, micro_batches_named
    from .results import throughput_rows_from
    rows = throughput_rows_from(doc)
    for row in rows:
        row["flags"] = [] if micro_batches_named(row.get("micro_batches")) else [NO_MICRO_BATCHES]
    return rows


def base_document(env: dict, profile: dict) -> dict:
    """The file-level fields when no case document ran (a call of throughput rows only)."""
    return {"protocol": PROTOCOL, "device": env.get("device") or "unknown",
            "torch": env.get("torch", "unknown"),
            "transformers": env.get("transformers", "unknown"),
            "driver": env.get("driver", "unknown"),
            "h2d_gbps": profile["h2d_bytes_per_s"] / 1e9,
            "d2h_gbps": profile["d2h_bytes_per_s"] / 1e9, "tests": {"passed": 0, "failed": 0},
            "rows": [], "call_id": env.get("call_id"), "profile": profile}


def assemble(parts: list[dict], tests: dict, env: dict | None = None, *,
             throughput: list[dict] = (), host_rates: dict | None = None,
             profile: dict | None = None) -> dict:
    """One document from one call's case documents; parts of different calls are refused."""
    if not parts:
        if not (env and profile):
            raise ValueError("no case documents to assemble (and no env + profile to start from)")
        parts = [base_document(env, profile)]
    calls = sorted({str(p.get("call_id")) for p in parts})
    if len(calls) > 1:
        raise ValueError(f"the parts come from different calls ({', '.join(calls)}): a results "
                         "file holds one call")
    doc = {k: v for k, v in parts[0].items() if k != "rows"}
    doc["rows"] = [row for p in parts for row in p.get("rows", [])]
    doc["tests"] = tests
    tput = [row for t in throughput for row in throughput_rows(t)]
    if tput:
        doc["throughput_rows"] = tput
    if host_rates is not None:
        doc["host_rates"] = host_rates
    if env:
        doc["env"] = env
        doc["driver"] = env.get("driver") or doc.get("driver", "unknown")
        if env.get("call_id") and str(env["call_id"]) != calls[0]:
            raise ValueError(f"env.json is from call {env['call_id']}, the cases from {calls[0]}")
    return doc


def main(argv: list[str] | None = None) -> int:
    from .results import test_counts
    parser = argparse.ArgumentParser(prog="python -m kvpr_compile.bench.schema",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    a = sub.add_parser("assemble")
    a.add_argument("parts", nargs="*", help="protocol-2 case documents of this call")
    a.add_argument("--junit", default=None)
    a.add_argument("--env", default=None)
    a.add_argument("--throughput", nargs="*", default=[],
                   help="`kvpr bench --schedule throughput --json` documents")
    a.add_argument("--host-rates", default=None, help="`benchmarks.host_rates --json` file")
    a.add_argument("--profile", default=None,
                   help="the call's profile JSON (file fields when no case document ran)")
    a.add_argument("-o", "--out", required=True)
    a.add_argument("--also-check", nargs="*", default=[])
    a.add_argument("--date", default=datetime.date.today().isoformat())
    a.add_argument("--tag", default="v2")
    v = sub.add_parser("validate")
    v.add_argument("file")
    args = parser.parse_args(argv)
    if args.what == "validate":
        errors = validate(json.loads(Path(args.file).read_text()))
        print("\n".join(errors) or f"{args.file}: a valid protocol-2 file")
        return 1 if errors else 0
    parts = []
    for path in args.parts:
        try:
            parts.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            print(f"schema: skipping {path}: {exc}", file=sys.stderr)
    def load(path):
        return json.loads(Path(path).read_text()) if path and Path(path).is_file() else None
    try:
        doc = assemble(parts, test_counts(Path(args.junit) if args.junit else None),
                       load(args.env), throughput=[d for d in map(load, args.throughput) if d],
                       host_rates=load(args.host_rates), profile=load(args.profile))
        path = write(doc, args.date, [args.out, *args.also_check], args.tag)
    except ValueError as exc:
        print(f"schema: {exc}", file=sys.stderr)
        return 1
    from .v2_table import markdown
    print(markdown(doc))
    print(f"schema: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
