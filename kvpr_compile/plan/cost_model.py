"""Closed-form per-layer cost model of one KVPR decode step (docs/design.md, "The cost model").

Symbols: batch b, cached length s, hidden h, KV width h_kv (= kv heads * head_dim), p bytes per
element, n new tokens per step (1 when decoding), host->device bandwidth v_h2d, device->host v_d2h
(bytes/s), GEMM rate v_gpu (FLOP/s), and two device-memory rates (bytes/s, profile.py):
v_copy for strided copies and elementwise passes (bytes read + bytes written), v_read for the
layer's streaming reads (weights, K,V in attention). Per layer, with l recomputed tokens and r
resident tokens (token order: resident prefix [0, r), recomputed [r, r+l), streamed [r+l, s)):

    A(l)    = b*l*h*p / v_h2d                   ship X[:, r:r+l]
    R(l)    = 4*b*l*h*h_kv / v_gpu              recompute K,V there: two [b*l, h] x [h, h_kv] GEMMs
              + E*2*(2*b*l*h_kv*p) / v_copy     and its elementwise kernels (RoPE of the new K,
                                                casts, transposes): E read+write passes over K,V[:l]
    K(l, r) = 2*b*(s-l-r)*h_kv*p / v_h2d        ship K,V[:, r+l:]
    D       = b*n*(h + 2*h_kv)*p / v_d2h        append the new tokens' X, K, V to CPU memory
    M       = 2*(2*b*(s+n)*h_kv*p) / v_copy     assemble: read the recomputed, loaded and new K,V
                                                (strided slot views) and write them into fresh
                                                (b, heads, s+n, d) tensors; needs R and K done
    rest    = max(2*b*n*P / v_gpu, P*p / v_read) the rest of the layer: its GEMMs for the new
              + max(4*b*n*(s+n)*h / v_gpu,      tokens (FLOP- or weight-read-bound; P = 2h^2 +
                    2*b*(s+n)*h_kv*p / v_read)  2*h*h_kv + mlp, mlp = 8h^2 by default) plus
                                                attention (QK^T and AV FLOPs, or reading K,V)

E = ELEMENTWISE_PASSES (1): one read+write pass over K and V[:l], as a profiler trace of the
recompute showed (the calibration of these terms is in docs/design.md, "The cost model"). With
new_tokens = 0 (the paper's bare model) M, the elementwise part of R and rest are all 0.

Task graph. The host link and the GPU are each one serial resource; the append shares the link
with the loads (one copy queue). The GPU task ATT_i is assemble + rest (M + rest): the assemble
needs both the recompute and the loads, exactly ATT_i's predecessors, so it adds to its duration:

    link:  X_0 KV_0 X_1 KV_1 ST_0 X_2 KV_2 ST_1 ... X_{L-1} KV_{L-1} ST_{L-2} ST_{L-1}
    GPU:   RC_0 ATT_0 RC_1 ATT_1 ...                 (ATT_i = assemble + rest of layer i)
    data:  X_i -> RC_i;  RC_i, KV_i -> ATT_i;  ATT_i -> ST_i
    when layer i+1's loads may start (`overlap`):
      "row"    (the paper's row-by-row overlap): RC_i -> X_{i+1}. Layer i+1's loads are
               issued once layer i's loads and recompute are done, so they overlap layer i's
               attention and store, never its recompute. Steady state (A >= M + rest), per
               layer:  A + max(R, K + D)        (layer 0: A + max(R, K): no append before it)
               With D = rest = 0 and no memory terms this is the paper's max(A + R, A + K),
               balanced at l* = s*p*v_gpu / (2*h*v_h2d + p*v_gpu); with D at R = K + D.
      "stream" (the default; deeper pipelining): ATT_{i-1} -> X_{i+1} only (two device
               slots). The link runs ahead as far as the slots allow, so layer i's recompute
               overlaps layer i+1's loads. Steady state: max(A + K + D, R + M + rest).
      Both give l = 0 when h >= 2*h_kv (X is then no smaller than K+V, and recompute only adds
      GPU time).

`finish_times()` evaluates this task graph forward (finish = max over predecessors + duration);
taskgraph.py builds the same graph in networkx (its longest path is the same number) and the LP
in latency_lp.py encodes it with finish-time variables. throughput_graph.py uses the same
per-token recompute, assemble and rest terms (`recompute_s_per_token`, `assemble_s`,
`rest_s` below).

D sharing the link is conservative (PCIe is full duplex).

CPU co-attention (only with a host attention rate v_cpu, bytes of K,V attended per second; terms
in cpu_terms.py): u_i more tokens per layer, the last u of the store's range [r+l, s) attended
on the host where they lie, so KV_i ships s-l-r-u tokens and the GPU attends (and assembles)
u fewer positions. One more serial resource, the host, runs per layer with u_i > 0
    CPU_i = F + C(u),  C(u) = 2*b*u*h_kv*p / v_cpu,  F = Q projection + the query's D2H + the
            result's H2D + the measured round trip (host waits)
    CPU_i starts after ATT_{i-1} (the layer's input, hence its query, exists) and after CPU_{i-1}
    (one host worker; implied here by the query's wait, as ATT_{i-1} follows CPU_{i-1}); ATT_i's
    part after the merge (merge + O projection + MLP: `post_merge_s`) waits for it:
    finish(ATT_i) >= finish(CPU_i) + post_merge_s.
A layer then costs about max(link, GPU, CPU + round trip + post_merge_s). With u_i = 0 there is
no CPU task and the graph above is unchanged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from .profile import dtype_key

_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
OVERLAPS = ("row", "stream")
DEFAULT_OVERLAP = "stream"
# Read+write passes over K,V[:l] by the recompute's elementwise kernels (RoPE on the recomputed K,
# casts, transposes), at the strided-copy rate (docs/design.md, "The cost model").
ELEMENTWISE_PASSES = 1
# The cached length the backend plans at: a graph is dynamic in the length, and l/s hardly
# depends on s (plan/latency_ratios.py), so one plan serves every length.
REPRESENTATIVE_SEQ_LEN = 4096
KV_SLOTS = 2       # double-buffered K,V load slots (runtime/slots.py)
ASSEMBLED_KV = 1   # one layer's assembled K,V alive while attention reads it


def bytes_per_element(dtype: torch.dtype | str) -> int:
    return _BYTES[dtype_key(dtype)]


def x_bytes_per_token(batch: int, hidden: int, p: int) -> int:
    """Bytes of X (the K/V projections' input) per cached token position, whole batch."""
    return batch * hidden * p


def kv_bytes_per_token(batch: int, kv_hidden: int, p: int) -> int:
    """Bytes of K and V per cached token position, whole batch (also the resident cost)."""
    return 2 * batch * kv_hidden * p


def store_bytes(batch: int, hidden: int, kv_hidden: int, p: int, new_tokens: int = 1) -> int:
    """Bytes appended to CPU memory per layer per step: the new tokens' X, K and V."""
    return batch * new_tokens * (hidden + 2 * kv_hidden) * p


def recompute_flops_per_token(batch: int, hidden: int, kv_hidden: int) -> int:
    """FLOPs to rebuild K and V of one token position from X: 2 GEMMs of 2*b*h*h_kv."""
    return 4 * batch * hidden * kv_hidden


def layer_params(hidden: int, kv_hidden: int, mlp_params: int | None = None) -> int:
    """Weights of one decoder layer: Q and O (h^2 each), K and V (h*h_kv each), MLP (8h^2 unless
    given, i.e. two h x 4h matrices)."""
    mlp = 8 * hidden * hidden if mlp_params is None else mlp_params
    return 2 * hidden * hidden + 2 * hidden * kv_hidden + mlp


def rest_flops(batch: int, seq_len: int, hidden: int, kv_hidden: int, new_tokens: int = 1,
               mlp_params: int | None = None) -> int:
    """FLOPs of the layer besides recompute: GEMMs for the new tokens + attention over s+n."""
    return (_gemm_flops(batch, hidden, kv_hidden, new_tokens, mlp_params)
            + _attention_flops(batch, seq_len, hidden, new_tokens))


def _gemm_flops(batch, hidden, kv_hidden, new_tokens, mlp_params) -> int:
    return 2 * batch * new_tokens * layer_params(hidden, kv_hidden, mlp_params)


def _attention_flops(batch, seq_len, hidden, new_tokens) -> int:
    return 4 * batch * new_tokens * (seq_len + new_tokens) * hidden


def recompute_s_per_token(batch: int, hidden: int, kv_hidden: int, p: int, flops_per_s: float,
                          copy_bytes_per_s: float) -> float:
    """R per recomputed token: the two K,V GEMMs plus ELEMENTWISE_PASSES read+write passes over
    the token's K and V (strided-copy rate)."""
    gemm = recompute_flops_per_token(batch, hidden, kv_hidden) / flops_per_s
    elementwise = ELEMENTWISE_PASSES * 2 * kv_bytes_per_token(batch, kv_hidden, p)
    return gemm + elementwise / copy_bytes_per_s


def assemble_s(batch: int, seq_len: int, kv_hidden: int, p: int, copy_bytes_per_s: float,
               new_tokens: int = 1) -> float:
    """M: read and write K and V of all s+n positions into fresh tensors (strided-copy rate)."""
    return 2 * kv_bytes_per_token(batch, kv_hidden, p) * (seq_len + new_tokens) / copy_bytes_per_s


def rest_s(batch: int, seq_len: int, hidden: int, kv_hidden: int, p: int, flops_per_s: float,
           read_bytes_per_s: float, new_tokens: int = 1, mlp_params: int | None = None) -> float:
    """The rest of the layer: its GEMMs for the new tokens (FLOP-bound or bound by reading the
    weights) plus attention over s+n positions (FLOP-bound or bound by reading K,V)."""
    if new_tokens == 0:
        return 0.0
    gemms = max(_gemm_flops(batch, hidden, kv_hidden, new_tokens, mlp_params) / flops_per_s,
                layer_params(hidden, kv_hidden, mlp_params) * p / read_bytes_per_s)
    kv_read = kv_bytes_per_token(batch, kv_hidden, p) * (seq_len + new_tokens)
    attention = max(_attention_flops(batch, seq_len, hidden, new_tokens) / flops_per_s,
                    kv_read / read_bytes_per_s)
    return gemms + attention


@dataclass(frozen=True)
class LayerCoefficients:
    """Everything the task graph needs about one layer, as linear coefficients in (l, r).

    Bytes are per layer; times in seconds. Layers of a decoder are identical, so one instance
    describes all of them.
    """

    seq_len: int
    x_bytes_per_token: int
    kv_bytes_per_token: int
    store_bytes: int
    x_s_per_token: float          # A = x_s_per_token * l
    kv_s_per_token: float         # K = kv_s_per_token * (s - l - r)
    recompute_s_per_token: float  # R = recompute_s_per_token * l (GEMMs + elementwise)
    store_s: float                # D
    rest_s: float                 # rest
    assemble_s: float = 0.0       # M
    recompute_gemm_s_per_token: float = 0.0  # the GEMM part of recompute_s_per_token
    # CPU co-attention (cpu_terms.py; all 0 without a host rate): C(u) = cpu_s_per_token * u,
    # F = cpu_fixed_s, the part of ATT after the merge, and what the GPU saves per position the
    # host attends (its assemble and attention reads)
    cpu_s_per_token: float = 0.0
    cpu_fixed_s: float = 0.0
    post_merge_s: float = 0.0
    gpu_kv_s_per_token: float = 0.0

    @property
    def attention_s(self) -> float:
        """The GPU task after recompute and loads: assemble + rest of the layer (M + rest)."""
        return self.assemble_s + self.rest_s

    @property
    def has_cpu(self) -> bool:
        """Whether a host attention rate is known (else no token may go to the CPU)."""
        return self.cpu_s_per_token > 0

    def gpu_attention_s(self, u: float = 0) -> float:
        """ATT with u positions attended on the host: M + rest less their assemble and reads."""
        return self.attention_s - self.gpu_kv_s_per_token * u

    def cpu_s(self, u: float) -> float:
        """CPU_i: F + C(u) for u > 0; no task (0) for u = 0."""
        return self.cpu_fixed_s + self.cpu_s_per_token * u if u > 0 else 0.0

    def x_load_s(self, l: float) -> float:
        return self.x_s_per_token * l

    def recompute_s(self, l: float) -> float:
        return self.recompute_s_per_token * l

    def kv_load_s(self, l: float, r: float = 0, u: float = 0) -> float:
        return self.kv_s_per_token * (self.seq_len - l - r - u)

    def h2d_bytes(self, l: int, r: int = 0, u: int = 0) -> int:
        return self.x_bytes_per_token * l + self.kv_bytes_per_token * (self.seq_len - l - r - u)

    def to_dict(self) -> dict:
        return asdict(self)


def layer_coefficients(profile, *, batch_size: int, seq_len: int, hidden_size: int,
                       kv_hidden_size: int, dtype: torch.dtype | str, new_tokens: int = 1,
                       mlp_params: int | None = None) -> LayerCoefficients:
    """Coefficients of the model above for `profile` (anything with h2d_bytes_per_s,
    d2h_bytes_per_s, mem_copy_bytes_per_s, mem_read_bytes_per_s and flops(dtype)).
    new_tokens=0 is the paper's bare model: no append, no rest, no memory terms."""
    p = bytes_per_element(dtype)
    v_h2d, v_d2h, v_gpu = profile.h2d_bytes_per_s, profile.d2h_bytes_per_s, profile.flops(dtype)
    v_copy, v_read = profile.mem_copy_bytes_per_s, profile.mem_read_bytes_per_s
    xb = x_bytes_per_token(batch_size, hidden_size, p)
    kvb = kv_bytes_per_token(batch_size, kv_hidden_size, p)
    stb = store_bytes(batch_size, hidden_size, kv_hidden_size, p, new_tokens)
    gemm = recompute_flops_per_token(batch_size, hidden_size, kv_hidden_size) / v_gpu
    bare = new_tokens == 0
    return LayerCoefficients(
        seq_len=seq_len,
        x_bytes_per_token=xb,
        kv_bytes_per_token=kvb,
        store_bytes=stb,
        x_s_per_token=xb / v_h2d,
        kv_s_per_token=kvb / v_h2d,
        recompute_s_per_token=gemm if bare else recompute_s_per_token(
            batch_size, hidden_size, kv_hidden_size, p, v_gpu, v_copy),
        store_s=stb / v_d2h,
        rest_s=rest_s(batch_size, seq_len, hidden_size, kv_hidden_size, p, v_gpu, v_read,
                      new_tokens, mlp_params),
        assemble_s=0.0 if bare else assemble_s(batch_size, seq_len, kv_hidden_size, p, v_copy,
                                               new_tokens),
        recompute_gemm_s_per_token=gemm,
    )


@dataclass(frozen=True)
class FinishTimes:
    """Finish times (seconds from the step's start) of every task of the task graph."""

    x_load: list[float]
    recompute: list[float]
    kv_load: list[float]
    attention: list[float]
    store: list[float]
    cpu: list[float] = field(default_factory=list)   # CPU_i's finish (0: no CPU task)

    @property
    def total(self) -> float:
        return self.store[-1]  # the last append ends the step: it follows every link task and ATT

    @property
    def layer_times(self) -> list[float]:
        """Layer i's share: the gap between consecutive attention finishes."""
        return [b - a for a, b in zip([0.0] + self.attention[:-1], self.attention)]

    @property
    def tail(self) -> float:
        return self.total - self.attention[-1]


def check_overlap(overlap: str) -> str:
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")
    return overlap


def finish_times(c: LayerCoefficients, recompute_tokens: Sequence[float],
                 resident_tokens: Sequence[float] | None = None, overlap: str = DEFAULT_OVERLAP,
                 cpu_tokens: Sequence[float] | None = None) -> FinishTimes:
    """Walk the task graph above forward for per-layer l_i (recompute), r_i (resident) and u_i
    (attended on the host; None: none)."""
    check_overlap(overlap)
    n = len(recompute_tokens)
    resident_tokens = list(resident_tokens) if resident_tokens is not None else [0] * n
    cpu_tokens = list(cpu_tokens) if cpu_tokens is not None else [0] * n
    if len(resident_tokens) != n or len(cpu_tokens) != n or n == 0:
        raise ValueError("need one recompute, resident and CPU count per layer (at least one "
                         "layer)")
    check_counts(c, recompute_tokens, resident_tokens, cpu_tokens)
    fx, frc, fkv, fatt, fst, fcpu = ([0.0] * n for _ in range(6))
    host_free = 0.0
    for i, (l, r, u) in enumerate(zip(recompute_tokens, resident_tokens, cpu_tokens)):
        link_free = 0.0 if i == 0 else (fkv[0] if i == 1 else fst[i - 2])
        if overlap == "row":
            window = frc[i - 1] if i else 0.0
        else:
            window = fatt[i - 2] if i >= 2 else 0.0
        fx[i] = max(link_free, window) + c.x_load_s(l)
        frc[i] = max(fx[i], fatt[i - 1] if i else 0.0) + c.recompute_s(l)
        fkv[i] = fx[i] + c.kv_load_s(l, r, u)
        fatt[i] = max(frc[i], fkv[i]) + c.gpu_attention_s(u)
        if u > 0:
            fcpu[i] = host_free = max(fatt[i - 1] if i else 0.0, host_free) + c.cpu_s(u)
            fatt[i] = max(fatt[i], fcpu[i] + c.post_merge_s)
        if i:
            fst[i - 1] = max(fatt[i - 1], fkv[i]) + c.store_s
    fst[n - 1] = max(fatt[n - 1], fst[n - 2] if n > 1 else fkv[0]) + c.store_s
    return FinishTimes(fx, frc, fkv, fatt, fst, fcpu)


def check_counts(c: LayerCoefficients, recompute_tokens, resident_tokens, cpu_tokens) -> None:
    """ValueError unless every layer has 0 <= l, r, u and l + r + u <= s, and u = 0 where no
    host rate is known."""
    for l, r, u in zip(recompute_tokens, resident_tokens, cpu_tokens):
        if l < 0 or r < 0 or u < 0 or l + r + u > c.seq_len:
            raise ValueError(f"need 0 <= l, r, u and l + r + u <= s={c.seq_len}; got l={l}, "
                             f"r={r}, u={u} (recompute, resident, CPU tokens)")
        if u > 0 and not c.has_cpu:
            raise ValueError(f"{u} tokens attended on the CPU, but these coefficients have no "
                             f"host attention rate")


def step_times(c: LayerCoefficients, recompute_tokens: Sequence[float],
               resident_tokens: Sequence[float] | None = None, overlap: str = DEFAULT_OVERLAP,
               cpu_tokens: Sequence[float] | None = None) -> tuple[list[float], float]:
    """Per-layer times and the tail (after the last attention); they sum to the step time."""
    done = finish_times(c, recompute_tokens, resident_tokens, overlap, cpu_tokens)
    return done.layer_times, done.tail


def step_time(c: LayerCoefficients, recompute_tokens: Sequence[float],
              resident_tokens: Sequence[float] | None = None, overlap: str = DEFAULT_OVERLAP,
              cpu_tokens: Sequence[float] | None = None) -> float:
    return finish_times(c, recompute_tokens, resident_tokens, overlap, cpu_tokens).total


def link_time(c: LayerCoefficients, profile, recompute_tokens: Sequence[int],
              resident_tokens: Sequence[int] | None = None,
              cpu_tokens: Sequence[int] | None = None) -> float:
    """The physical limit: all bytes the step moves over the link divided by its bandwidths
    (the CPU share's query and result, a few KB per layer, left out)."""
    if resident_tokens is None:
        resident_tokens = [0] * len(recompute_tokens)
    if cpu_tokens is None:
        cpu_tokens = [0] * len(recompute_tokens)
    h2d = sum(c.h2d_bytes(l, r, u)
              for l, r, u in zip(recompute_tokens, resident_tokens, cpu_tokens))
    d2h = c.store_bytes * len(recompute_tokens)
    return h2d / profile.h2d_bytes_per_s + d2h / profile.d2h_bytes_per_s


def closed_form_recompute_tokens(seq_len: int, hidden: int, kv_hidden: int, p: int,
                                 h2d_bytes_per_s: float, flops_per_s: float,
                                 copy_bytes_per_s: float | None = None) -> float:
    """The balance R = K of one layer (layer 0 under the row overlap), clamped to [0, s]; 0 when
    h >= 2*h_kv (X is then no smaller than K+V, so shipping X never pays). Per batch row and
    token, k = 2*h_kv*p / v_h2d, g = 4*h*h_kv / v_gpu, e = ELEMENTWISE_PASSES*4*h_kv*p / v_copy:
    l = s*k / (g + e + k). Without copy_bytes_per_s (e = 0) this is the paper's
    l* = s*p*v_gpu / (2*h*v_h2d + p*v_gpu)."""
    if hidden >= 2 * kv_hidden:
        return 0.0
    k = 2 * kv_hidden * p / h2d_bytes_per_s
    g = 4 * hidden * kv_hidden / flops_per_s
    e = (0.0 if copy_bytes_per_s is None
         else ELEMENTWISE_PASSES * 4 * kv_hidden * p / copy_bytes_per_s)
    l = seq_len * k / (g + e + k)
    return min(max(l, 0.0), float(seq_len))


def balanced_recompute_tokens(c: LayerCoefficients, resident: float = 0,
                              after_store: bool = True, overlap: str = DEFAULT_OVERLAP) -> float:
    """The steady-state optimum of one layer in closed form, clamped to [0, s - r], 0 when X
    costs no less than K+V per token (a, k, g: per-token A, K, R costs; f = s - r):
      "row":    R = K + D             -> l = (D + k*f) / (g + k)   (valid while A >= M + rest;
                layer 0 has no append before it, `after_store=False`: the paper's l*)
      "stream": A + K + D = R + M + rest -> l = (k*f + D - M - rest) / (g + k - a)
    (g counts the recompute's GEMMs and elementwise passes, rest + M is `attention_s`)
    Layers 0 < i < L-1 of the LP's plan sit at this point (within rounding)."""
    check_overlap(overlap)
    free = c.seq_len - resident
    a, k, g = c.x_s_per_token, c.kv_s_per_token, c.recompute_s_per_token
    if a >= k:
        return 0.0
    d = c.store_s if after_store else 0.0
    if overlap == "row":
        l = (d + k * free) / (g + k)
    else:
        l = (k * free + d - c.attention_s) / (g + k - a)
    return min(max(l, 0.0), float(free))


def working_set_bytes(c: LayerCoefficients, x_tokens: int, new_tokens: int = 1) -> int:
    """Device memory the double-buffered pipeline needs outside resident prefixes: two slots of
    K,V for s+n positions and one layer's assembled K,V (what attention reads; the whole
    length), and two X staging slots of `x_tokens` positions."""
    return (KV_SLOTS + ASSEMBLED_KV) * c.kv_bytes_per_token * (c.seq_len + new_tokens) \
        + 2 * c.x_bytes_per_token * x_tokens
