"""Hand-written decoders (not from transformers) that keep their KV cache in an OffloadedKVCache.

- FusedQKVModel: nanoGPT style: one Linear producing q|k|v, split, learned absolute positions.
- ComplexRopeModel: gpt-fast style: separate biased projections, grouped-query heads, RoPE as a
  complex rotation by stored frequencies, explicit matmul -> softmax -> matmul attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvpr_compile import OffloadedKVCache


def causal_mask(pos: int, n: int, device) -> torch.Tensor:
    q = torch.arange(pos, pos + n, device=device)
    return q[:, None] >= torch.arange(pos + n, device=device)[None, :]


class FusedQKVBlock(nn.Module):
    def __init__(self, dim, heads, idx):
        super().__init__()
        self.idx, self.heads = idx, heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, mask, cache):
        b, n, c = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(c, dim=2)
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        k, v = cache.update(self.idx, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.ln2(x))


class FusedQKVModel(nn.Module):
    def __init__(self, vocab=97, dim=48, heads=4, layers=2, max_len=128):
        super().__init__()
        self.heads, self.head_dim, self.num_kv_heads = heads, dim // heads, heads
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(FusedQKVBlock(dim, heads, i) for i in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, cache):
        pos, n = cache.seq_len(0), tokens.shape[1]
        x = self.wte(tokens) + self.wpe(torch.arange(pos, pos + n, device=tokens.device))
        mask = causal_mask(pos, n, tokens.device)
        for blk in self.blocks:
            x = blk(x, mask, cache)
        return self.head(x)


def rotate(x, freqs_cis):
    """gpt-fast style RoPE on (b, n, heads, d): pairs of channels as complex numbers."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis).flatten(3).type_as(x)


class ComplexRopeBlock(nn.Module):
    def __init__(self, dim, heads, kv_heads, idx):
        super().__init__()
        self.idx, self.heads, self.kv_heads, self.d = idx, heads, kv_heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.wq = nn.Linear(dim, heads * self.d, bias=True)
        self.wk = nn.Linear(dim, kv_heads * self.d, bias=True)
        self.wv = nn.Linear(dim, kv_heads * self.d, bias=True)
        self.wo = nn.Linear(heads * self.d, dim, bias=False)
        self.ff = nn.Linear(dim, dim)

    def forward(self, x, freqs_cis, mask, cache):
        b, n, _ = x.shape
        h = self.norm(x)
        q = rotate(self.wq(h).view(b, n, self.heads, self.d), freqs_cis).transpose(1, 2)
        k = rotate(self.wk(h).view(b, n, self.kv_heads, self.d), freqs_cis).transpose(1, 2)
        v = self.wv(h).view(b, n, self.kv_heads, self.d).transpose(1, 2)
        k, v = cache.update(self.idx, k, v)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-2, -1)) / self.d ** 0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        x = x + self.wo(y.transpose(1, 2).reshape(b, n, -1))
        return x + torch.tanh(self.ff(x))


class ComplexRopeModel(nn.Module):
    def __init__(self, vocab=89, dim=64, heads=4, kv_heads=2, layers=2, max_len=128):
        super().__init__()
        self.heads, self.head_dim, self.num_kv_heads = heads, dim // heads, kv_heads
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(ComplexRopeBlock(dim, heads, kv_heads, i)
                                    for i in range(layers))
        self.out = nn.Linear(dim, vocab)
        d = dim // heads
        freqs = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
        angles = torch.outer(torch.arange(max_len).float(), freqs)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles),
                             persistent=False)

    def forward(self, tokens, cache):
        pos, n = cache.seq_len(0), tokens.shape[1]
        positions = torch.arange(pos, pos + n, device=tokens.device)
        freqs = self.freqs_cis[positions].view(1, n, 1, -1)
        mask = causal_mask(pos, n, tokens.device)
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, freqs, mask, cache)
        return self.out(x)


def make_cache(model, batch, max_len=128, dtype=torch.float32, device="cpu") -> OffloadedKVCache:
    return OffloadedKVCache(len(model.blocks), batch, max_len, model.num_kv_heads, model.head_dim,
                            dtype=dtype, device=device)
