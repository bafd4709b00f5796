"""The named breakages: each replaces one exact snippet (it must occur exactly once in its file)
and lists the tests that must catch it. Keep snippets to a line or two so that they are easy to
re-anchor when the code moves; the runner reports a snippet that no longer matches by name.

Test selections are kept tight (the cheapest tests that catch the breakage), so a full run stays
within a few minutes on a shared 2-core machine."""
from __future__ import annotations

from dataclasses import dataclass

OPS = "kvpr_compile/runtime/ops.py"
RT = "kvpr_compile/runtime/cuda_runtime.py"
STORE = "kvpr_compile/runtime/store.py"
REWRITE = "kvpr_compile/passes/rewrite.py"
PREFETCH = "kvpr_compile/passes/prefetch.py"
SPLIT = "kvpr_compile/runtime/recompute.py"
TOKEN_DIMS = "kvpr_compile/passes/token_dims.py"
SLICE = "kvpr_compile/passes/recompute_slice.py"
ONE_TOKEN = "kvpr_compile/passes/one_token.py"
SIM = "tests/sim_streams.py"
DIRECT = "kvpr_compile/runtime/direct.py"
WEIGHTS = "kvpr_compile/runtime/weight_stream.py"
THROUGHPUT = "kvpr_compile/plan/throughput_graph.py"

VALUES = "tests/test_ops_values.py"
ASSEMBLE = VALUES + "::test_assemble_orders_recomputed_loaded_new_and_falls_back_past_stored_x"
SIM_RUN = "tests/test_runtime_sim.py::test_layer_ahead_uses_two_slots_without_races[0.5]"
OVERLAP = "tests/test_runtime_sim.py::test_decode_recompute_overlaps_the_kv_copy"
ROWS_PAST_X = "tests/test_custom_models.py::test_rows_past_the_stored_x_never_leak_into_results"
CHUNK_POISON = "tests/test_multi_token.py::test_chunks_on_a_poisoned_past_full_recompute[hf-qwen2-gqa]"


@dataclass(frozen=True)
class Breakage:
    name: str
    path: str          # relative to the repository root
    old: str           # exact snippet, found exactly once in ``path``
    new: str
    tests: tuple[str, ...]   # pytest node ids (or files) that must fail with the breakage
    what: str = ""


BREAKAGES = (
    # ---- assemble ------------------------------------------------------------------------
    Breakage("assemble-key-order", DIRECT,
             "torch.cat([k_rec, k_load, k_new], dim=2), torch.cat([v_rec, v_load, v_new], dim=2)",
             "torch.cat([k_load, k_rec, k_new], dim=2), torch.cat([v_load, v_rec, v_new], dim=2)",
             ("tests/test_key_order.py::test_custom_position_dependent_attention[alibi-padded-0.37]",
              ASSEMBLE + "[cpu-x_covers_8_of_6]"),
             "loaded keys before recomputed ones (CPU path: the op and the compiled step)"),
    Breakage("assemble-key-order-runtime", RT,
             "torch.cat([k_rec, k_load, k_new], dim=2, out=k_all)",
             "torch.cat([k_load, k_rec, k_new], dim=2, out=k_all)",
             (ASSEMBLE + "[runtime-sim-x_covers_8_of_6]",),
             "loaded keys before recomputed ones (CUDA runtime)"),
    Breakage("fallback-only-without-x", DIRECT,
             "if covered < l:   # no stored X",
             "if covered == 0 < l:   # no stored X",
             (ROWS_PAST_X, ASSEMBLE + "[cpu-x_covers_3_of_6]"),
             "stored K,V used only when no X at all was stored (CPU path)"),
    Breakage("fallback-only-without-x-runtime", RT,
             "if covered < l:   # no stored X",
             "if covered == 0 < l:   # no stored X",
             (ASSEMBLE + "[runtime-sim-x_covers_3_of_6]",),
             "stored K,V used only when no X at all was stored (CUDA runtime)"),
    Breakage("direct-recompute-replaced-by-stored-kv", DIRECT,
             "l, covered = k_rec.shape[2], store.token_len[layer]",
             "l, covered = k_rec.shape[2], 0",
             ("tests/test_custom_models.py::test_recompute_is_real_poisoned_kv[llama-gqa]",
              ASSEMBLE + "[cpu-x_covers_8_of_6]"),
             "the compiled step takes the stored K,V for [0, l) instead of the recomputed ones"),
    # ---- loads and stores ----------------------------------------------------------------
    Breakage("load-kv-returns-zeros", OPS,
             "k, v = store.read_kv(layer, start, end, device)",
             "k, v = (torch.zeros_like(t) for t in store.read_kv(layer, start, end, device))",
             (VALUES + "::test_load_kv_returns_the_stored_rows[cpu-3-11]",)),
    Breakage("runtime-loads-zeros", RT,
             "API.copy(dst, src)",
             "dst.zero_()",
             (VALUES + "::test_load_kv_returns_the_stored_rows[runtime-sim-3-11]",),
             "the copy stream fills slots with zeros instead of the stored rows"),
    Breakage("load-tokens-wrong-rows", STORE,
             "return [s[:end].to(device, non_blocking=self.pin) for s in sources]",
             "return [s[1:end + 1].to(device, non_blocking=self.pin) for s in sources]",
             (VALUES + "::test_store_tokens_then_load_tokens[cpu]",)),
    Breakage("cache-update-keeps-stale-x", DIRECT,
             "store.invalidate_tokens(layer, pos)",
             "pass",
             (VALUES + "::test_uncompiled_write_over_stored_x_ends_the_x_prefix[cpu]",),
             "an uncompiled write over stored X does not end the valid X prefix (CPU path)"),
    Breakage("cache-update-keeps-stale-x-runtime", RT,
             "store.invalidate_tokens(layer, pos)",
             "pass",
             (VALUES + "::test_uncompiled_write_over_stored_x_ends_the_x_prefix[runtime-sim]",),
             "an uncompiled write over stored X does not end the valid X prefix (CUDA runtime)"),
    Breakage("x-prefix-grows-over-a-gap", STORE,
             "if pos <= self.token_len[layer]:",
             "if True:",
             (ROWS_PAST_X,),
             "X stored after a gap extends token_len over the rows never stored"),
    # ---- the split and the token dims ----------------------------------------------------
    Breakage("split-len-off-by-one", SPLIT,
             "return (past * num) // den",
             "return (past * num - 1) // den",
             ("tests/test_rewrite_details.py::test_decode_steps_split_at_floor_ratio_times_past[0.5-1-2]",)),
    Breakage("token-dim-unsqueeze-rule", TOKEN_DIMS,
             "return None if dim == u else dim if dim < u else dim - 1",
             "return None if dim == u else dim",
             ("tests/test_rewrite_details.py::test_token_dims_follow_transpose_permute_unsqueeze_and_broadcasting",
              "tests/test_custom_models.py::test_prompt_as_long_as_a_feature_dim_still_stores_x[llama-mha-16]"),
             "side inputs stored with the wrong token dim (RoPE tables as long as head_dim)"),
    # ---- multi-token graphs on a non-empty past (one_token.py) ----------------------------
    Breakage("multi-token-loads-whole-past", SLICE,
             "elif isinstance(cache_node.args[4], int) and cache_node.args[4] == 0:",
             "elif True:",
             (CHUNK_POISON,),
             "chunks on a past store X but load the whole past (the behaviour before)"),
    Breakage("past-side-inputs-from-this-call", REWRITE,
             "_inline(graph, sl.module, [*tokens, *sl.consts], effective, layer)",
             "_inline(graph, sl.module, [tokens[0], *sl.token_inputs[1:], *sl.consts], effective, layer)",
             (CHUNK_POISON,),
             "the past recomputed with this call's RoPE cos/sin instead of its stored records"),
    Breakage("multi-token-split-off-by-one", REWRITE,
             'call(split_len, (past, frac.numerator, frac.denominator), "split")',
             'call(split_len, (past - 1, frac.numerator, frac.denominator), "split")',
             (CHUNK_POISON,),
             "l one short of floor(ratio * past): the last past token read from stored K,V"),
    Breakage("one-token-size-left-symbolic", ONE_TOKEN,
             "        if self._is_n(val):\n            return 1",
             "        if self._is_n(val):\n            return val",
             (CHUNK_POISON.replace("hf-qwen2-gqa", "hf-gpt2"),),
             "GPT-2's shape x.size()[:-1] + (nf,) keeps the token count in the one-token slice "
             "(caught by the meta check, then the graph loads the past)"),
    Breakage("past-records-with-this-calls-token-count", ONE_TOKEN,
             "        shape[tdim] = 1",
             "        pass",
             (CHUNK_POISON,),
             "past records described with this call's token count: they never fit the store's"),
    # ---- waits, streams and events -------------------------------------------------------
    Breakage("kv-wait-dropped", REWRITE,
             'call(ops.wait.default, ([k_ld, v_ld],), "wait")',
             "None",
             (SIM_RUN,)),
    Breakage("x-wait-dropped", REWRITE,
             'call(ops.wait.default, (loaded,), "wait")',
             "None",
             (SIM_RUN,)),
    Breakage("recompute-waits-for-kv-too", REWRITE,
             'call(ops.wait.default, (loaded,), "wait")',
             'call(ops.wait.default, ([*loaded, k_ld, v_ld],), "wait")',
             (OVERLAP,),
             "the X / K,V overlap lost in the rewrite"),
    Breakage("x-event-covers-kv", RT,
             "event = found[0].ready[found[1]]",
             'event = found[0].ready["kv"]',
             ("tests/test_runtime_sim.py::test_recompute_waits_for_x_only", OVERLAP),
             "the X / K,V overlap lost in the runtime (X waits use the K,V event)"),
    Breakage("store-sources-released-early", RT,
             "self.in_flight.append((done, (k, v, *records, *keep)))",
             "self.in_flight.append((done, ()))",
             (SIM_RUN,),
             "store copies' sources released at once instead of held until their event"),
    Breakage("slot-free-wait-dropped", RT,
             "self.h2d.wait_event(slot.free)",
             "pass",
             (SIM_RUN,)),
    Breakage("load-after-store-wait-dropped", RT,
             "self.h2d.wait_event(self.stored[layer])",
             "pass",
             (SIM_RUN,)),
    Breakage("store-before-compute", RT,
             "self.d2h.wait_stream(API.current_stream(self.device))",
             "pass",
             (SIM_RUN,),
             "the D2H copy does not wait for the compute that produced its sources"),
    Breakage("fresh-memory-wait-dropped", RT,
             "if new_memory:",
             "if False:",
             ("tests/test_runtime_sim.py::test_copies_into_fresh_memory_wait_for_queued_compute_and_reused_slots_do_not",),
             "also caught by test_inductor_graphs_load_into_owned_tensors (slower)"),
    # ---- prefetch placement --------------------------------------------------------------
    Breakage("load-hoisting-disabled", PREFETCH,
             "if distance < 1:",
             "if distance < 100:",
             ("tests/test_prefetch_placement.py::test_next_layer_loads_precede_this_layers_assemble[0.5]",)),
    Breakage("prefetch-wrong-layer", PREFETCH,
             "zip(sites, sites[distance:])",
             "zip(sites, sites[distance + 1:])",
             ("tests/test_prefetch_placement.py::test_next_layer_loads_precede_this_layers_assemble[0.5]",),
             "layer i+2's loads issued before layer i's assemble instead of layer i+1's"),
    # ---- the direct steps the compiled graph calls (runtime/direct.py) --------------------
    Breakage("direct-loads-zeros", DIRECT,
             "return store.read_kv(layer, start, end, device)",
             "return tuple(torch.zeros_like(t) for t in store.read_kv(layer, start, end, device))",
             ("tests/test_custom_models.py::test_compiled_matches_eager[llama-mha-0.37]",)),
    Breakage("direct-stores-x-as-nan", DIRECT,
             "store.write_tokens(layer, pos, records(inputs, tdims, k.shape[2]))",
             "store.write_tokens(layer, pos, [r.new_full(r.shape, float('nan')) for r in records(inputs, tdims, k.shape[2])])",
             ("tests/test_custom_models.py::test_compiled_matches_eager[llama-mha-1.0]",
              VALUES + "::test_store_tokens_then_load_tokens[cpu]"),
             "X stored as NaN (the op and the compiled step)"),
    Breakage("direct-store-unchecked", DIRECT,
             "check_write(store, layer, pos, k, v)\n    store.write_kv(layer, pos, k, v)\n    store.write_tokens(",
             "store.write_kv(layer, pos, k, v)\n    store.write_tokens(",
             ("tests/test_shapes.py::test_bad_caches_are_clear_errors_under_compilation_and_stay_intact",),
             "the compiled step writes without the run-time geometry checks"),
    Breakage("narrow-rows-unchecked", STORE,
             "if not torch.equal(s[:valid], first.expand(valid, *held)):",
             "if False:",
             ("tests/test_generality.py::test_position_ids_in_prefill_only_with_rows_that_differ_fall_back_exactly",),
             "B stored rows of cos/sin narrowed to row 0 although they differ (left padding)"),
    Breakage("tokens-unchecked-fit", STORE,
             "sources = self.token_sources(layer, specs)",
             "sources = self.tokens[layer] or None",
             ("tests/test_generality.py::test_position_ids_in_prefill_only_with_rows_that_differ_fall_back_exactly",),
             "records stored by another graph loaded without checking they fit"),
    # ---- weight streaming and the throughput plan ------------------------------------------
    Breakage("weight-slot-refilled-before-free", WEIGHTS,
             "self.copy_stream.wait_event(slot.free)",
             "pass",
             ("tests/test_weight_stream.py::test_slot_copies_are_ordered_after_readers_on_simulated_streams",)),
    Breakage("weight-slot-never-refilled", WEIGHTS,
             "if slot.holds != following:",
             "if False:",
             ("tests/test_weight_stream.py::test_slot_copies_are_ordered_after_readers_on_simulated_streams",),
             "prefetch of layer i+k skipped: still exact (ready() loads on demand), so the test "
             "counts on-demand loads"),
    Breakage("throughput-weight-slot-edge-dropped", THROUGHPUT,
             'out.append((("att", j - 2, m - 1), ("w", j), "weight slot"))',
             "pass",
             ("tests/test_throughput_plan.py::test_weight_slots_and_cache_slots_bound_the_prefetch",)),
    # ---- the test tools themselves -------------------------------------------------------
    Breakage("race-checker-no-op", SIM,
             "if s is not stream and stream.clock.get(s.name, 0) < when:",
             "if False:",
             ("tests/test_runtime_sim.py::test_store_sources_released_before_their_event_is_a_race",),
             "also caught by test_race_checker_catches_a_missing_wait"),
)
