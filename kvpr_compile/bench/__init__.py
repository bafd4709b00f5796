"""The one-run decode comparison behind ``kvpr bench`` and ``python -m benchmarks.decode``.

For each model shape x batch x prompt it times greedy decode steps of GPU-resident eager, HF
transformers' offloaded DynamicCache, kvpr at ratio 0 (prefetch only) and kvpr at the scheduler's
ratio, and sets them against the physical limit (bytes each plan moves host-to-device over the
measured pinned bandwidth). Modules, one idea each:

- ``configs``  model shapes (HF Llama/OPT configs, random fp16 weights) and the case sweep
- ``timing``   per-step timers (CUDA events, or ``perf_counter`` on CPU)
- ``loop``     the greedy decode loop over ``model(input_ids, cache=..., use_cache=True)``
- ``runners``  one function per contender
- ``limits``   host-to-device bytes of a split and the resulting time limit
- ``targets``  the pass/fail speed targets per case
- ``suite``    runs the cases (progress to stderr)
- ``table``    the stdout table and the JSON record
- ``timeline`` torch.profiler chrome trace -> CUDA stream timeline PNG and overlap numbers
- ``main``     the command line (shared by both entry points)
- ``results``  the committed record of a GPU run (``benchmarks/gpu_check.sh`` writes it)
- ``throughput`` ``--schedule throughput``: tokens/s with weights streamed, kvpr vs ratio 0 vs link

``kvpr bench --protocol 2`` (docs/design.md, "Benchmark protocol 2") is the run to trust:

- ``v2``          its command line: the cases, the run's one profile, the document
- ``rounds``      one process per contender, round 1 shuffled with a recorded seed, round 2 reversed
- ``protocol``    the child: build, untimed full decode, counters, R timed decodes, raw JSON
- ``contenders``  the eight contenders and how each decodes (loop, generate, copy pipeline)
- ``counters``    allocator and compile counters around the timed window
- ``yardsticks``  kv_link, HF's bytes bound, T*, floors: arithmetic on measured rates
- ``flags``       the sanity flags, pure functions over recorded numbers
- ``assemble``    a row from the children: pooled statistics, yardsticks, flags, headlines
- ``schema``      the protocol-2 file: validator, never-overwriting writer, one call's assembler
- ``v2_table``    the document as Markdown
- ``host_rates``  CPU attention over host K,V, host memory bandwidth, D2H+H2D round trip
"""
