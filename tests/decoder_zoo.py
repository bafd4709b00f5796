"""A builder of small decoders that keep their KV cache in an ``OffloadedKVCache``, combining the
ways attention is written in the wild: ``Choices`` (a frozen dataclass, one field per design
axis) -> ``ZooDecoder`` (an nn.Module whose attention calls ``cache.update(layer, k, v)``), plus
``run_decode`` (prefill + greedy steps, optionally NaN-poisoning stored K/V after the prefill).

Axes: K/V projections (separate Linear, fused q|k|v split on the features or on a heads view,
separate q + fused k|v, LoRA adapters, raw parameters used as ``x @ W`` / ``x @ W.T`` / einsum),
bias; MHA/GQA/MQA and how query heads share K/V (repeat_interleave, HF-style expand, SDPA's
``enable_gqa``, queries grouped per K/V head); positions (RoPE, learned, ALiBi, none); the RoPE
variant (half-split, interleaved, complex, unbind/stack; partial), where cos/sin come from
(computed in the graph, a table indexed by a position tensor, a table sliced with Python ints),
their rank (full, or lower and broadcast), where RoPE is applied (before or after the head
transpose), whether the cache holds rotated keys or unrotated ones rotated after every read,
NoPE layers between RoPE layers; qk-norms (per head, F.normalize, or over the whole width as in
OLMo-2) and a norm on V; SDPA (explicit mask or ``is_causal`` in the prefill), manual or einsum
attention; sliding windows (by mask, or by slicing the cached K/V); pre-/post-/parallel blocks;
``position_ids`` passed never, only when decoding, or always; and the prompt length (equal to
some RoPE feature dims, or not).

Tiny dims (hidden 32, 4 heads of 8) so that every drawn model compiles in seconds on a CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvpr_compile import OffloadedKVCache

DIM, HEADS, HEAD_DIM, VOCAB, MAX_LEN, LORA_RANK = 32, 4, 8, 53, 32, 4

AXES = {
    "proj": ("separate", "fused_qkv", "fused_kv", "fused_heads", "lora", "matmul", "matmul_t",
             "einsum"),
    "bias": (False, True),
    "kv_heads": (4, 2, 1),
    "gqa": ("repeat_interleave", "expand", "enable_gqa", "group_q"),
    "pos": ("rope", "learned", "alibi", "none"),
    "rope": ("half", "interleaved", "complex", "unbind"),
    "rope_partial": (False, True),
    "rope_source": ("computed", "table_tensor", "table_int"),
    "rope_rank": ("full", "low"),
    "rope_layout": ("bhnd", "bnhd"),
    "rope_keys": ("new", "cached"),
    "qk_norm": ("none", "rms", "layernorm", "normalize", "rms_full"),
    "v_norm": (False, True),
    "attn": ("sdpa", "manual", "einsum"),
    "mask": ("explicit", "is_causal"),
    "window": (0, 3),
    "window_by": ("mask", "slice"),
    "block": ("pre", "post", "parallel"),
    "position_ids": ("none", "decode_only", "always"),
    "nope_odd": (False, True),
    "prompt_len": (5, 4, 8),
}


@dataclass(frozen=True)
class Choices:
    proj: str = "separate"          # separate | fused_qkv | fused_kv | fused_heads | lora
                                    # | matmul (x @ W) | matmul_t (x @ W.T) | einsum
    bias: bool = False              # bias on the q/k/v/o projections
    kv_heads: int = 4               # 4: MHA, 2: GQA, 1: MQA (HEADS = 4)
    gqa: str = "repeat_interleave"  # repeat_interleave | expand | enable_gqa (SDPA) | group_q
    pos: str = "rope"               # rope | learned | alibi | none
    rope: str = "half"              # half (HF) | interleaved (GPT-J) | complex (Meta)
                                    # | unbind (llama2.c)
    rope_partial: bool = False      # rotate only the first half of each head
    rope_source: str = "computed"   # computed | table_tensor: table[positions]
                                    # | table_int: table[p:p+n]
    rope_rank: str = "full"         # full: broadcast dims kept | low: (n, d) / (n, 1, d) against K
    rope_layout: str = "bhnd"       # RoPE after (bhnd) or before (bnhd) the head transpose
    rope_keys: str = "new"          # new: cache rotated K
                                    # | cached: unrotated, all keys rotated after reads
    qk_norm: str = "none"           # none | rms | layernorm | normalize (F.normalize) | rms_full
    v_norm: bool = False            # RMSNorm on V's heads too (Gemma 3n style)
    attn: str = "sdpa"              # sdpa | manual (matmul-softmax-matmul) | einsum
    mask: str = "explicit"          # explicit bool mask
                                    # | is_causal (SDPA: in the prefill; no mask after)
    window: int = 0                 # sliding window (keys in the last `window` positions); 0: none
    window_by: str = "mask"         # mask | slice: decode steps also cut K, V to the last
                                    # `window` keys
    block: str = "pre"              # pre | post (norm after the residual) | parallel (GPT-J)
    position_ids: str = "none"      # none: from cache.seq_len | decode_only | always (B, n) tensors
    nope_odd: bool = False          # odd layers skip RoPE (NoPE layers, as in SmolLM3 / Llama 4)
    prompt_len: int = 5             # 4 and 8 equal feature dims of RoPE tables
                                    # (rot/2, rot, head_dim)

    def canonical(self) -> "Choices":
        """Reset the fields that have no effect under the other choices, so that equal models
        compare equal and reproducers print only what matters."""
        c = self
        if c.kv_heads == HEADS:
            c = dataclasses.replace(c, gqa="repeat_interleave")
        if c.gqa == "enable_gqa" and c.attn != "sdpa":
            c = dataclasses.replace(c, gqa="repeat_interleave")
        if c.gqa == "group_q" and c.attn == "sdpa":
            c = dataclasses.replace(c, gqa="expand")
        if c.pos != "rope":
            c = dataclasses.replace(c, nope_odd=False, rope="half", rope_partial=False,
                                    rope_source="computed", rope_rank="full", rope_layout="bhnd",
                                    rope_keys="new")
        if c.rope_keys == "cached":           # keys rotated in the (b, h, s, d) layout
            c = dataclasses.replace(c, rope_layout="bhnd")
        if c.mask == "is_causal" and (c.attn != "sdpa" or c.window or c.pos == "alibi"):
            c = dataclasses.replace(c, mask="explicit")
        if not c.window:
            c = dataclasses.replace(c, window_by="mask")
        if c.rope_source == "table_int":      # Meta-llama style: start_pos, no position ids
            c = dataclasses.replace(c, position_ids="none")
        if c.position_ids != "none":          # (B, n) positions: cos/sin keep the batch dim
            c = dataclasses.replace(c, rope_rank="full")
        return c

    def short(self) -> str:
        """The fields that differ from the defaults, e.g. ``Choices(proj='lora', bias=True)``."""
        diff = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]
        return f"Choices({', '.join(diff)})"


# ---- positions -----------------------------------------------------------------------------
def rope_features(c: Choices) -> int:
    """Channels per head that RoPE rotates."""
    return HEAD_DIM // 2 if c.rope_partial else HEAD_DIM


def rope_tables(c: Choices, angles: torch.Tensor):
    """(cos, sin) or (freqs_cis,) for angles ``(..., rot/2)``, laid out for the RoPE variant."""
    if c.rope == "complex":
        return (torch.polar(torch.ones_like(angles), angles),)
    if c.rope == "half":
        angles = torch.cat((angles, angles), dim=-1)
    elif c.rope == "interleaved":
        angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def rotate(c: Choices, x: torch.Tensor, rope) -> torch.Tensor:
    """Apply the drawn RoPE variant to the first rope_features(c) channels of x."""
    rot = rope_features(c)
    x_rot, x_pass = (x[..., :rot], x[..., rot:]) if c.rope_partial else (x, None)
    if c.rope == "complex":
        xc = torch.view_as_complex(x_rot.float().reshape(*x_rot.shape[:-1], -1, 2))
        out = torch.view_as_real(xc * rope[0]).flatten(-2).type_as(x_rot)
    else:
        cos, sin = rope
        if c.rope == "half":
            x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
            out = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
        elif c.rope == "interleaved":
            x1, x2 = x_rot[..., ::2], x_rot[..., 1::2]
            out = x_rot * cos + torch.stack((-x2, x1), dim=-1).flatten(-2) * sin
        else:  # unbind/stack, llama2.c
            xr, xi = x_rot.reshape(*x_rot.shape[:-1], -1, 2).unbind(-1)
            out = torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1).flatten(-2)
    return torch.cat((out, x_pass), dim=-1) if x_pass is not None else out


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(1.0 + 0.1 * torch.randn(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class NormalizeScale(nn.Module):
    """x-transformers style qk-norm: unit rows times a learned per-channel scale."""
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(2.0 + 0.1 * torch.randn(dim))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale


def qk_norm(kind: str, width: int):
    if kind == "rms_full":
        return RMSNorm(width)
    if kind == "rms":
        return RMSNorm(HEAD_DIM)
    if kind == "layernorm":
        return nn.LayerNorm(HEAD_DIM)
    if kind == "normalize":
        return NormalizeScale(HEAD_DIM)
    return nn.Identity()


class LoRALinear(nn.Module):
    """peft style: base(x) + B(A(x)) * scale, B non-zero so the adapter matters."""
    def __init__(self, d_in, d_out, bias):
        super().__init__()
        self.base = nn.Linear(d_in, d_out, bias=bias)
        self.lora_A = nn.Linear(d_in, LORA_RANK, bias=False)
        self.lora_B = nn.Linear(LORA_RANK, d_out, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.2)
        self.scale = 0.5

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


# ---- attention -----------------------------------------------------------------------------
class ZooAttention(nn.Module):
    def __init__(self, c: Choices, idx: int):
        super().__init__()
        self.c, self.idx = c, idx
        h, hkv, d = HEADS, c.kv_heads, HEAD_DIM
        lin = LoRALinear if c.proj == "lora" else nn.Linear
        if c.proj in ("fused_qkv", "fused_heads"):
            self.qkv = nn.Linear(DIM, (h + 2 * hkv) * d, bias=c.bias)
        elif c.proj in ("matmul", "matmul_t", "einsum"):
            for name, m in (("q", h), ("k", hkv), ("v", hkv)):
                shape = {"matmul": (DIM, m * d), "matmul_t": (m * d, DIM),
                         "einsum": (DIM, m, d)}[c.proj]
                self.register_parameter(f"w{name}", nn.Parameter(torch.randn(shape) / DIM ** 0.5))
                if c.bias:
                    self.register_parameter(f"b{name}", nn.Parameter(0.1 * torch.randn(m * d)))
        elif c.proj == "fused_kv":
            self.q = nn.Linear(DIM, h * d, bias=c.bias)
            self.kv = nn.Linear(DIM, 2 * hkv * d, bias=c.bias)
        else:
            self.q, self.k, self.v = (lin(DIM, m * d, c.bias) for m in (h, hkv, hkv))
        self.q_norm, self.k_norm = qk_norm(c.qk_norm, h * d), qk_norm(c.qk_norm, hkv * d)
        self.v_norm = RMSNorm(d) if c.v_norm else nn.Identity()
        self.o = nn.Linear(h * d, DIM, bias=c.bias)

    def project(self, x):
        c, (b, n, _) = self.c, x.shape
        h, hkv, d = HEADS, c.kv_heads, HEAD_DIM
        if c.proj == "fused_qkv":
            q, k, v = self.qkv(x).split([h * d, hkv * d, hkv * d], dim=-1)
        elif c.proj == "fused_heads":     # Falcon style: a heads view, sliced
            qkv = self.qkv(x).view(b, n, h + 2 * hkv, d)
            q, k, v = qkv[:, :, :h], qkv[:, :, h:h + hkv], qkv[:, :, h + hkv:]
        elif c.proj == "fused_kv":
            q = self.q(x)
            k, v = self.kv(x).chunk(2, dim=-1)
        elif c.proj in ("matmul", "matmul_t", "einsum"):
            w = {name: getattr(self, f"w{name}") for name in "qkv"}
            if c.proj == "matmul":
                q, k, v = (x @ w[name] for name in "qkv")
            elif c.proj == "matmul_t":
                q, k, v = (x @ w[name].T for name in "qkv")
            else:
                q, k, v = (torch.einsum("bnd,dhe->bnhe", x, w[name]).flatten(2) for name in "qkv")
            if c.bias:
                q, k, v = q + self.bq, k + self.bk, v + self.bv
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        if c.qk_norm == "rms_full":      # OLMo-2 style: over the whole projection width
            q, k = self.q_norm(q.reshape(b, n, h * d)), self.k_norm(k.reshape(b, n, hkv * d))
        return q.reshape(b, n, h, d), k.reshape(b, n, hkv, d), v.reshape(b, n, hkv, d)

    def forward(self, x, rope, mask, alibi, cache):
        """``rope``: (tables for the new tokens, tables for all keys or None) or None."""
        c, (b, n, _) = self.c, x.shape
        rope, rope_all = rope if rope is not None else (None, None)
        q, k, v = self.project(x)
        if c.qk_norm != "rms_full":
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_norm(v)
        if rope is not None and c.rope_layout == "bnhd":
            q, k = rotate(c, q, rope), rotate(c, k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None and c.rope_layout == "bhnd":
            q = rotate(c, q, rope)
            k = k if rope_all is not None else rotate(c, k, rope)
        k, v = cache.update(self.idx, k, v)
        if rope_all is not None:    # the cache holds unrotated keys (attention-sink style)
            k = rotate(c, k, rope_all)
        if c.window and c.window_by == "slice" and n == 1:   # Mistral-style: only the window
            k, v, mask = k[:, :, -c.window:], v[:, :, -c.window:], mask[:, -c.window:]
            alibi = alibi[..., -c.window:] if alibi is not None else None
        y = self.attend(q, k, v, mask, alibi)
        return self.o(y.transpose(1, 2).reshape(b, n, HEADS * HEAD_DIM))

    def attend(self, q, k, v, mask, alibi):
        c, rep = self.c, HEADS // self.c.kv_heads
        b, _, n, d = q.shape
        s = k.shape[2]
        if rep > 1 and c.gqa == "repeat_interleave":
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        elif rep > 1 and c.gqa == "expand":   # HF repeat_kv
            k, v = (t[:, :, None].expand(b, c.kv_heads, rep, s, d).reshape(b, HEADS, s, d)
                    for t in (k, v))
        if c.attn == "sdpa":
            kw = {"enable_gqa": True} if rep > 1 and c.gqa == "enable_gqa" else {}
            if c.mask == "is_causal":   # HF style: causal for the prefill (no past), no mask after
                return F.scaled_dot_product_attention(q, k, v, is_causal=bool(n > 1), **kw)
            attn_mask = mask if alibi is None else alibi.masked_fill(~mask, float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)
        grouped = rep > 1 and c.gqa == "group_q"
        if c.attn == "einsum":
            if grouped:
                qg = q.view(b, c.kv_heads, rep, n, d)
                scores = torch.einsum("bgrqd,bgkd->bgrqk", qg, k).reshape(b, HEADS, n, s)
            else:
                scores = torch.einsum("bhqd,bhkd->bhqk", q, k)
        else:
            if grouped:
                scores = (q.reshape(b, c.kv_heads, rep * n, d) @ k.transpose(-2, -1))
                scores = scores.view(b, HEADS, n, s)
            else:
                scores = q @ k.transpose(-2, -1)
        scores = scores / d ** 0.5
        if alibi is not None:
            scores = scores + alibi
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        if c.attn == "einsum":
            if grouped:
                return torch.einsum("bgrqk,bgkd->bgrqd", probs.view(b, c.kv_heads, rep, n, s), v
                                    ).reshape(b, HEADS, n, d)
            return torch.einsum("bhqk,bhkd->bhqd", probs, v)
        if grouped:
            return (probs.reshape(b, c.kv_heads, rep * n, s) @ v).view(b, HEADS, n, d)
        return probs @ v


class ZooBlock(nn.Module):
    def __init__(self, c: Choices, idx: int):
        super().__init__()
        self.c = c
        self.n1, self.n2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = ZooAttention(c, idx)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, rope, mask, alibi, cache):
        if self.c.block == "post":
            x = self.n1(x + self.attn(x, rope, mask, alibi, cache))
            return self.n2(x + self.mlp(x))
        if self.c.block == "parallel":
            h = self.n1(x)
            return x + self.attn(h, rope, mask, alibi, cache) + self.mlp(h)
        x = x + self.attn(self.n1(x), rope, mask, alibi, cache)
        return x + self.mlp(self.n2(x))


class ZooDecoder(nn.Module):
    """``forward(tokens, cache, position_ids=None) -> logits (b, n, VOCAB)``."""

    def __init__(self, c: Choices, layers: int = 2):
        super().__init__()
        self.c = c
        self.num_kv_heads, self.head_dim = c.kv_heads, HEAD_DIM
        self.emb = nn.Embedding(VOCAB, DIM)
        if c.pos == "learned":
            self.wpe = nn.Embedding(MAX_LEN, DIM)
        self.blocks = nn.ModuleList(ZooBlock(c, i) for i in range(layers))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if c.pos == "rope":
            rot = rope_features(c)
            inv_freq = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
            if c.rope_source != "computed":
                tables = rope_tables(c, torch.outer(torch.arange(MAX_LEN).float(), inv_freq))
                for i, t in enumerate(tables):
                    self.register_buffer(f"rope_table_{i}", t, persistent=False)
        if c.pos == "alibi":
            self.register_buffer("slopes", 2.0 ** (-8.0 * torch.arange(1, HEADS + 1) / HEADS),
                                 persistent=False)

    def rope(self, positions, pos: int, n: int):
        c = self.c
        if c.rope_source == "computed":
            tables = rope_tables(c, positions[..., None].float() * self.inv_freq)
        else:
            tables = 1 if c.rope == "complex" else 2
            stored = [getattr(self, f"rope_table_{i}") for i in range(tables)]
            if c.rope_source == "table_int":
                tables = tuple(t[pos:pos + n] for t in stored)
            else:
                tables = tuple(t[positions] for t in stored)
        # now (n, f) or (B, n, f)
        if c.rope_rank == "full" and tables[0].dim() == 2:
            tables = tuple(t.unsqueeze(0) for t in tables)
        head_dim = -3 if c.rope_layout == "bhnd" else -2   # where the heads axis goes
        return tuple(t.unsqueeze(head_dim) for t in tables)

    def forward(self, tokens, cache: OffloadedKVCache, position_ids=None):
        c = self.c
        pos, n = cache.seq_len(0), tokens.shape[1]
        positions = position_ids if position_ids is not None else \
            torch.arange(pos, pos + n, device=tokens.device)
        x = self.emb(tokens)
        if c.pos == "learned":
            x = x + self.wpe(positions)
        rope = None
        if c.pos == "rope":
            rope = (self.rope(positions, pos, n), None if c.rope_keys == "new" else
                    self.rope(torch.arange(pos + n, device=tokens.device), 0, pos + n))
        q_pos = torch.arange(pos, pos + n, device=tokens.device)[:, None]
        k_pos = torch.arange(pos + n, device=tokens.device)[None, :]
        mask = q_pos >= k_pos
        if c.window:
            mask = mask & (q_pos - k_pos < c.window)
        alibi = None
        if c.pos == "alibi":
            alibi = self.slopes[:, None, None] * (k_pos - q_pos).float()
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if c.nope_odd and i % 2 else rope, mask, alibi, cache)
        return self.head(self.norm(x))


def build(c: Choices, seed: int = 0, layers: int = 2) -> ZooDecoder:
    torch.manual_seed(seed)
    return ZooDecoder(c, layers).eval()


def make_cache(model: ZooDecoder, batch: int) -> OffloadedKVCache:
    return OffloadedKVCache(len(model.blocks), batch, MAX_LEN, model.num_kv_heads, model.head_dim)


@torch.no_grad()
def run_decode(model, prompt, cache, steps, position_ids="none", poison=None):
    """Prefill logits, the logits of `steps` greedy steps and their tokens. ``poison``:
    ``{layer: rows}``: right after the prefill, fill the first ``rows`` stored positions of
    those layers' K and V with NaN."""
    b, n = prompt.shape
    kw = {"position_ids": torch.arange(n).expand(b, n)} if position_ids == "always" else {}
    prefill = model(prompt, cache, **kw)
    for layer, rows in (poison or {}).items():
        cache.k_cpu[layer][:rows].fill_(float("nan"))
        cache.v_cpu[layer][:rows].fill_(float("nan"))
    logits, tokens = [], []
    nxt = prefill[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        tokens.append(nxt)
        pos = cache.seq_len(0)
        kw = {"position_ids": torch.full((b, 1), pos)} if position_ids != "none" else {}
        out = model(nxt, cache, **kw)[:, -1]
        logits.append(out)
        nxt = out.argmax(-1, keepdim=True)
    return prefill, logits, torch.cat(tokens, 1)
