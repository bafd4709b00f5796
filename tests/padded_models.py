"""A hand-written decoder whose attention depends on where each key sits: left-padded batches
(per-row positions and a per-row key mask) and an ALiBi-style additive bias ``-slope * (q - k)``.

With either, concatenating the cached keys in the wrong order, or recomputing them with the
wrong per-row positions, changes the logits, even in decode steps (where a plain causal mask is
all-true and order would not matter).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvpr_compile import OffloadedKVCache


class PaddedBlock(nn.Module):
    def __init__(self, dim, heads, idx):
        super().__init__()
        self.idx, self.heads, self.d = idx, heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim) for _ in range(3))
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Linear(dim, dim)

    def forward(self, x, mask, cache):
        b, n, c = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(b, n, self.heads, self.d).transpose(1, 2)
                   for p in (self.wq, self.wk, self.wv))
        k, v = cache.update(self.idx, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.wo(y.transpose(1, 2).reshape(b, n, c))
        return x + torch.tanh(self.ff(x))


class PaddedAlibiModel(nn.Module):
    """``forward(tokens, cache, pad)``: ``pad[b]`` left pads in row b. Row b's token at cache
    position p has position ``p - pad[b]`` (learned absolute embedding); keys of pad positions
    are masked out for that row. ``alibi=True`` adds ``-slope_h * (q - k)`` to every score."""

    def __init__(self, vocab=97, dim=48, heads=4, layers=2, max_len=128, alibi=True):
        super().__init__()
        self.heads, self.head_dim, self.num_kv_heads = heads, dim // heads, heads
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(PaddedBlock(dim, heads, i) for i in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        slopes = 2.0 ** (-torch.arange(1, heads + 1).float()) if alibi else torch.zeros(heads)
        self.register_buffer("slopes", slopes, persistent=False)

    def forward(self, tokens, cache, pad):
        pos, n = cache.seq_len(0), tokens.shape[1]
        q_pos = torch.arange(pos, pos + n, device=tokens.device)
        k_pos = torch.arange(pos + n, device=tokens.device)
        x = self.wte(tokens) + self.wpe((q_pos[None, :] - pad[:, None]).clamp_min(0))
        causal = k_pos[None, :] <= q_pos[:, None]                               # (n, S)
        visible = (k_pos[None, None, :] >= pad[:, None, None]) & causal[None]   # (b, n, S)
        visible = visible | (k_pos[None, :] == q_pos[:, None])[None]   # pads see themselves
        bias = -self.slopes[:, None, None] * (q_pos[:, None] - k_pos[None, :]).float()   # (H, n, S)
        mask = torch.where(visible[:, None], bias[None],
                           torch.tensor(float("-inf")))                      # (b, H, n, S)
        for blk in self.blocks:
            x = blk(x, mask, cache)
        return self.head(x)


def make_padded_cache(model, batch, max_len=128) -> OffloadedKVCache:
    return OffloadedKVCache(len(model.blocks), batch, max_len, model.num_kv_heads, model.head_dim)
