"""``kvpr bench --protocol 2`` (also ``python -m benchmarks.decode --protocol 2``): the cases by
benchmark protocol 2, one protocol-2 document.

Per run: one profile (``--profile`` path or preset; measured once on CUDA and saved where the
children read it; the h200-pcie5 preset on a CPU), the order seed (``--order-seed``, else drawn
and recorded), then the rounds over every case (rounds.py: round 1 of each case, then round 2,
one process per contender), a row per case (assemble.py), and the document (``--json``).
``--results-dir`` also writes ``<date>-<card>-v2.json`` there, under a name that no folder of
``--also-check`` holds.
Defaults: on CUDA Llama-7B-like (MHA) and Llama-3-8B-like (GQA) at b16 p1024, 8 layers, fp16,
N = 32, R = 3; ``--cpu-smoke``: their toy-width versions at b2 p16, 2 layers, fp32, N = 6, R = 2
(timings meaningless, the CUDA-only contenders absent with the reason).
"""
from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from . import configs as cf

GPU = dict(models=("llama-7b", "llama-3-8b"), batches=(16,), prompts=(1024,), layers=8,
           steps=32, repeats=3)
CPU = dict(models=("llama-7b", "llama-3-8b"), batches=(2,), prompts=(16,), layers=2, steps=6,
           repeats=2)


def driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20).stdout.strip()
        return out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "none (no nvidia-smi)"


def _profile(args, device, workdir: Path) -> tuple[str, dict]:
    """(path the children load, the profile as a dict): the run's one profile."""
    from ..plan.measure import measure
    from ..plan.presets import DEFAULT_PRESET
    from ..plan.resolve import resolve_profile
    if args.profile and os.path.isfile(args.profile):
        return args.profile, json.loads(Path(args.profile).read_text())
    missing = bool(args.profile) and args.profile.endswith(".json")
    if missing:
        print(f"kvpr bench: no profile at {args.profile}; "
              f"{'measuring one' if device.type == 'cuda' else 'using the preset'}",
              file=sys.stderr)
    if device.type == "cuda" and (missing or not args.profile):
        print("measuring the profile once for every process ...", file=sys.stderr, flush=True)
        prof = measure(device)
    else:
        prof = resolve_profile(DEFAULT_PRESET if missing or not args.profile else args.profile,
                               device=device)
    path = workdir / "profile.json"
    path.write_text(prof.to_json())
    return str(path), prof.to_dict()


def case_facts(key: str, spec: cf.ModelSpec, layers: int, batch: int, prompt: int, steps: int,
               dtype: str) -> dict:
    return {"model": key, "model_name": spec.name, "family": spec.family,
            "attention": "MHA" if spec.is_mha else "GQA", "hidden": spec.hidden_size,
            "kv_hidden": spec.kv_hidden_size, "layers": layers, "batch": batch,
            "prompt": prompt, "steps": steps, "dtype": dtype}


def _settings(args, cpu: bool) -> dict | None:
    """The run's models, sizes, dtype and contenders from ``args`` over the defaults (None when
    they leave nothing to run)."""
    from . import contenders as ct
    base = CPU if cpu else GPU
    specs = cf.CPU_MODELS if cpu else cf.GPU_MODELS
    out = dict(specs=specs, models=[m for m in (args.models or base["models"]) if m in specs],
               layers=args.layers or base["layers"], steps=args.steps or base["steps"],
               repeats=args.repeats or base["repeats"],
               dtype=args.dtype or ("float32" if cpu else "float16"),
               names=list(args.only or ct.NAMES), batches=args.batch or base["batches"],
               prompts=args.prompt or base["prompts"])
    if not out["models"] or out["steps"] < 2 or out["repeats"] < 1 or args.rounds < 1:
        return None
    return out


def _document(args, device, profile: dict, seed: int, dtype: str) -> dict:
    """The document's header: the card, versions, link rates, the run's seed and profile."""
    import torch
    import transformers
    cpu = device.type != "cuda"
    note = cf.CPU_NOTE if cpu else ""
    if args.in_process:
        note += ("; " if note else "") + "children run in-process (test mode), not one process each"
    # a measured profile names the card: the parent then never opens a CUDA context itself
    measured = not cpu and str(profile.get("source", "")).startswith("measured")
    card = profile["device_name"] if measured else (
        "cpu" if cpu else torch.cuda.get_device_name(device))
    return {"protocol": 2, "device": card,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "driver": "none (CPU run)" if cpu else driver(),
            "h2d_gbps": profile["h2d_bytes_per_s"] / 1e9,
            "d2h_gbps": profile["d2h_bytes_per_s"] / 1e9,
            "tests": {"passed": 0, "failed": 0}, "rows": [], "cpu": cpu, "note": note,
            "call_id": args.call_id or os.environ.get("KVPR_CALL_ID") or f"pid{os.getpid()}",
            "order_seed": seed, "profile": profile, "dtype": dtype, "argv": sys.argv[1:],
            "date": datetime.date.today().isoformat()}


def _cases(args, device, st: dict, profile_path: str) -> tuple[list[dict], list[dict]]:
    """(the children's case specs, the rows' case facts), one per model, batch and prompt."""
    cpu = device.type != "cuda"
    cases, facts = [], []
    for key in st["models"]:
        for batch in st["batches"]:
            for prompt in st["prompts"]:
                facts.append(case_facts(key, st["specs"][key], st["layers"], batch, prompt,
                                        st["steps"], st["dtype"]))
                cases.append({"model": key, "cpu": cpu, "layers": st["layers"], "batch": batch,
                              "prompt": prompt, "steps": st["steps"], "repeats": st["repeats"],
                              "dtype": st["dtype"], "device": str(device), "seed": args.seed,
                              "profile": profile_path, "inner": args.inner,
                              "overlap": args.overlap, "trace_dir": args.trace,
                              "trace_steps": args.trace_steps})
    return cases, facts


def _finish(args, doc: dict) -> int:
    """Test counts, the schema check, the results file, the table; 1 where a contender failed
    for another reason than a missing GPU."""
    from . import schema
    from .v2_table import markdown
    if args.junit:
        from .results import test_counts
        doc["tests"] = test_counts(Path(args.junit))
    errors = schema.validate(doc)
    if errors:
        print("kvpr bench: the document breaks the schema: " + "; ".join(errors[:5]),
              file=sys.stderr)
        return 1
    if args.results_dir:
        path = schema.write(doc, doc["date"], [args.results_dir, *(args.also_check or [])])
        print(f"kvpr bench: wrote {path}", file=sys.stderr)
    print(markdown(doc))
    failed = [n for row in doc["rows"] for n, why in row["absent"].items()
              if not why.startswith("needs CUDA")]
    return 1 if failed else 0


def run(args) -> int:
    from .assemble import build_row
    from .device import NO_CUDA, device_of
    from .rounds import collect, orders, process_order, run_all
    device = device_of(args)
    cpu = device.type != "cuda"
    if cpu and not args.cpu:
        print(NO_CUDA, file=sys.stderr)
        return 2
    st = _settings(args, cpu)
    if st is None:
        print("kvpr bench: error: protocol 2 needs a model, --steps >= 2, --repeats >= 1",
              file=sys.stderr)
        return 2
    names = st["names"]
    seed = args.order_seed if args.order_seed is not None else random.SystemRandom().randrange(
        1 << 30)
    workdir = Path(args.workdir) if args.workdir else Path(
        os.environ.get("TMPDIR", "/tmp")) / f"kvpr-bench-v2-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    profile_path, profile = _profile(args, device, workdir)
    deadline = time.monotonic() + args.deadline_s if args.deadline_s else None
    doc = _document(args, device, profile, seed, st["dtype"])
    cases, facts = _cases(args, device, st, profile_path)
    print(f"protocol 2: {len(cases)} case(s) x {len(names)} contenders x {args.rounds} rounds, "
          f"order seed {seed}", file=sys.stderr, flush=True)
    plan = orders(names, seed, args.rounds)
    doc["prestart"] = not args.no_prestart and not args.in_process

    def save(results):   # after every child: a run cut short keeps what it measured
        doc["rows"] = []
        for index, case in enumerate(facts):
            row = build_row(case, profile, collect(results, index, names, plan))
            row.update(order_seed=seed, argv=sys.argv[1:], in_process=args.in_process)
            doc["rows"].append(row)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")

    def log(text):
        print(f"  {text}", file=sys.stderr, flush=True)
    save(run_all(process_order(cases, names, rounds=args.rounds, seed=seed), deadline=deadline,
                 workdir=workdir, in_process=args.in_process, prestart=not args.no_prestart,
                 log=log, on_result=save))
    return _finish(args, doc)
