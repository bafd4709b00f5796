"""Decoder shapes of well-known models for `kvpr plan` (dims from their published configs)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    name: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    intermediate_size: int
    gated_mlp: bool  # Llama-style gate/up/down (3 matrices) vs. OPT-style fc1/fc2 (2)

    @property
    def kv_hidden_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_params(self) -> int:
        return (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size

    @property
    def attention_kind(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return f"GQA {self.num_heads // self.num_kv_heads}:1"


def _arch(name, hidden, heads, kv_heads, layers, intermediate, gated) -> Arch:
    return Arch(name, hidden, heads, kv_heads, hidden // heads, layers, intermediate, gated)


ARCH_PRESETS: dict[str, Arch] = {a.name: a for a in (
    _arch("opt-6.7b", 4096, 32, 32, 32, 16384, False),
    _arch("opt-13b", 5120, 40, 40, 40, 20480, False),
    _arch("opt-30b", 7168, 56, 56, 48, 28672, False),
    _arch("llama-7b", 4096, 32, 32, 32, 11008, True),
    _arch("llama-2-7b", 4096, 32, 32, 32, 11008, True),
    _arch("llama-2-13b", 5120, 40, 40, 40, 13824, True),
    _arch("llama-2-70b", 8192, 64, 8, 80, 28672, True),
    _arch("llama-3-8b", 4096, 32, 8, 32, 14336, True),
    _arch("llama-3-70b", 8192, 64, 8, 80, 28672, True),
    _arch("mistral-7b", 4096, 32, 8, 32, 14336, True),
    # huggingface.co/Qwen/Qwen2-0.5B, Qwen2-7B and Qwen2-72B, config.json (K/V biases aside,
    # which the cost model does not count)
    _arch("qwen2-0.5b", 896, 14, 2, 24, 4864, True),
    _arch("qwen2-7b", 3584, 28, 4, 28, 18944, True),
    _arch("qwen2-72b", 8192, 64, 8, 80, 29568, True),
)}
