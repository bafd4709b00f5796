"""What the benchmark runs: model shapes, their HF configs and random-weight models, and the cases.

Model shapes come from ``arch_presets`` (published dims) with ``--layers`` decoder layers (8 by
default) and a 32000-token vocabulary, built as Hugging Face ``LlamaForCausalLM`` (gated MLP,
RoPE; GQA where ``num_kv_heads < num_heads``) or ``OPTForCausalLM`` (fc1/fc2 MLP, learned
positions). Weights are random (HF's own init, seeded) in the benchmark dtype, created directly on
the device. Without CUDA the same three families are built at toy width (``CPU_MODELS``): the
command then runs end to end, but its timings say nothing about GPU claims.

Cases: the paper's configuration (batch 32, prompt 256, 32 new tokens) and a batch x prompt
sweep, grouped by model so each model is built once.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..plan.arch_presets import ARCH_PRESETS

PAPER = (32, 256, 32)                      # batch, prompt, new tokens (KVPR paper, OPT-6.7B)
DEFAULT_MODELS = ("opt-6.7b", "llama-7b", "llama-3-8b")
DEFAULT_BATCHES = (16, 32)
DEFAULT_PROMPTS = (1024, 4096)
DEFAULT_NEW_TOKENS = 12                    # sweep cases: 1 from prefill, then warm-up + timed
DEFAULT_LAYERS = 8
QUICK = dict(batches=(4,), prompts=(256,), new_tokens=8, layers=2)
CPU = dict(batches=(2,), prompts=(24,), new_tokens=8, layers=2)
CPU_NOTE = "CPU smoke run: timings meaningless for GPU claims"
VOCAB = 32000

# the contenders, in table order (runners.py runs them; named here so that the command line's
# --help can list them without importing torch)
RESIDENT, HF_OFFLOADED, KVPR_R0, KVPR_SCHED = "resident", "hf-offloaded", "kvpr-r0", "kvpr-sched"
CONTENDERS = (RESIDENT, HF_OFFLOADED, KVPR_R0, KVPR_SCHED)
TPUT_R0, TPUT_KVPR = "tput-r0", "tput-kvpr"   # --schedule throughput (throughput.py)
DTYPE_NAMES = ("bfloat16", "float16", "float32")
INNER_CHOICES = ("eager", "piecewise", "inductor")   # inner.INNER, without importing torch


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str              # "llama" | "opt"
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = VOCAB

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_hidden_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_mha(self) -> bool:
        return self.num_kv_heads == self.num_heads

    @property
    def attention(self) -> str:
        return "MHA" if self.is_mha else f"GQA {self.num_heads // self.num_kv_heads}:1"


def _from_arch(name: str) -> ModelSpec:
    arch = ARCH_PRESETS[name]
    return ModelSpec(name, "llama" if arch.gated_mlp else "opt", arch.hidden_size,
                     arch.num_heads, arch.num_kv_heads, arch.intermediate_size)


GPU_MODELS: dict[str, ModelSpec] = {name: _from_arch(name) for name in sorted(ARCH_PRESETS)}
CPU_MODELS: dict[str, ModelSpec] = {
    "opt-6.7b": ModelSpec("opt-6.7b (toy)", "opt", 64, 4, 4, 128, vocab_size=256),
    "llama-7b": ModelSpec("llama-7b (toy)", "llama", 64, 4, 4, 128, vocab_size=256),
    "llama-3-8b": ModelSpec("llama-3-8b (toy)", "llama", 64, 8, 2, 128, vocab_size=256),
}


@dataclass(frozen=True)
class Case:
    model: str               # key into GPU_MODELS / CPU_MODELS
    batch: int
    prompt: int
    new_tokens: int          # generated tokens per sequence, the first one from the prefill
    kind: str = "sweep"      # "paper" | "sweep" | "quick" | "cpu"

    @property
    def tokens(self) -> int:
        """Cached tokens of the whole batch at the start of decoding."""
        return self.batch * self.prompt

    @property
    def label(self) -> str:
        return f"{self.model} b{self.batch} p{self.prompt} +{self.new_tokens}"

    @property
    def slug(self) -> str:
        return f"{self.model}-b{self.batch}-p{self.prompt}-n{self.new_tokens}".replace(".", "_")


def build_cases(models, batches, prompts, new_tokens: int, *, paper: bool = True,
                kind: str = "sweep") -> list[Case]:
    """Per model: the paper's case first (if asked), then batch x prompt; duplicates dropped."""
    cases: list[Case] = []
    for model in models:
        mine = [Case(model, *PAPER, kind="paper")] if paper else []
        mine += [Case(model, b, p, new_tokens, kind) for b in batches for p in prompts]
        for case in mine:
            if all((c.model, c.batch, c.prompt) != (case.model, case.batch, case.prompt)
                   for c in cases):
                cases.append(case)
    return cases


def hf_config(spec: ModelSpec, layers: int, max_positions: int):
    """A transformers config for ``spec`` with ``layers`` decoder layers and SDPA attention."""
    if spec.family == "opt":
        from transformers import OPTConfig
        return OPTConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                         num_hidden_layers=layers, ffn_dim=spec.intermediate_size,
                         num_attention_heads=spec.num_heads, word_embed_proj_dim=spec.hidden_size,
                         max_position_embeddings=max(2048, max_positions),
                         do_layer_norm_before=True, enable_bias=True)
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                       intermediate_size=spec.intermediate_size, num_hidden_layers=layers,
                       num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                       head_dim=spec.head_dim, max_position_embeddings=max(2048, max_positions))


def build_model(spec: ModelSpec, layers: int, *, dtype, device, seed: int = 0,
                max_positions: int = 2048):
    """Random-weight causal LM for ``spec``, created on ``device`` in ``dtype``, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM
    config = hf_config(spec, layers, max_positions)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)
