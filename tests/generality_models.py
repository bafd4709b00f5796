"""Hand-written decoders in the styles of popular minimal codebases, adapted to keep their KV
cache in an OffloadedKVCache; each option is one way attention code is written in the wild.

``PatternModel(rope=..., knorm=..., lora=...)``:
- rope ``"table-int"``: Meta reference llama: complex ``freqs_cis`` table held as a plain
  attribute, sliced with Python ints ``[start_pos:start_pos + n]``, ``reshape_for_broadcast``;
- rope ``"in-graph"``: cos/sin computed in the graph from ``arange(pos, pos + n)``, shape
  ``(n, d)``, broadcasting against K ``(b, h, n, d)`` at a lower rank;
- rope ``"unbind"``: llama2.c: real cos/sin buffers, pairs split with ``unbind``, rotated and
  re-joined with ``stack(...).flatten``;
- rope ``"position-ids"``: HF style ``position_ids`` argument, ``(1, n)`` when not given,
  cos/sin ``(B|1, 1, n, d)`` (half-split rotate);
- knorm: ``"normalize"`` (``F.normalize`` qk-norm), ``"rms"`` (``nn.RMSNorm`` per head),
  ``"ln"`` (``nn.LayerNorm`` per head) on Q and K before RoPE;
- lora: K and V projections are ``base(x) + B(A(x)) * scale`` (peft style).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from kvpr_compile import OffloadedKVCache


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class LoraLinear(nn.Module):
    def __init__(self, dim_in, dim_out, rank=4, scale=0.5):
        super().__init__()
        self.base = nn.Linear(dim_in, dim_out, bias=False)
        self.lora_a = nn.Linear(dim_in, rank, bias=False)
        self.lora_b = nn.Linear(rank, dim_out, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.2)
        self.scale = scale

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale


class PatternBlock(nn.Module):
    def __init__(self, dim, heads, kv_heads, idx, rope, knorm, lora):
        super().__init__()
        self.idx, self.heads, self.kv_heads, self.d = idx, heads, kv_heads, dim // heads
        self.rope, self.knorm_kind = rope, knorm
        self.norm = nn.RMSNorm(dim)
        proj = (lambda i, o: LoraLinear(i, o)) if lora else \
            (lambda i, o: nn.Linear(i, o, bias=False))
        self.wq = nn.Linear(dim, heads * self.d, bias=False)
        self.wk, self.wv = proj(dim, kv_heads * self.d), proj(dim, kv_heads * self.d)
        self.wo = nn.Linear(heads * self.d, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        norms = {"rms": lambda: nn.RMSNorm(self.d), "ln": lambda: nn.LayerNorm(self.d)}
        if knorm in norms:
            self.qn, self.kn = norms[knorm](), norms[knorm]()

    def _norm(self, t, which):
        if self.knorm_kind == "normalize":
            return F.normalize(t, dim=-1) * 4.0
        if self.knorm_kind is None:
            return t
        return (self.qn if which == "q" else self.kn)(t)

    def _rope(self, t, pe):
        """t (b, n, heads, d) -> rotated, same layout."""
        if self.rope == "table-int":      # complex rotation, freqs (1, n, 1, d/2)
            tc = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
            return torch.view_as_real(tc * pe).flatten(3).type_as(t)
        if self.rope == "unbind":         # llama2.c: real pairs, unbind / stack
            cos, sin = pe
            tr, ti = t.float().reshape(t.shape[:-1] + (-1, 2)).unbind(-1)
            out_r = tr * cos - ti * sin
            out_i = tr * sin + ti * cos
            return torch.stack([out_r, out_i], dim=-1).flatten(3).type_as(t)
        cos, sin = pe                     # half-split rotate on (b, heads, n, d) after transpose
        return t * cos + _rotate_half(t) * sin

    def forward(self, x, pe, mask, cache):
        b, n, _ = x.shape
        h = self.norm(x)
        q = self._norm(self.wq(h).view(b, n, self.heads, self.d), "q")
        k = self._norm(self.wk(h).view(b, n, self.kv_heads, self.d), "k")
        v = self.wv(h).view(b, n, self.kv_heads, self.d).transpose(1, 2)
        if self.rope in ("table-int", "unbind"):
            q, k = self._rope(q, pe).transpose(1, 2), self._rope(k, pe).transpose(1, 2)
        else:
            q, k = self._rope(q.transpose(1, 2), pe), self._rope(k.transpose(1, 2), pe)
        k, v = cache.update(self.idx, k, v)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.wo(y.transpose(1, 2).reshape(b, n, -1))
        return x + self.ff(x)


class PatternModel(nn.Module):
    def __init__(self, rope="in-graph", knorm=None, lora=False, vocab=83, dim=32, heads=4,
                 kv_heads=2, layers=2, max_len=64, theta=10000.0):
        super().__init__()
        self.rope, self.heads, self.num_kv_heads = rope, heads, kv_heads
        self.head_dim = dim // heads
        d = dim // heads
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(PatternBlock(dim, heads, kv_heads, i, rope, knorm, lora)
                                    for i in range(layers))
        self.out = nn.Linear(dim, vocab, bias=False)
        self.inv_freq = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)   # plain attribute
        angles = torch.outer(torch.arange(max_len).float(), self.inv_freq)
        if rope == "table-int":   # a plain attribute, as in Meta's reference code
            self.freqs_cis = torch.polar(torch.ones_like(angles), angles)
        if rope == "unbind":
            self.register_buffer("freqs_cos", angles.cos(), persistent=False)
            self.register_buffer("freqs_sin", angles.sin(), persistent=False)

    def _positions(self, pos, n, device, position_ids):
        if self.rope == "table-int":
            f = self.freqs_cis[pos:pos + n]                            # Python-int slice
            return f.view(1, n, 1, f.shape[-1])
        if self.rope == "unbind":
            cos, sin = self.freqs_cos[pos:pos + n], self.freqs_sin[pos:pos + n]
            return cos.view(1, n, 1, -1), sin.view(1, n, 1, -1)
        if self.rope == "in-graph":                                    # (n, d), lower rank than K
            t = torch.arange(pos, pos + n, device=device).float()
            emb = torch.outer(t, self.inv_freq.to(device)).repeat(1, 2)
            return emb.cos(), emb.sin()
        if position_ids is None:                                       # "position-ids"
            position_ids = torch.arange(pos, pos + n, device=device)[None]
        freqs = position_ids[..., None].float() * self.inv_freq.to(device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]                  # (B|1, 1, n, d)

    def forward(self, tokens, cache, position_ids=None):
        pos, n = cache.seq_len(0), tokens.shape[1]
        pe = self._positions(pos, n, tokens.device, position_ids)
        mask = torch.arange(pos, pos + n, device=tokens.device)[:, None] >= \
            torch.arange(pos + n, device=tokens.device)[None, :]
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, pe, mask, cache)
        return self.out(x)


def make_cache(model, batch, max_len=64, dtype=torch.float32) -> OffloadedKVCache:
    return OffloadedKVCache(len(model.blocks), batch, max_len, model.num_kv_heads, model.head_dim,
                            dtype=dtype)
