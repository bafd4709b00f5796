"""The model sweep (benchmarks/model_sweep.py): its classification never calls a NaN logit exact,
and a handful of transformers model types of every kind (rewritten, interleaved fused QKV,
sliding windows, layers sharing K/V, refused, an encoder or a decoder of an encoder-decoder run
as a causal LM) come out in their expected class -- none WRONG, CRASH or TIMEOUT -- each in its
own subprocess as the full sweep runs them."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import model_sweep as sweep  # noqa: E402


def _generated(logits):
    return SimpleNamespace(logits=tuple(logits), sequences=torch.tensor([[5, 6, 7]]))


def test_a_nan_logit_is_wrong_not_exact():
    """A compiled run equal to the reference but for one NaN logit (which ``max`` would skip) is
    WRONG; the same run without it is exact-rewritten."""
    ref = _generated([torch.tensor([[0.5, 2.0]]), torch.tensor([[1.0, -1.0]])])
    nan = _generated([torch.tensor([[0.5, 2.0]]), torch.tensor([[float("nan"), -1.0]])])
    record = {"uncompiled": sweep.compare(ref, ref), "all_rewritten": True}
    assert sweep.classify({**record, "poisoned": sweep.compare(ref, ref)}) == "exact-rewritten"
    assert sweep.classify({**record, "poisoned": sweep.compare(nan, ref)}) == "WRONG"
    fell_back = {**record, "all_rewritten": False, "poisoned": sweep.compare(nan, ref)}
    assert sweep.classify({**fell_back, "clean": sweep.compare(ref, ref)}) == "exact-fallback"
    assert sweep.classify({**fell_back, "clean": sweep.compare(nan, ref)}) == "WRONG"


SWEPT = {   # and the types the first full sweep found WRONG or CRASH, or falling back
    "llama": "exact-rewritten", "gpt_neox": "exact-rewritten", "gemma2": "exact-rewritten",
    "bert": "exact-rewritten", "gemma3n_text": "exact-rewritten", "mamba": "refused",
    "deepseek_v3": "refused", "cpmant": "exact-rewritten", "whisper": "exact-rewritten",
    "gpt_bigcode": "exact-rewritten", "roformer": "exact-rewritten", "mpt": "refused",
    "openai-gpt": "refused", "dory": "exact-rewritten"}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(SWEPT))
def test_sweep_types_come_out_as_expected(model_type):
    r = sweep.run_isolated(model_type, timeout=300)
    assert r["class"] == SWEPT[model_type], r
