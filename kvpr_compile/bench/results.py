"""The committed record of one GPU run: ``benchmarks/results/<YYYY-MM-DD>-<card>.json``.

Built from what ``benchmarks/gpu_check.sh`` leaves behind: one ``kvpr bench --json`` file per
case and the CUDA tests' junit XML. Schema (one row per case)::

    {"device": str, "torch": str, "tests": {"passed": int, "failed": int},
     "rows": [{"model": str, "attention": "MHA" | "GQA", "batch": int, "prompt": int,
               "resident_ms": float, "hf_offloaded_ms": float, "kvpr_ratio0_ms": float,
               "kvpr_ms": float, "limit_ms": float}]}   # + "inner" on rows of another inner

``limit_ms`` is the scheduler's split's host-to-device bytes over the H2D rate measured in the
same run; a number a contender did not produce is null. ``kvpr bench --schedule throughput``
documents (``meta.schedule == "throughput"``) become ``throughput_rows`` instead::

    {"model", "attention", "batch", "prompt", "micro_batches" (row counts), "r0_tokens_per_s",
     "kvpr_tokens_per_s", "r0_ms", "kvpr_ms", "r0_limit_ms", "kvpr_limit_ms", "agreement"}

and the file is ``<date>-<card>-throughput.json`` when they are all it holds. Also prints the
tables as Markdown.

    python -m kvpr_compile.bench.results --cases DIR [--junit FILE] [--env FILE] [--date D] -o DIR
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .configs import HF_OFFLOADED, KVPR_R0, KVPR_SCHED, RESIDENT, TPUT_KVPR, TPUT_R0

COLUMNS = (("resident_ms", RESIDENT), ("hf_offloaded_ms", HF_OFFLOADED),
           ("kvpr_ratio0_ms", KVPR_R0), ("kvpr_ms", KVPR_SCHED))


def throughput_rows_from(doc: dict) -> list[dict]:
    """The rows of one ``kvpr bench --schedule throughput --json`` document."""
    rows = []
    for case in doc.get("cases", []):
        runs, tps, limit = (case.get("runs", {}), case.get("tokens_per_s", {}),
                            case.get("limit_ms", {}))
        mb = runs.get(TPUT_KVPR, {}).get("micro_batches") or case.get("micro_batches")
        rows.append({"model": case["model"],
                     "attention": "MHA" if case["attention"] == "MHA" else "GQA",
                     "batch": case["batch"], "prompt": case["prompt"], "micro_batches": mb,
                     "r0_tokens_per_s": tps.get(TPUT_R0), "kvpr_tokens_per_s": tps.get(TPUT_KVPR),
                     "r0_ms": runs.get(TPUT_R0, {}).get("ms_per_step"),
                     "kvpr_ms": runs.get(TPUT_KVPR, {}).get("ms_per_step"),
                     "r0_limit_ms": limit.get(TPUT_R0), "kvpr_limit_ms": limit.get(TPUT_KVPR),
                     "agreement": case.get("agreement")})
    return rows


def _is_throughput(doc: dict) -> bool:
    return doc.get("meta", {}).get("schedule") == "throughput"


def rows_from(doc: dict) -> list[dict]:
    """The schema's rows of one ``kvpr bench --json`` document."""
    if _is_throughput(doc):
        return []
    inner = doc.get("meta", {}).get("inner")
    rows = []
    for case in doc.get("cases", []):
        ms = case.get("ms_per_step", {})
        limit = case.get("limits", {}).get(KVPR_SCHED, {}).get("ms")
        rows.append({"model": case["model"],
                     "attention": "MHA" if case["attention"] == "MHA" else "GQA",
                     "batch": case["batch"], "prompt": case["prompt"],
                     **{key: ms.get(name) for key, name in COLUMNS}, "limit_ms": limit})
        if inner not in (None, "eager"):   # a run with another inner (the piecewise case)
            rows[-1]["inner"] = inner
    return rows


def test_counts(junit: Path | None) -> dict:
    """{"passed", "failed"} from a pytest junit XML (skipped tests count as neither)."""
    if junit is None or not junit.is_file():
        return {"passed": 0, "failed": 0}
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return {"passed": total - failed - skipped, "failed": failed}


def card(device: str) -> str:
    """A short file-name tag for the GPU: ``h100``, ``h200``, ``a100``..., else a slug."""
    found = re.search(r"\b([A-Z]\d{1,4}[A-Z]?)\b", device)
    if found:
        return found.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"


def build(case_docs: list[dict], tests: dict, env: dict | None = None) -> dict:
    """The results document; device and torch from the cases, else from ``env`` (env.json)."""
    metas = [d.get("meta", {}) for d in case_docs] + [env or {}]
    device = next((m["device"] for m in metas if m.get("device")), "unknown")
    torch_version = next((m["torch"] for m in metas if m.get("torch")), "unknown")
    rows = [row for doc in case_docs for row in rows_from(doc)]
    result = {"device": device, "torch": torch_version, "tests": tests, "rows": rows}
    tput = [row for doc in case_docs if _is_throughput(doc) for row in throughput_rows_from(doc)]
    if tput:
        result["throughput_rows"] = tput
    return result


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(a, b) -> str:
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.2f}"


def markdown(result: dict) -> str:
    head = ("| model | attn | b | prompt | resident | HF offloaded | kvpr r0 | kvpr | limit "
            "| kvpr/limit | r0/kvpr | HF/kvpr |")
    lines = [f"{result['device']}, torch {result['torch']}; tests {result['tests']['passed']} "
             f"passed, {result['tests']['failed']} failed; ms per decode step", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        model = r["model"] + (f" ({r['inner']})" if r.get("inner") else "")
        lines.append(
            f"| {model} | {r['attention']} | {r['batch']} | {r['prompt']} | "
            f"{_fmt(r['resident_ms'])} | {_fmt(r['hf_offloaded_ms'])} | "
            f"{_fmt(r['kvpr_ratio0_ms'])} | {_fmt(r['kvpr_ms'])} | {_fmt(r['limit_ms'])} | "
            f"{_ratio(r['kvpr_ms'], r['limit_ms'])} | {_ratio(r['kvpr_ratio0_ms'], r['kvpr_ms'])} "
            f"| {_ratio(r['hf_offloaded_ms'], r['kvpr_ms'])} |")
    if result.get("throughput_rows"):
        head = ("| model | attn | b | prompt | m | r0 tok/s | kvpr tok/s | kvpr/r0 | kvpr/limit "
                "| r0/limit | tokens agree |")
        lines += ["", "throughput schedule (weights streamed from pinned CPU memory)", "",
                  head, "|" + "---|" * (head.count("|") - 1)]
        for r in result["throughput_rows"]:
            agree = "-" if r["agreement"] is None else f"{r['agreement']:.0%}"
            lines.append(
                f"| {r['model']} | {r['attention']} | {r['batch']} | {r['prompt']} | "
                f"{r['micro_batches'] or '-'} | {_fmt(r['r0_tokens_per_s'])} | "
                f"{_fmt(r['kvpr_tokens_per_s'])} | "
                f"{_ratio(r['kvpr_tokens_per_s'], r['r0_tokens_per_s'])} | "
                f"{_ratio(r['kvpr_ms'], r['kvpr_limit_ms'])} | "
                f"{_ratio(r['r0_ms'], r['r0_limit_ms'])} "
                f"| {agree} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvpr_compile.bench.results",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", required=True, help="folder of `kvpr bench --json` files")
    parser.add_argument("--junit", default=None, help="the CUDA tests' junit XML")
    parser.add_argument("--env", default=None,
                        help="gpu_check.sh's env.json (device and torch when no case ran)")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("-o", "--out", required=True, help="folder for <date>-<card>.json")
    args = parser.parse_args(argv)
    docs = []
    for path in sorted(Path(args.cases).glob("*.json")):
        try:
            docs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            print(f"results: skipping {path}: {exc}", file=sys.stderr)
    env = None
    if args.env and Path(args.env).is_file():
        env = json.loads(Path(args.env).read_text())
    result = build(docs, test_counts(Path(args.junit) if args.junit else None), env)
    only_tput = bool(result.get("throughput_rows")) and not result["rows"]
    suffix = "-throughput" if only_tput else ""
    out = Path(args.out) / f"{args.date}-{card(result['device'])}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"results: wrote {out}", file=sys.stderr)
    return 0 if result["rows"] or result.get("throughput_rows") else 1


if __name__ == "__main__":
    sys.exit(main())
