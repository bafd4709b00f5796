"""A small built-in Llama-architecture decoder that keeps its KV cache in an OffloadedKVCache.

Used by ``kvpr demo``, the tests and the benchmarks: built from a config with seeded random
weights, nothing downloaded. RMSNorm, rotary embeddings (cos/sin tables indexed by position),
grouped-query attention through ``F.scaled_dot_product_attention``, SwiGLU MLP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import OffloadedKVCache


@dataclass
class TinyLlamaConfig:
    vocab_size: int = 512
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 8
    intermediate_size: int = 512
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return ((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
                * self.weight)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: OffloadedKVCache):
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = cache.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class TinyLlama(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        freqs = torch.outer(torch.arange(cfg.max_seq_len).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_table", emb.cos(), persistent=False)
        self.register_buffer("sin_table", emb.sin(), persistent=False)

    def make_cache(self, batch_size: int, max_seq_len: int | None = None, device="cpu",
                   dtype=None) -> OffloadedKVCache:
        cfg = self.cfg
        return OffloadedKVCache(cfg.num_layers, batch_size, max_seq_len or cfg.max_seq_len,
                                cfg.num_kv_heads, cfg.head_dim,
                                dtype=dtype or self.lm_head.weight.dtype, device=device)

    def forward(self, tokens: torch.Tensor, cache: OffloadedKVCache) -> torch.Tensor:
        b, n = tokens.shape
        pos = cache.seq_len(0)
        positions = torch.arange(pos, pos + n, device=tokens.device)
        dtype = self.lm_head.weight.dtype
        cos = self.cos_table[positions].to(dtype)[None, None]
        sin = self.sin_table[positions].to(dtype)[None, None]
        mask = positions[:, None] >= torch.arange(pos + n, device=tokens.device)[None, :]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.lm_head(self.norm(x))


def build_tiny_llama(cfg: TinyLlamaConfig | None = None, seed: int = 0, dtype=torch.float32,
                     device="cpu") -> TinyLlama:
    torch.manual_seed(seed)
    model = TinyLlama(cfg or TinyLlamaConfig())
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def greedy_generate(model, tokens: torch.Tensor, cache, steps: int) -> tuple[torch.Tensor, list]:
    """Greedy decoding with ``model(tokens, cache)``; returns new tokens and per-step logits."""
    logits = model(tokens, cache)[:, -1]
    out, all_logits = [], [logits]
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, cache)[:, -1]
        all_logits.append(logits)
    return torch.cat(out, dim=1), all_logits
