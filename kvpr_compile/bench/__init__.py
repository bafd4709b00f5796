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
- ``targets``  the pass/fail targets of the issue
- ``suite``    runs the cases (progress to stderr)
- ``table``    the stdout table and the JSON record
- ``timeline`` torch.profiler chrome trace -> CUDA stream timeline PNG and overlap numbers
- ``main``     the command line (shared by both entry points)
- ``results``  the committed record of a GPU run (``benchmarks/gpu_check.sh`` writes it)
- ``throughput`` ``--schedule throughput``: tokens/s with weights streamed, kvpr vs ratio 0 vs link
"""
