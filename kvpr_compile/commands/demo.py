"""`kvpr demo`: eager vs kvpr-compiled greedy decoding on the built-in Llama-architecture model."""
from __future__ import annotations

import time

import torch

from .. import last_report
from ..models import TinyLlamaConfig, build_tiny_llama, greedy_generate


def add_parser(sub):
    p = sub.add_parser("demo", help="eager vs compiled decoding on a small built-in model")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8, help="< --heads for grouped-query attention")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=32, help="tokens to generate")
    p.add_argument("--ratio", type=float, default=None,
                   help="force the split ratio (default: the scheduler's, from the hardware profile)")
    p.add_argument("--profile", default=None, help="hardware profile preset or JSON path")
    p.add_argument("--inner", choices=("eager", "inductor"), default="eager")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _timed_generate(model, tokens, cache, steps, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out, logits = greedy_generate(model, tokens, cache, steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, logits, time.perf_counter() - t0


def run(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kvpr demo: --device cuda requested but CUDA is not available")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cfg = TinyLlamaConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                          num_kv_heads=args.kv_heads, intermediate_size=2 * args.hidden,
                          max_seq_len=args.prompt + args.new + 1)
    model = build_tiny_llama(cfg, seed=args.seed, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), generator=gen).to(device)
    print(f"model: Llama-architecture, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads} heads / {cfg.num_kv_heads} KV heads, {dtype}, {device}; seeded random weights")
    print(f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens; KV cache in CPU memory")

    greedy_generate(model, tokens, model.make_cache(args.batch, device=device), 2)  # warm-up
    ref_tokens, ref_logits, t_eager = _timed_generate(
        model, tokens, model.make_cache(args.batch, device=device), args.new, device)
    options = {"inner": args.inner}
    if args.ratio is not None:
        options["ratio"] = args.ratio
    if args.profile is not None:
        options["profile"] = args.profile
    compiled = torch.compile(model, backend="kvpr", options=options)
    greedy_generate(compiled, tokens, model.make_cache(args.batch, device=device), 2)  # compile
    out_tokens, out_logits, t_kvpr = _timed_generate(
        compiled, tokens, model.make_cache(args.batch, device=device), args.new, device)

    print()
    print(last_report())
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(out_logits, ref_logits))
    same = torch.equal(out_tokens, ref_tokens)
    n = args.batch * args.new
    print()
    print(f"max relative error of logits vs eager: {err:.2e}   greedy tokens identical: {same}")
    print(f"eager (offloaded cache):  {n / t_eager:10.1f} tokens/s")
    print(f"kvpr compiled:            {n / t_kvpr:10.1f} tokens/s")
    if device.type == "cpu":
        print("(CPU run: the cache and compute share one memory, so these rates say nothing about PCIe)")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return 0 if same and err <= tol else 1
