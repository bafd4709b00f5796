"""Every causal-LM model type of the installed transformers through kvpr: ``python -m
benchmarks.model_sweep [--only TYPES] [--json PATH] [--jobs N] [--timeout S]``.

For each type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: a tiny config (sweep_configs.py), seeded
random fp32 weights, and greedy ``generate`` of a batch of 2 prompts of 7 tokens, first eager
with transformers' own cache (the reference), then through an uncompiled ``KVPRCache``, then
with the forward compiled by ``kvpr_compile.hf.compile(model, ratio=1.0)`` and every stored K/V
turned NaN after the prefill (so that each rewritten layer's K,V must come from stored X). Each
type is classified (``classify``):

- ``exact-rewritten``: logits within ``TOL`` relative (NaN or inf never are), tokens identical,
  every layer rewritten at ratio 1 in the decode graphs and nothing skipped;
- ``exact-fallback``: exact without the poison (with it, a layer that reads stored K/V would see
  NaN), some layers not rewritten: the reasons are kvpr's warnings and report notes;
- ``refused``: ``KVPRCache`` raised ``NotImplementedError``, made or in a generate() check
  (the message is kept);
- ``not-a-decoder-we-can-build``: the config, the model or its eager generate failed (not kvpr's
  doing);
- ``WRONG``: a mismatch or a non-finite logit, uncompiled through KVPRCache or compiled;
- ``CRASH``: kvpr raised where eager ran;
- ``TIMEOUT``: the type's subprocess ran past ``--timeout`` (the stage it reached is kept).

Each type runs in a subprocess of its own (``--child TYPE``), which writes its result as it goes,
so a hang or a crash of the interpreter costs that type only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor

TOL = 1e-5
BATCH, PROMPT, NEW_TOKENS, CACHE_LEN = 2, 7, 5, 64
CLASSES = ("exact-rewritten", "exact-fallback", "refused", "not-a-decoder-we-can-build",
           "WRONG", "CRASH", "TIMEOUT")
BAD = ("WRONG", "CRASH", "TIMEOUT")


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# -- comparison and classification ----------------------------------------------------------------


def worst_rel_err(outs, refs) -> float:
    """max |a - b| / max |b| over paired tensors (b: the reference); ``inf`` if the counts differ
    or any value on either side is NaN or inf (as tests/helpers.worst_rel_err)."""
    import torch
    outs, refs = list(outs), list(refs)
    if len(outs) != len(refs) or not outs:
        return float("inf")
    worst = 0.0
    for a, b in zip(outs, refs):
        a, b = a.float(), b.float()
        if a.shape != b.shape or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return float("inf")
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        if not err <= worst:
            worst = err
    return worst


def compare(out, ref) -> dict:
    """Logits' worst relative error and token equality of two ``generate`` results."""
    import torch
    return {"rel_err": worst_rel_err(out.logits, ref.logits),
            "tokens_equal": bool(out.sequences.shape == ref.sequences.shape
                                 and torch.equal(out.sequences, ref.sequences))}


def exact(cmp: dict | None) -> bool:
    return bool(cmp) and cmp["tokens_equal"] and cmp["rel_err"] <= TOL   # False for NaN


def classify(r: dict) -> str:
    """The class of one type's result record (see the module docstring)."""
    if r.get("build_error"):
        return "not-a-decoder-we-can-build"
    if r.get("refused"):
        return "refused"
    if r.get("kvpr_error"):
        return "CRASH"
    if r.get("timeout"):
        return "TIMEOUT"
    if not exact(r.get("uncompiled")):
        return "WRONG"
    if exact(r.get("poisoned")) and r.get("all_rewritten"):
        return "exact-rewritten"
    if r.get("all_rewritten"):       # every layer recomputed, yet the poison showed: wrong
        return "WRONG"
    return "exact-fallback" if exact(r.get("clean")) else "WRONG"


# -- one type, in its own process -----------------------------------------------------------------


def _line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _head(exc: BaseException) -> str:
    """The last frames of ``exc``'s traceback and its message, for the JSON."""
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return "".join(lines[-4:])[-2000:]


def _generate(model, ids, cache=None, poison=False):
    """Greedy generate of NEW_TOKENS tokens with the logits; through ``cache`` (a KVPRCache) when
    given, its stored K/V NaN after the prefill when ``poison``."""
    import torch

    from kvpr_compile.hf import cache_kwargs
    kwargs = cache_kwargs(model, cache) if cache is not None else {}
    handle, poisoned = None, []
    if poison:
        def poison_after_prefill(module, args, kw):
            if cache.get_seq_length() > 0 and not poisoned:   # the prefill's, prefix and all
                poisoned.append(cache.get_seq_length())
                for t in cache.offloaded.k_cpu + cache.offloaded.v_cpu:
                    t.fill_(float("nan"))
        handle = model.register_forward_pre_hook(poison_after_prefill, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                                 output_logits=True, return_dict_in_generate=True, **kwargs)
    finally:
        if handle is not None:
            handle.remove()
    if poison and not poisoned:
        raise RuntimeError("the poison never ran: no forward after the prefill")
    return out


def _layers_rewritten(reports, layers: list[int]) -> tuple[bool, list[str]]:
    """Whether the decode graphs rewrote every layer of ``layers`` (those that stored K/V) at
    ratio 1, and the reasons where not (layers below ratio 1 or missing). Skipped nodes are
    listed too, but an attention node the scan could not trace to its cache read (DiffLlama's
    V halves) leaves its layer rewritten: the layers decide, and the poisoned run proves them.
    Graph notes (a fragment without attention, a graph holding some of the layers) are kept
    apart in the record."""
    reasons, skipped, at_one = [], [], set()
    for rep in reports:
        skipped += [f"skipped {name}: {why}" for name, why in rep.skipped]
        if any(e.note.startswith("multi-token") for e in rep.layers):
            continue
        at_one |= {e.layer for e in rep.layers if e.ratio == 1.0}
        reasons += [f"layer {e.layer} at ratio {e.ratio}" + (f" ({e.note})" if e.note else "")
                    for e in rep.layers if e.ratio != 1.0]
    missing = sorted(set(layers) - at_one)
    if not layers:
        reasons.append("no layer stored K/V in the cache")
    if not reports:
        reasons.append("no graph compiled by kvpr")
    elif missing:
        reasons.append(f"layers {missing} not rewritten in any decode graph")
    return not reasons, list(dict.fromkeys(reasons + skipped))


def run_one(model_type: str, save=lambda r: None) -> dict:
    """Build, run and compare one type; ``save(record)`` after each stage (the parent reads the
    last one if this process hangs or dies). Returns the record, its class included."""
    r = {"type": model_type, "stage": "config"}
    save(r)
    try:
        import torch
        import kvpr_compile
        import kvpr_compile.hf
        from benchmarks.sweep_configs import build_model, tiny_config
        from kvpr_compile.hf import KVPRCache
        cfg = tiny_config(model_type)
        r["stage"] = "build"
        save(r)
        torch.manual_seed(0)
        model = build_model(model_type, cfg).float().eval()
        if hasattr(model, "set_default_language") and getattr(cfg, "languages", None):
            model.set_default_language(list(cfg.languages)[0])   # X-MOD's adapters
        r["model_class"] = type(model).__name__
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None
        vocab = getattr(model.config.get_text_config(decoder=True), "vocab_size", None) or 128
        ids = torch.randint(3, min(vocab, 128), (BATCH, PROMPT),
                            generator=torch.Generator().manual_seed(1))
        r["stage"] = "eager generate"
        save(r)
        ref = _generate(model, ids)
    except Exception as exc:  # noqa: BLE001 -- any failure here is the model's, recorded
        r["build_error"] = f"{r['stage']}: {_line(exc)}"
        if r["stage"] == "eager generate":   # built: would KVPRCache have refused it anyway?
            try:
                KVPRCache(model.config, BATCH, CACHE_LEN)
            except NotImplementedError as refusal:
                r["refused"] = f"{refusal} (eager generate failed too at this size)"
                del r["build_error"]
            except Exception:  # noqa: BLE001 -- the eager failure is the record
                pass
        r["class"] = classify(r)
        return r
    try:
        r["stage"] = "KVPRCache"
        save(r)
        try:
            cache = KVPRCache(model.config, BATCH, CACHE_LEN, warn_uncompiled=False)
        except NotImplementedError as exc:
            r["refused"] = str(exc)
            r["class"] = classify(r)
            return r
        num_layers = cache.offloaded.num_layers
        r["stage"] = "uncompiled KVPRCache generate"
        save(r)
        r["uncompiled"] = compare(_generate(model, ids, cache), ref)
        r["stage"] = "compiled generate (poisoned)"
        save(r)
        first = len(kvpr_compile.reports())
        kvpr_compile.hf.compile(model, ratio=1.0)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            cache = KVPRCache(model.config, BATCH, CACHE_LEN)
            r["poisoned"] = compare(_generate(model, ids, cache, True), ref)
            mine = kvpr_compile.reports()[first:]
            r["graphs"] = len(mine)
            stored = [i for i in range(num_layers) if cache.offloaded.seq_len(i)]
            if len(stored) < num_layers:   # e.g. Gemma-3n's layers that reuse others' K/V
                r["layers_without_cache"] = sorted(set(range(num_layers)) - set(stored))
            r["all_rewritten"], reasons = _layers_rewritten(mine, stored)
            r["notes"] = sorted({n for rep in mine for n in rep.notes})
            if not (exact(r["poisoned"]) and r["all_rewritten"]):
                r["stage"] = "compiled generate (clean)"
                save(r)
                r["clean"] = compare(_generate(model, ids, KVPRCache(model.config, BATCH,
                                                                     CACHE_LEN)), ref)
        said = sorted({str(w.message).splitlines()[0][:300] for w in record
                       if str(w.message).startswith("kvpr")})
        r["reasons"] = reasons + said
    except NotImplementedError as exc:
        if not str(exc).startswith("KVPRCache:"):
            raise
        r["refused"] = f"{r['stage']}: {exc}"   # a KVPRCache check at generate() (hf_checks.py)
    except Exception as exc:  # noqa: BLE001 -- kvpr raised where eager ran: recorded as CRASH
        r["kvpr_error"] = f"{r['stage']}: {_line(exc)}"
        r["traceback"] = _head(exc)
    r["class"] = classify(r)
    return r


def _child(model_type: str, path: str) -> int:
    def save(rec):
        with open(path + ".tmp", "w") as fh:
            json.dump(rec, fh)
        os.replace(path + ".tmp", path)
    warnings.simplefilter("ignore")
    import logging
    logging.disable(logging.WARNING)
    save(run_one(model_type, save))
    return 0


# -- the sweep ------------------------------------------------------------------------------------


def run_isolated(model_type: str, timeout: float) -> dict:
    """``run_one`` in a subprocess; its last saved record, or a TIMEOUT / CRASH one."""
    fd, path = tempfile.mkstemp(prefix=f"sweep-{model_type}-", suffix=".json")
    os.close(fd)
    os.unlink(path)
    start = time.time()
    cmd = [sys.executable, "-m", "benchmarks.model_sweep", "--child", model_type, path]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        _, err = proc.communicate()
        timed_out = True
    try:
        with open(path) as fh:
            r = json.load(fh)
        os.unlink(path)
    except (OSError, ValueError):
        r = {"type": model_type, "stage": "start"}
    if timed_out:
        r["timeout"] = f"past {timeout:.0f} s in stage {r.get('stage')!r}"
        r["class"] = "TIMEOUT"
    elif "class" not in r:   # the interpreter died mid-stage
        r["kvpr_error" if r.get("stage", "").startswith(("KVPR", "uncompiled", "compiled"))
          else "build_error"] = f"{r.get('stage')}: process exited {proc.returncode}: " \
                                f"{(err or '').strip().splitlines()[-1:]}"
        r["class"] = classify(r)
    r["seconds"] = round(time.time() - start, 1)
    return r


def _detail(r: dict) -> str:
    for key in ("kvpr_error", "timeout", "build_error", "refused"):
        if r.get(key):
            return r[key]
    parts = [f"{k} err {r[k]['rel_err']:.1e}{'' if r[k]['tokens_equal'] else ' tokens differ'}"
             for k in ("uncompiled", "poisoned", "clean") if r.get(k)]
    return "; ".join(parts + r.get("reasons", [])[:2])


def summary(results: list[dict]) -> dict:
    by = {c: sorted(r["type"] for r in results if r["class"] == c) for c in CLASSES}
    return {"counts": {c: len(v) for c, v in by.items()}, "types": by}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_sweep",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated model types")
    parser.add_argument("--json", default=None, help="write every record and the summary here")
    parser.add_argument("--jobs", type=int, default=1, help="types run at once")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per type")
    parser.add_argument("--child", nargs=2, metavar=("TYPE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(*args.child)
    import transformers
    types = args.only.split(",") if args.only else causal_lm_types()
    results = []

    def one(t):
        r = run_isolated(t, args.timeout)
        print(f"{r['type']:28s} {r['class']:27s} {r['seconds']:6.1f}s  {_detail(r)[:150]}",
              flush=True)
        return r

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(one, types))
    out = {"transformers": transformers.__version__,
           "date": time.strftime("%Y-%m-%d", time.gmtime()), **summary(results),
           "results": results}
    print("\n" + "  ".join(f"{c}: {n}" for c, n in out["counts"].items()))
    for c in BAD:
        if out["types"][c]:
            print(f"{c}: {', '.join(out['types'][c])}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 1 if any(out["types"][c] for c in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
