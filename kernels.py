"""kernels.py -- the two fast kernels every stage shares: causal flash attention and Mixture-of-Experts.

Every stage of the pipeline runs the same decoder-only Transformer, and two operations dominate its
time: attention and, when the model has MoE layers, the experts' MLPs. This file holds a Triton
kernel for each, a plain PyTorch version of each, and the small dispatch that picks between them.

Attention (FlashAttention-2, Dao 2023)
  * Online softmax: a program owns a block of queries, walks the keys block by block, and keeps a
    running row maximum m and row sum l, rescaling its output accumulator whenever m grows. The
    (T x T) score matrix never exists in memory, only one (BLOCK_M x BLOCK_N) tile at a time.
  * exp2 instead of exp: log2(e) is folded into the softmax scale, so every exponential is a
    single hardware exp2.
  * Recomputation: the forward saves only the output and the log-sum-exp per row. The backward
    recomputes each probability tile from Q, K and that log-sum-exp instead of storing P.
  * Grouped-query attention through indexing: query head h reads key/value head h // (H // Hkv)
    through strides; K and V are never repeated in memory. In the backward one program per key
    block loops over all query heads of its group, so dK and dV need no atomics.
  * Causal masks are bottom-right aligned (query i of Tq sits at position Tk - Tq + i), so the
    same kernel trains (Tq == Tk) and decodes against a KV cache (Tq < Tk). Ragged lengths are
    masked inside the kernel; key blocks entirely in the future are skipped, and only the blocks
    that straddle the diagonal or the end of the sequence pay for a mask.

Mixture-of-Experts (top-k routing, SwiGLU experts)
  * route() picks each token's top-k experts from a softmax over router logits; an optional
    per-expert bias (DeepSeek-V3's auxiliary-loss-free balancing) shifts the choice only.
  * The N*k (token, expert) assignments are sorted by expert, so each expert's tokens form one
    contiguous segment. A grouped GEMM then runs every expert in a single launch: each program owns
    a (row block, column block) tile of one expert's segment, looked up in a schedule built on the
    GPU with torch ops (no host synchronisation, no Python loop over experts).
  * Forward: one kernel computes gate and up projections together and applies SiLU(g) * u in its
    epilogue; a second computes the down projection. Backward: the same grouped GEMM through
    transposed weights (by swapping strides) gives dH, with the SwiGLU derivative fused into its
    epilogue, and dX; a per-expert reduction kernel gives the weight gradients (zero for experts
    that received no tokens).

Dispatch
  BACKEND is "auto" (default), "torch" or "triton"; the environment variable HIWT_KERNELS sets its
  initial value and set_backend() changes it. "auto" uses Triton when it imports and the tensors
  are on a CUDA device, and the PyTorch functions otherwise (CPU, or head dims the kernel does not
  support); inside torch.compile, "auto" attention is PyTorch's (see attention). "torch" forces the PyTorch functions, for comparison. "triton" forces the kernels; on a
  CPU that only works under the Triton interpreter (TRITON_INTERPRET=1), which is how the tests run.

Precision
  fp32 inputs: on an NVIDIA GPU every tl.dot runs in TF32 (Triton's default, kept on purpose: the
  stages let cuBLAS do the same, torch.backends.cuda.matmul.allow_tf32), so fp32 results carry
  about 1e-3 relative error (2.9e-3 on an H200, `--check`, whose fp32 limit on CUDA is 1e-2); the
  interpreter computes them in full fp32. bf16 and fp16 inputs accumulate in fp32.

`python kernels.py --bench` times both kernels on a CUDA GPU; `python kernels.py --check` compares
them with the references on whatever device is present; `python kernels.py --compile-report [90]`
compiles them for a GPU of that compute capability on any Linux machine, no GPU needed, and prints
each kernel's registers, spills and shared memory.
"""
import argparse
import contextlib
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # no Triton wheel (macOS, Windows): the PyTorch paths still work
    HAS_TRITON = False

    class _NoTriton:  # stands in for triton and triton.language so the kernel definitions below parse
        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()

# Under the interpreter every program runs one after another in numpy: small tiles keep it quick
# and make even tiny test shapes cross several blocks.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The GPU's compute capability as one number (90 = H100), read once here rather than in the kernels'
# autograd Functions, which torch.compile traces; --compile-report sets it to the GPU it compiles for.
_CAPABILITY = (lambda c: 10 * c[0] + c[1])(torch.cuda.get_device_capability()) if torch.cuda.is_available() else 0

_BACKENDS = ("auto", "torch", "triton")
BACKEND = os.environ.get("HIWT_KERNELS", "auto")
if BACKEND not in _BACKENDS:
    raise ValueError(f"HIWT_KERNELS must be one of {', '.join(_BACKENDS)}, not {BACKEND!r}")


def set_backend(name: str) -> None:
    """Choose the kernels: "auto" (Triton on CUDA, PyTorch elsewhere), "torch" or "triton"."""
    global BACKEND
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, not {name!r}")
    BACKEND = name


def _use_triton(x: torch.Tensor, unsupported: str | None = None) -> bool:
    """Whether to run the Triton kernel on x. `unsupported` names why the kernel cannot take this
    input (None if it can): "auto" then falls back to PyTorch, "triton" refuses loudly."""
    if BACKEND == "torch":
        return False
    if BACKEND == "triton":
        if not HAS_TRITON:
            raise RuntimeError("BACKEND is 'triton' but triton is not installed")
        if unsupported:
            raise ValueError(f"the Triton kernel does not support this input: {unsupported}")
        return True
    return HAS_TRITON and x.is_cuda and unsupported is None


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_for_triton(*tensors):
    """Under torch.autocast, hand the Triton kernels autocast's low-precision dtype, as F.linear and
    SDPA would use it (parameters stay fp32 under autocast). The casts are differentiable. The
    PyTorch path needs none of this: its matmuls and SDPA autocast themselves."""
    device = tensors[0].device.type
    might_use_triton = BACKEND == "triton" or (BACKEND == "auto" and HAS_TRITON and device == "cuda")
    if not (might_use_triton and torch.is_autocast_enabled(device)):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)

# ============================================================================================
# Attention: PyTorch versions
# ============================================================================================


def padded_causal_mask(Tq, Tk, key_start):
    """(B, 1, Tq, Tk) bool: which keys each query sees when row b's keys before key_start[b] are left
    padding. Query i sits at position Tk - Tq + i and sees keys key_start..Tk - Tq + i; a padding
    query sees only itself, so that no row of the softmax is empty (its output is never used)."""
    rows = torch.arange(Tk - Tq, Tk, device=key_start.device)[None, :, None]          # (1, Tq, 1)
    cols = torch.arange(Tk, device=key_start.device)[None, None, :]                    # (1, 1, Tk)
    first = torch.minimum(key_start.long()[:, None, None], rows)                       # (B, Tq, 1)
    return ((cols <= rows) & (cols >= first))[:, None]


def attention_reference(q, k, v, causal=True, key_start=None):
    """Attention written out in full: the test oracle. Works in any dtype, float64 included.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D). Computes in float32 (float64 if given float64)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k.to(work).repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, D): head h reads kv head h // G
    v = v.to(work).repeat_interleave(H // Hkv, dim=1)
    scores = q.to(work) @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, Tq, Tk)
    if key_start is not None:
        scores = scores.masked_fill(~padded_causal_mask(Tq, Tk, key_start), float("-inf"))
    elif causal:
        # query i sits at absolute position Tk - Tq + i and sees keys 0 .. Tk - Tq + i
        visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)


def attention_torch(q, k, v, causal=True, key_start=None):
    """PyTorch's fused attention (the CPU path): same contract as attention()."""
    Tq, Tk = q.shape[2], k.shape[2]
    mask, is_causal = None, False
    if key_start is not None:
        mask = padded_causal_mask(Tq, Tk, key_start)
    elif causal and Tq == Tk:
        is_causal = True  # SDPA's own causal flag is top-left aligned, which is right only when Tq == Tk
    elif causal and Tq > 1:  # a single query is the newest position and sees the whole cache
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


# ============================================================================================
# Attention: Triton kernels
# ============================================================================================

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # 16 is the smallest tl.dot accepts (the tiny presets use it)

# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) for each kernel. Starting points from the
# Triton tutorial's H100 choices, cut down until no kernel spills registers or overflows shared
# memory when compiled for sm_80 (A100), sm_89 (RTX 4090, L4) and sm_90 (H100) by Triton 3.6 and 3.9
# (`python kernels.py --compile-report CAPABILITY`). The dK/dV kernel holds two fp32 (BLOCK_N x D)
# accumulators besides K and V, and with grouped-query heads it also carries the loop over the
# group, so it gets the smallest tiles. Not yet timed on a GPU (`--bench` does that).
_ATTN_TILES = {
    16: dict(fwd=(128, 64, 8, 3), decode=(16, 64, 4, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 8, 3)),
    32: dict(fwd=(128, 64, 8, 3), decode=(16, 64, 4, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 8, 3)),
    64: dict(fwd=(128, 64, 8, 3), decode=(16, 64, 4, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 8, 3)),
    128: dict(fwd=(128, 64, 8, 3), decode=(16, 64, 4, 3), dkdv=(32, 64, 8, 2), dq=(128, 32, 8, 3)),
}
# Hopper (sm_90) replacements, timed on an H200 (`scripts/tune_attention.py`, 2026-11-30): at D = 128
# the backward ran 1.54x faster with 4-warp dK/dV tiles and 8% faster again with 64-key dQ tiles. On
# sm_80/89 they spill, so those keep the tiles above. The grouped-query dK/dV build spills 332 bytes
# on sm_90 as well, and was still measured 1.54x faster there: the report lists it as measured.
_ATTN_TILES_SM90 = {128: dict(dkdv=(32, 64, 4, 3), dq=(128, 64, 8, 3))}
_MEASURED_SPILLS = {(90, "_attn_bwd_dkdv_kernel", 128)}  # (capability, kernel, D): spills timed and kept
# fp32 tiles take twice the shared memory and registers: smaller tiles, fewer pipeline stages.
_ATTN_TILES_FP32 = {
    16: dict(fwd=(64, 32, 4, 2), decode=(16, 64, 4, 2), dkdv=(16, 128, 8, 2), dq=(64, 32, 4, 2)),
    32: dict(fwd=(64, 32, 4, 2), decode=(16, 64, 4, 2), dkdv=(16, 128, 8, 2), dq=(64, 32, 4, 2)),
    64: dict(fwd=(64, 32, 4, 2), decode=(16, 64, 4, 2), dkdv=(16, 128, 8, 2), dq=(64, 32, 4, 2)),
    128: dict(fwd=(64, 32, 4, 2), decode=(16, 64, 4, 2), dkdv=(16, 32, 4, 2), dq=(32, 32, 4, 2)),
}
# Interpreter tiles: BLOCK_M != BLOCK_N on purpose, so the diagonal bookkeeping is exercised.
_ATTN_TILES_INTERPRET = dict(fwd=(16, 32, 1, 1), decode=(16, 32, 1, 1), dkdv=(16, 32, 1, 1), dq=(32, 16, 1, 1))


def _attn_tiles(head_dim, dtype):
    if _INTERPRET:
        return _ATTN_TILES_INTERPRET
    if dtype == torch.float32:
        return _ATTN_TILES_FP32[head_dim]
    if _CAPABILITY >= 90:
        return {**_ATTN_TILES[head_dim], **_ATTN_TILES_SM90.get(head_dim, {})}
    return _ATTN_TILES[head_dim]


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, offs_n,
                    lo, hi, Tk, causal_offset, key_start, qk_scale,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """Fold key blocks lo, lo+BLOCK_N, .. < hi into the running softmax of one query block.
    MASKED is False for blocks every query sees in full (no mask work), True for the rest.
    Keys before key_start are left padding (0 when there is none; see padded_causal_mask)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,) key positions
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kt, mask=cols[:, None] < Tk, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vt, mask=cols[:, None] < Tk, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kt)
            v = tl.load(v_ptrs + start_n * stride_vt)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N) scores in log2 units
        if MASKED:
            visible = cols[None, :] < Tk
            if CAUSAL:
                position = rows[:, None] + causal_offset
                visible = visible & (cols[None, :] <= position)
                visible = visible & (cols[None, :] >= tl.minimum(position, key_start))
            s = tl.where(visible, s, float("-inf"))
        # Online softmax: raise the row maximum, rescale what was summed under the old one.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_new
        if MASKED:
            # A row that has seen only padding so far has max -inf: subtract 0 there, not -inf.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _block_and_head(n_blocks, n_heads):
    """The programs of a flat grid, n_blocks * heads * batch (CUDA allows 2**31 - 1 programs on a
    grid's first axis but 65,535 on the others, which batched decoding can pass): this program's
    block, batch row, head and batch * heads + head, blocks varying fastest, so that neighbouring
    programs share one head's keys and values in cache."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // n_blocks
    return (pid % n_blocks).to(tl.int32), bh // n_heads, bh % n_heads, bh


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, KEY_START,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                     n_heads, group_size, Tq, Tk, qk_scale,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HEAD_DIM: tl.constexpr, PADDED: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head). Writes O and the row log-sum-exp (log2).
    PADDED: KEY_START holds each batch row's first real key (left padding before it)."""
    # torch.compile passes Python floats as fp64 scalars, which would make the accumulators fp64.
    qk_scale = tl.cast(qk_scale, tl.float32)
    # Causal query blocks near the end do the most work: launch them first so that the GPU is not
    # left finishing a few long programs at the end.
    n_blocks = tl.cdiv(Tq, BLOCK_M)
    block, b, h, bh = _block_and_head(n_blocks, n_heads)
    start_m = (n_blocks - 1 - block) * BLOCK_M
    h_kv = h // group_size  # GQA: the key/value head this query head shares
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                mask=rows[:, None] < Tq, other=0.0)
    k_ptrs = K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    causal_offset = Tk - Tq  # query row r sits at absolute position r + causal_offset
    key_start = 0
    if PADDED:
        key_start = tl.load(KEY_START + b).to(tl.int32)
    if CAUSAL:
        # Keys 0..start_m + causal_offset are visible to every row of this block: no mask there.
        full_end = (start_m + causal_offset + 1) // BLOCK_N * BLOCK_N
        # Keys past the last row's position are never visible: those blocks are skipped.
        end = tl.minimum(start_m + BLOCK_M + causal_offset, Tk)
    else:
        full_end = Tk // BLOCK_N * BLOCK_N
        end = Tk
    # Blocks holding left padding take the masked path; with no padding this range is empty.
    pad_end = tl.minimum((key_start + BLOCK_N - 1) // BLOCK_N * BLOCK_N, full_end)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, offs_n,
                                    0, pad_end, Tk, causal_offset, key_start, qk_scale, BLOCK_N, True, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, offs_n,
                                    pad_end, full_end, Tk, causal_offset, key_start, qk_scale, BLOCK_N, False,
                                    CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, offs_n,
                                    full_end, end, Tk, causal_offset, key_start, qk_scale, BLOCK_N, True, CAUSAL)
    # Every valid row saw key 0, so l_i > 0 and nothing here divides by zero.
    acc = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=rows[:, None] < Tq)
    tl.store(LSE + bh * Tq + rows, m_i + tl.log2(l_i), mask=rows < Tq)


@triton.jit
def _attn_bwd_delta_kernel(O, dO, Delta, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt,
                           n_heads, Tq, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Delta = rowsum(O * dO): the term the softmax backward subtracts, computed once per row."""
    block, b, h, bh = _block_and_head(tl.cdiv(Tq, BLOCK_M), n_heads)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
                mask=rows[:, None] < Tq, other=0.0).to(tl.float32)
    do = tl.load(dO + b * stride_db + h * stride_dh + rows[:, None] * stride_dt + offs_d[None, :],
                 mask=rows[:, None] < Tq, other=0.0).to(tl.float32)
    tl.store(Delta + bh * Tq + rows, tl.sum(o * do, 1), mask=rows < Tq)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dt,
                         offs_m, cols, lo, hi, Tq, causal_offset, qk_scale,
                         BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    """Add query blocks lo.. < hi of one head to the dK, dV of one key block. Works transposed,
    (keys x queries), so the key block stays the row dimension throughout."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        # Rows past Tq load q = dO = lse = delta = 0, so they add exactly nothing below.
        q = tl.load(q_ptrs + start_m * stride_qt, mask=rows[:, None] < Tq, other=0.0)
        do = tl.load(do_ptrs + start_m * stride_dt, mask=rows[:, None] < Tq, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=rows < Tq, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=rows < Tq, other=0.0)
        # Recompute P^T from the saved log-sum-exp instead of having stored it.
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if MASKED:
            p_t = tl.where(cols[:, None] <= rows[None, :] + causal_offset, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)  # dV = P^T dO
        dp_t = tl.dot(v, tl.trans(do))  # dP^T = V dO^T
        ds_t = p_t * (dp_t - delta[None, :])  # softmax backward: dS = P * (dP - rowsum(dO * O))
        dk += tl.dot(ds_t.to(q.dtype), q)  # dK = dS^T Q (times the scale, applied once at the end)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, dO, LSE, Delta, dK, dV,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_db, stride_dh, stride_dt,
                          stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                          n_heads, n_kv_heads, group_size, Tq, Tk, qk_scale, sm_scale,
                          CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          HEAD_DIM: tl.constexpr):
    """One program: dK and dV of BLOCK_N keys of one (batch, kv head), summed over the query
    heads that share it. Each program owns its output rows, so no atomics are needed."""
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 if compiled
    block, b, h_kv, _ = _block_and_head(tl.cdiv(Tk, BLOCK_N), n_kv_heads)
    start_n = block * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + cols[:, None] * stride_kt + offs_d[None, :],
                mask=cols[:, None] < Tk, other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + cols[:, None] * stride_vt + offs_d[None, :],
                mask=cols[:, None] < Tk, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    causal_offset = Tk - Tq
    if CAUSAL:
        # Query rows before start_n - causal_offset see none of these keys: start at that block.
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
        # From row start_n + BLOCK_N - 1 - causal_offset on, every row sees every key here: no mask.
        mid = tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0)
        mid = tl.minimum((mid + BLOCK_M - 1) // BLOCK_M * BLOCK_M, Tq)
    else:
        lo = 0
        mid = 0
    for g in range(group_size):
        h = h_kv * group_size + g
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = dO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :]
        lse_ptr = LSE + (b * n_heads + h) * Tq
        delta_ptr = Delta + (b * n_heads + h) * Tq
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dt,
                                      offs_m, cols, lo, mid, Tq, causal_offset, qk_scale, BLOCK_M, True)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dt,
                                      offs_m, cols, mid, Tq, Tq, causal_offset, qk_scale, BLOCK_M, False)
    tl.store(dK + b * stride_dkb + h_kv * stride_dkh + cols[:, None] * stride_dkt + offs_d[None, :],
             (dk * sm_scale).to(dK.dtype.element_ty), mask=cols[:, None] < Tk)
    tl.store(dV + b * stride_dvb + h_kv * stride_dvh + cols[:, None] * stride_dvt + offs_d[None, :],
             dv.to(dV.dtype.element_ty), mask=cols[:, None] < Tk)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, offs_n,
                       lo, hi, Tk, causal_offset, qk_scale,
                       BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """Add key blocks lo.. < hi to dQ of one query block (same block ranges as the forward)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kt, mask=cols[:, None] < Tk, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vt, mask=cols[:, None] < Tk, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kt)
            v = tl.load(v_ptrs + start_n * stride_vt)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = cols[None, :] < Tk
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
            p = tl.where(visible, p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)  # dQ = dS K (times the scale, applied at the end)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, dO, LSE, Delta, dQ,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_db, stride_dh, stride_dt,
                        stride_dqb, stride_dqh, stride_dqt,
                        n_heads, group_size, Tq, Tk, qk_scale, sm_scale,
                        CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HEAD_DIM: tl.constexpr):
    """One program: dQ of BLOCK_M queries of one (batch, head)."""
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 if compiled
    n_blocks = tl.cdiv(Tq, BLOCK_M)
    block, b, h, bh = _block_and_head(n_blocks, n_heads)
    start_m = (n_blocks - 1 - block) * BLOCK_M  # heaviest blocks first
    h_kv = h // group_size
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                mask=rows[:, None] < Tq, other=0.0)
    do = tl.load(dO + b * stride_db + h * stride_dh + rows[:, None] * stride_dt + offs_d[None, :],
                 mask=rows[:, None] < Tq, other=0.0)
    lse = tl.load(LSE + bh * Tq + rows, mask=rows < Tq, other=0.0)
    delta = tl.load(Delta + bh * Tq + rows, mask=rows < Tq, other=0.0)
    k_ptrs = K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    causal_offset = Tk - Tq
    if CAUSAL:
        full_end = (start_m + causal_offset + 1) // BLOCK_N * BLOCK_N
        end = tl.minimum(start_m + BLOCK_M + causal_offset, Tk)
    else:
        full_end = Tk // BLOCK_N * BLOCK_N
        end = Tk
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, offs_n,
                            0, full_end, Tk, causal_offset, qk_scale, BLOCK_N, False, CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, offs_n,
                            full_end, end, Tk, causal_offset, qk_scale, BLOCK_N, True, CAUSAL)
    tl.store(dQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(dQ.dtype.element_ty), mask=rows[:, None] < Tq)


def _bht(t):
    """The (batch, head, time) strides of a (B, H, T, D) tensor whose last dim is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, key_start=None):
        # Any layout works as long as the head dim is contiguous (e.g. a transposed (B, T, H, D)).
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        sm_scale = 1.0 / math.sqrt(D)
        o = torch.empty(B, H, Tq, D, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)  # log2-sum-exp of each row
        # Decoding (a few new queries against a long cache) takes the smallest query block tl.dot
        # allows, 16 rows, instead of training's 128, most of which would be masked-out work.
        block_m, block_n, warps, stages = _attn_tiles(D, q.dtype)["decode" if Tq <= 16 else "fwd"]
        padded = key_start is not None
        # Without padding the kernel never reads KEY_START (PADDED is a constexpr): any tensor will do,
        # but not one the kernel writes (torch.compile would see two names for one written buffer).
        starts = key_start.to(device=q.device, dtype=torch.int32).contiguous() if padded else q
        _attn_fwd_kernel[(triton.cdiv(Tq, block_m) * H * B,)](
            q, k, v, o, lse, starts, *_bht(q), *_bht(k), *_bht(v), *_bht(o),
            H, H // Hkv, Tq, Tk, sm_scale * math.log2(math.e),
            CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D, PADDED=padded,
            num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.padded = causal, padded
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        if ctx.padded:
            raise NotImplementedError("attention with key_start (left padding) is for generation: the "
                                      "Triton kernels have no backward for it; train on right-padded rows")
        q, k, v, o, lse = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        sm_scale = 1.0 / math.sqrt(D)
        qk_scale = sm_scale * math.log2(math.e)
        tiles = _attn_tiles(D, q.dtype)
        delta = torch.empty_like(lse)
        delta_rows = 4096 // D  # a (rows x D) tile of O and of dO per program
        _attn_bwd_delta_kernel[(triton.cdiv(Tq, delta_rows) * H * B,)](
            o, do, delta, *_bht(o), *_bht(do), H, Tq, BLOCK_M=delta_rows, HEAD_DIM=D)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        block_m, block_n, warps, stages = tiles["dkdv"]
        _attn_bwd_dkdv_kernel[(triton.cdiv(Tk, block_n) * Hkv * B,)](
            q, k, v, do, lse, delta, dk, dv, *_bht(q), *_bht(k), *_bht(v), *_bht(do), *_bht(dk), *_bht(dv),
            H, Hkv, H // Hkv, Tq, Tk, qk_scale, sm_scale,
            CAUSAL=ctx.causal, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D, num_warps=warps, num_stages=stages)
        block_m, block_n, warps, stages = tiles["dq"]
        _attn_bwd_dq_kernel[(triton.cdiv(Tq, block_m) * H * B,)](
            q, k, v, do, lse, delta, dq, *_bht(q), *_bht(k), *_bht(v), *_bht(do), *_bht(dq),
            H, H // Hkv, Tq, Tk, qk_scale, sm_scale,
            CAUSAL=ctx.causal, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D, num_warps=warps, num_stages=stages)
        return dq, dk, dv, None, None


def attention(q, k, v, causal: bool = True, key_start=None):
    """Scaled dot-product attention with grouped-query heads and a bottom-right causal mask.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H % Hkv == 0 and Tq <= Tk. Returns (B, H, Tq, D)
    in q's dtype, softmax scale 1/sqrt(D). Query i sits at absolute position Tk - Tq + i and sees
    keys 0..Tk - Tq + i: Tq == Tk is ordinary causal training, Tq < Tk decoding against a KV cache
    (the kernel handles both; a single new token costs one program per (batch, head)).
    key_start (B,), causal only: row b's keys before key_start[b] are left padding, seen by no query
    (batched generation of prompts of different lengths; see padded_causal_mask).
    Dispatch: Triton when BACKEND == "triton", or BACKEND == "auto" and Triton imports and q is on
    CUDA and not inside torch.compile; otherwise attention_torch. Under "auto", head dims outside
    SUPPORTED_HEAD_DIMS and dtypes other than fp16/bf16/fp32 also go to attention_torch."""
    B, H, Tq, D = q.shape
    assert k.shape == v.shape and k.shape[0] == B and k.shape[3] == D, "k, v must be (B, Hkv, Tk, D)"
    assert H % k.shape[1] == 0, f"n_heads ({H}) must be a multiple of n_kv_heads ({k.shape[1]})"
    assert 0 < Tq <= k.shape[2], f"need 0 < Tq <= Tk, got Tq={Tq}, Tk={k.shape[2]}"
    q, k, v = _autocast_for_triton(q, k, v)
    unsupported = None
    if D not in SUPPORTED_HEAD_DIMS:
        unsupported = f"head dim {D} (supported: {SUPPORTED_HEAD_DIMS})"
    elif q.dtype not in _KERNEL_DTYPES or not (q.dtype == k.dtype == v.dtype):
        unsupported = f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (need one of fp16, bf16, fp32 for all)"
    assert key_start is None or causal, "key_start (left padding) needs the causal mask"
    if BACKEND == "auto" and torch.compiler.is_compiling():
        # Inside torch.compile, "auto" means PyTorch's attention. Measured on an H200 (torch 2.11,
        # 2026-11-30): stage 01's model trained 4% faster compiled with SDPA than with this kernel,
        # and stage 02's dynamic-shape compile stopped inside dynamo when it met the kernel's launch.
        return attention_torch(q, k, v, causal, key_start)
    if _use_triton(q, unsupported):
        return _FlashAttention.apply(q, k, v, causal, key_start)
    return attention_torch(q, k, v, causal, key_start)


# ============================================================================================
# Mixture-of-Experts: routing and load balancing
# ============================================================================================


def route(router_logits, top_k: int, bias=None, normalize: bool = True):
    """Choose top_k experts per token. router_logits: (N, E).

    probs = softmax(logits) in float32. The choice is made on probs + bias (bias: (E,) or None; in
    DeepSeek-V3's auxiliary-loss-free balancing the bias steers the choice but never the gates).
    Gates are the chosen probs renormalised over the k choices (Mixtral). With top_k == 1 that makes
    every gate 1, so the router then learns only from a balancing loss; normalize=False keeps the
    raw probs instead (Switch Transformer). Returns gates (N, k) float32, experts (N, k) int64,
    probs (N, E)."""
    probs = router_logits.float().softmax(dim=-1)
    scores = probs if bias is None else probs + bias.detach().float()
    experts = scores.topk(top_k, dim=-1).indices  # (N, k)
    gates = probs.gather(-1, experts)  # (N, k)
    if normalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return gates, experts, probs


def _expert_load(experts, n_experts: int):
    """How many of the N*k assignments each expert got: (E,) int64, without a host sync."""
    flat = experts.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(probs, experts, n_experts: int):
    """Switch Transformer's auxiliary loss: E * sum_i f_i * P_i, where f_i is the fraction of the
    N*k assignments sent to expert i and P_i the mean router probability of expert i. It is 1.0 at
    perfect balance and grows as routing concentrates; its gradient flows through P (f is a count)."""
    f = _expert_load(experts, n_experts).to(probs.dtype) / experts.numel()  # (E,)
    P = probs.mean(dim=0)  # (E,)
    return n_experts * (f * P).sum()


@torch.no_grad()
def update_router_bias(bias, experts, n_experts: int, gamma: float = 1e-3):
    """DeepSeek-V3 balancing, in place: raise the bias of under-loaded experts by gamma, lower the
    over-loaded ones, so the next top-k choice drifts toward an even load. Call once per step."""
    load = _expert_load(experts, n_experts).to(bias.dtype)
    bias += gamma * torch.sign(load.mean() - load)
    return bias


# ============================================================================================
# Mixture-of-Experts: SwiGLU experts, PyTorch reference
# ============================================================================================


def _sort_by_expert(experts, n_experts: int):
    """Sort the N*k assignments by expert. Returns order (N*k,) assignment ids in expert order,
    token (N*k,) the token of each sorted assignment, and counts (E,) assignments per expert."""
    order = torch.argsort(experts.reshape(-1), stable=True)
    return order, order // experts.shape[1], _expert_load(experts, n_experts)


def moe_swiglu_reference(x, gates, experts, w_gate, w_up, w_down):
    """The MoE layer with one Python loop over experts: the CPU path and the test oracle.

    x: (N, C); gates (N, k); experts (N, k) int64; w_gate, w_up: (E, C, F); w_down: (E, F, C).
    out[n] = sum_j gates[n, j] * ((silu(x[n] @ w_gate[e]) * (x[n] @ w_up[e])) @ w_down[e]), e = experts[n, j]."""
    N, C = x.shape
    order, token, counts = _sort_by_expert(experts, w_gate.shape[0])
    xs = x[token]  # (N*k, C) token rows, grouped by expert
    ys = []
    for e, rows in enumerate(torch.split(xs, counts.tolist())):  # one host sync for the segment sizes
        ys.append((F.silu(rows @ w_gate[e]) * (rows @ w_up[e])) @ w_down[e])
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    weighted = torch.cat(ys).to(work) * gates.reshape(-1)[order].to(work)[:, None]
    return torch.zeros(N, C, dtype=work, device=x.device).index_add(0, token, weighted).to(x.dtype)


# ============================================================================================
# Mixture-of-Experts: Triton grouped GEMM
# ============================================================================================

# Tiles, not yet timed on a GPU. BLOCK_M: rows per program, shared by all grouped kernels (each
# expert's segment is cut into BLOCK_M-row blocks, so an expert wastes at most BLOCK_M - 1 rows of
# padding work). gate_up, mm: (BLOCK_N, BLOCK_K, num_warps, num_stages); wgrad: (BLOCK_K, BLOCK_N,
# BLOCK_M, warps, stages). Chosen, like the attention tiles, to compile without spills on sm_80/89/90:
# the backward's down-projection product with the SwiGLU epilogue also holds the G and U tiles and
# spilled at mm's 128 columns, so it gets 64; mm runs 2 pipeline stages because its two-product
# variant (dX) streams two A and two W tiles and overflowed an RTX 4090's 99 KiB at 3.
_MOE_TILES = dict(block_m=128, gate_up=(64, 64, 8, 3), mm=(128, 64, 8, 2), mm_swiglu_bwd=(64, 64, 8, 3),
                  wgrad=(128, 128, 64, 8, 3))
_MOE_TILES_FP32 = dict(block_m=64, gate_up=(64, 32, 8, 2), mm=(64, 32, 4, 2), mm_swiglu_bwd=(64, 32, 4, 2),
                       wgrad=(64, 64, 32, 4, 2))
_MOE_TILES_INTERPRET = dict(block_m=16, gate_up=(16, 16, 1, 1), mm=(32, 16, 1, 1), mm_swiglu_bwd=(16, 16, 1, 1),
                            wgrad=(16, 32, 16, 1, 1))


def _moe_tiles(dtype):
    if _INTERPRET:
        return _MOE_TILES_INTERPRET
    return _MOE_TILES_FP32 if dtype == torch.float32 else _MOE_TILES


def _moe_schedule(counts, offsets, block_m: int, n_rows: int):
    """Which expert and which sorted rows each row-block program handles, built with torch ops on
    the device: no host sync. The grid is an upper bound on the number of blocks (every expert adds
    at most one partial block); the surplus programs get an empty row range and return at once.

    Returns (expert, row_start, row_end) int32 tensors of length n_programs, and n_programs."""
    n_experts = counts.numel()
    blocks = (counts + block_m - 1) // block_m  # (E,) row blocks per expert
    block_end = torch.cumsum(blocks, 0)  # (E,) one past each expert's last block
    n_programs = triton.cdiv(n_rows, block_m) + n_experts
    pid = torch.arange(n_programs, device=counts.device)
    expert = torch.searchsorted(block_end, pid, right=True).clamp_(max=n_experts - 1)
    row_start = offsets[expert] + (pid - (block_end - blocks)[expert]) * block_m
    row_end = offsets[expert + 1]
    row_start = torch.where(pid < block_end[-1], row_start, row_end)
    return expert.int(), row_start.int(), row_end.int(), n_programs


@triton.jit
def _moe_gate_up_kernel(X, Wg, Wu, G, U, Hid, block_expert, block_row_start, block_row_end,
                        C, d_ff, stride_xm, stride_we, stride_wk, stride_wn, stride_hm,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """G = X Wg[e], U = X Wu[e], Hid = silu(G) * U for one (row block, column block) of expert e.
    Both products share the loads of X; G and U are kept for the backward."""
    pid = tl.program_id(0)
    row_start = tl.load(block_row_start + pid)
    row_end = tl.load(block_row_end + pid)
    if row_start >= row_end:  # a surplus program of the schedule
        return
    e = tl.load(block_expert + pid).to(tl.int64)
    rows = row_start.to(tl.int64) + tl.arange(0, BLOCK_M)  # 64-bit: rows * stride passes 2**31
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + ks
        x = tl.load(X + rows[:, None] * stride_xm + kk[None, :],
                    mask=(rows[:, None] < row_end) & (kk[None, :] < C), other=0.0)
        w_off = e * stride_we + kk[:, None] * stride_wk + cols[None, :] * stride_wn
        w_mask = (kk[:, None] < C) & (cols[None, :] < d_ff)
        acc_g += tl.dot(x, tl.load(Wg + w_off, mask=w_mask, other=0.0))
        acc_u += tl.dot(x, tl.load(Wu + w_off, mask=w_mask, other=0.0))
    hid = acc_g * tl.sigmoid(acc_g) * acc_u  # SwiGLU: silu(g) * u
    out = rows[:, None] * stride_hm + cols[None, :]
    mask = (rows[:, None] < row_end) & (cols[None, :] < d_ff)
    tl.store(G + out, acc_g.to(G.dtype.element_ty), mask=mask)
    tl.store(U + out, acc_u.to(U.dtype.element_ty), mask=mask)
    tl.store(Hid + out, hid.to(Hid.dtype.element_ty), mask=mask)


@triton.jit
def _moe_grouped_mm_kernel(A, W, A2, W2, Y, Y2, G, U, block_expert, block_row_start, block_row_end,
                           K, N, stride_am, stride_we, stride_wk, stride_wn, stride_ym,
                           TWO_PRODUCTS: tl.constexpr, SWIGLU_BWD: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y = A W[e] (+ A2 W2[e] if TWO_PRODUCTS) for one (row block, column block) of expert e.
    W[e] is read as a (K, N) matrix through strides, so a transposed weight costs nothing.
    With SWIGLU_BWD the product is dHid, and the epilogue writes dG to Y and dU to Y2 from the
    saved pre-activations G and U."""
    pid = tl.program_id(0)
    row_start = tl.load(block_row_start + pid)
    row_end = tl.load(block_row_end + pid)
    if row_start >= row_end:
        return
    e = tl.load(block_expert + pid).to(tl.int64)
    rows = row_start.to(tl.int64) + tl.arange(0, BLOCK_M)  # 64-bit: rows * stride passes 2**31
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        a_off = rows[:, None] * stride_am + kk[None, :]
        a_mask = (rows[:, None] < row_end) & (kk[None, :] < K)
        w_off = e * stride_we + kk[:, None] * stride_wk + cols[None, :] * stride_wn
        w_mask = (kk[:, None] < K) & (cols[None, :] < N)
        acc += tl.dot(tl.load(A + a_off, mask=a_mask, other=0.0), tl.load(W + w_off, mask=w_mask, other=0.0))
        if TWO_PRODUCTS:
            acc += tl.dot(tl.load(A2 + a_off, mask=a_mask, other=0.0), tl.load(W2 + w_off, mask=w_mask, other=0.0))
    out = rows[:, None] * stride_ym + cols[None, :]
    mask = (rows[:, None] < row_end) & (cols[None, :] < N)
    if SWIGLU_BWD:
        # hid = silu(g) * u  =>  du = dhid * silu(g),  dg = dhid * u * silu'(g),
        # silu'(g) = sig(g) * (1 + g * (1 - sig(g)))
        g = tl.load(G + out, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + out, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        tl.store(Y + out, (acc * u * sig * (1.0 + g * (1.0 - sig))).to(Y.dtype.element_ty), mask=mask)
        tl.store(Y2 + out, (acc * g * sig).to(Y2.dtype.element_ty), mask=mask)
    else:
        tl.store(Y + out, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _moe_weight_grad_kernel(A, B, dW, offsets, K, N, stride_am, stride_bm, stride_we, stride_wk,
                            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """dW[e] = A[seg]^T B[seg] for one (K, N) tile of expert e, summing over the rows of its segment.
    An expert with no tokens runs zero iterations and writes zeros."""
    e = tl.program_id(0)
    n_col_tiles = tl.cdiv(N, BLOCK_N)
    kk = (tl.program_id(1) // n_col_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    nn = (tl.program_id(1) % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    seg_start = tl.load(offsets + e)
    seg_end = tl.load(offsets + e + 1)
    acc = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    for m0 in range(seg_start, seg_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        a_t = tl.load(A + rows[None, :] * stride_am + kk[:, None],  # (BLOCK_K, BLOCK_M), A transposed
                      mask=(rows[None, :] < seg_end) & (kk[:, None] < K), other=0.0)
        b = tl.load(B + rows[:, None] * stride_bm + nn[None, :],
                    mask=(rows[:, None] < seg_end) & (nn[None, :] < N), other=0.0)
        acc += tl.dot(a_t, b)
    tl.store(dW + e.to(tl.int64) * stride_we + kk[:, None] * stride_wk + nn[None, :],
             acc.to(dW.dtype.element_ty), mask=(kk[:, None] < K) & (nn[None, :] < N))


def _grouped_mm(a, w_t, sched, tiles, a2=None, w2_t=None, swiglu=None):
    """Launch _moe_grouped_mm_kernel: rows of `a` (R, K) times w_t[e] (a (K, N) view of each expert's
    weight, possibly a transpose). swiglu=(g, u) returns (dG, dU) instead of the product."""
    expert, row_start, row_end, n_programs = sched
    R, K = a.shape
    N = w_t.shape[2]
    y = torch.empty(R, N, device=a.device, dtype=a.dtype)
    # Arguments the kernel does not touch in this variant get a placeholder that is never written,
    # so no written buffer goes in under two names (torch.compile would see aliasing outputs).
    y2 = torch.empty_like(y) if swiglu else y.new_empty(0)
    g, u = swiglu if swiglu else (a, a)
    block_n, block_k, warps, stages = tiles["mm_swiglu_bwd" if swiglu else "mm"]
    _moe_grouped_mm_kernel[(n_programs, triton.cdiv(N, block_n))](
        a, w_t, a if a2 is None else a2, w_t if w2_t is None else w2_t, y, y2, g, u, expert, row_start, row_end,
        K, N, a.stride(0), w_t.stride(0), w_t.stride(1), w_t.stride(2), y.stride(0),
        TWO_PRODUCTS=a2 is not None, SWIGLU_BWD=swiglu is not None,
        BLOCK_M=tiles["block_m"], BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return (y, y2) if swiglu else y


def _weight_grad(a, b, offsets, n_experts, dtype, tiles):
    """Per-expert a[seg]^T b[seg]: (E, K, N) in the weights' dtype."""
    K, N = a.shape[1], b.shape[1]
    dw = torch.empty(n_experts, K, N, device=a.device, dtype=dtype)
    block_k, block_n, block_m, warps, stages = tiles["wgrad"]
    _moe_weight_grad_kernel[(n_experts, triton.cdiv(K, block_k) * triton.cdiv(N, block_n))](
        a, b, dw, offsets, K, N, a.stride(0), b.stride(0), dw.stride(0), dw.stride(1),
        BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_M=block_m, num_warps=warps, num_stages=stages)
    return dw


class _MoESwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gates, experts, w_gate, w_up, w_down):
        N, C = x.shape
        n_experts, _, d_ff = w_gate.shape
        w_gate, w_up, w_down = w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
        tiles = _moe_tiles(x.dtype)
        order, token, counts = _sort_by_expert(experts, n_experts)
        offsets = F.pad(torch.cumsum(counts, 0), (1, 0))  # (E+1,) segment bounds in sorted order
        R = order.numel()  # N*k assignments
        sched = _moe_schedule(counts, offsets, tiles["block_m"], R)
        xs = x[token].contiguous()  # (R, C) token rows, grouped by expert

        g = torch.empty(R, d_ff, device=x.device, dtype=x.dtype)
        u, hid = torch.empty_like(g), torch.empty_like(g)
        block_n, block_k, warps, stages = tiles["gate_up"]
        _moe_gate_up_kernel[(sched[3], triton.cdiv(d_ff, block_n))](
            xs, w_gate, w_up, g, u, hid, *sched[:3], C, d_ff, xs.stride(0), *w_gate.stride(), g.stride(0),
            BLOCK_M=tiles["block_m"], BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
        y = _grouped_mm(hid, w_down, sched, tiles)  # (R, C) each assignment's expert output

        # Combine: out[token] += gate * y over the token's k assignments, accumulated in fp32. (On
        # CUDA index_add_ adds with atomics, so the order of those k terms may vary run to run.)
        gate_sorted = gates.reshape(-1)[order].float()  # (R,)
        out = torch.zeros(N, C, device=x.device, dtype=torch.float32)
        out.index_add_(0, token, y.float() * gate_sorted[:, None])
        ctx.save_for_backward(xs, g, u, hid, y, gate_sorted, order, token, offsets, *sched[:3], w_gate, w_up, w_down)
        ctx.n_programs, ctx.n_tokens, ctx.top_k, ctx.gates_dtype = sched[3], N, gates.shape[1], gates.dtype
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        xs, g, u, hid, y, gate_sorted, order, token, offsets, expert, row_start, row_end, w_gate, w_up, w_down = \
            ctx.saved_tensors
        sched = (expert, row_start, row_end, ctx.n_programs)
        tiles = _moe_tiles(xs.dtype)
        n_experts = w_gate.shape[0]
        dout_s = dout[token].float()  # (R, C) upstream gradient of each assignment's token

        # out = sum gate * y: the gate's gradient is <dout, y>, y's is gate * dout.
        dgates = torch.empty_like(gate_sorted)
        dgates[order] = (dout_s * y.float()).sum(dim=1)  # back to (token, choice) order
        dy = (dout_s * gate_sorted[:, None]).to(xs.dtype).contiguous()  # (R, C)

        # Down projection y = hid W_down[e]: dHid = dy W_down[e]^T, fused with the SwiGLU backward.
        dg, du = _grouped_mm(dy, w_down.transpose(1, 2), sched, tiles, swiglu=(g, u))  # (R, F) each
        # Gate/up projections: dX = dG W_gate[e]^T + dU W_up[e]^T in one launch.
        dxs = _grouped_mm(dg, w_gate.transpose(1, 2), sched, tiles, a2=du, w2_t=w_up.transpose(1, 2))
        dx = torch.zeros(ctx.n_tokens, xs.shape[1], device=xs.device, dtype=torch.float32)
        dx.index_add_(0, token, dxs.float())

        dw_gate = _weight_grad(xs, dg, offsets, n_experts, w_gate.dtype, tiles)  # (E, C, F)
        dw_up = _weight_grad(xs, du, offsets, n_experts, w_up.dtype, tiles)  # (E, C, F)
        dw_down = _weight_grad(hid, dy, offsets, n_experts, w_down.dtype, tiles)  # (E, F, C)
        return (dx.to(xs.dtype), dgates.view(ctx.n_tokens, ctx.top_k).to(ctx.gates_dtype), None,
                dw_gate, dw_up, dw_down)


def moe_swiglu(x, gates, experts, w_gate, w_up, w_down):
    """Mixture of SwiGLU experts.

    x: (N, C); gates (N, k); experts (N, k) int64; w_gate, w_up: (E, C, F); w_down: (E, F, C).
    out[n] = sum_j gates[n, j] * ((silu(x[n] @ w_gate[e]) * (x[n] @ w_up[e])) @ w_down[e]), e = experts[n, j].
    Differentiable w.r.t. x, gates and the three weights. Dispatch as for attention(): the Triton
    grouped GEMM on CUDA, moe_swiglu_reference otherwise."""
    assert x.dim() == 2 and gates.shape == experts.shape and experts.shape[0] == x.shape[0]
    assert w_gate.shape == w_up.shape and w_down.shape == (w_gate.shape[0], w_gate.shape[2], w_gate.shape[1])
    x, w_gate, w_up, w_down = _autocast_for_triton(x, w_gate, w_up, w_down)  # gates stay fp32
    unsupported = None
    if x.dtype not in _KERNEL_DTYPES or not (x.dtype == w_gate.dtype == w_up.dtype == w_down.dtype):
        unsupported = f"dtypes x {x.dtype}, weights {w_gate.dtype} (need one of fp16, bf16, fp32 for all)"
    if _use_triton(x, unsupported):
        return _MoESwiGLU.apply(x if x.stride(-1) == 1 else x.contiguous(), gates, experts, w_gate, w_up, w_down)
    return moe_swiglu_reference(x, gates, experts, w_gate, w_up, w_down)


# ============================================================================================
# Command line: --bench and --check
# ============================================================================================


def _median_ms(fn, warmup=5, repeats=20):
    """Median wall time of fn() on the GPU, in milliseconds (CUDA events; the first calls compile)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _bench_attention(dtype):
    """Causal attention, 16k tokens per batch (B = 16384 / T) and H * D = 2048 query channels, as
    FlashAttention reports it: FLOPs 4*B*H*T^2*D / 2 forward, 2.5x that backward. group = query heads
    per key/value head. SDPA runs twice: pinned to its FlashAttention-2 backend, and as dispatched
    by default (which may pick cuDNN on Hopper; only FlashAttention takes grouped heads unexpanded)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    print(f"\nCausal attention, {dtype}, B*T = 16384, H*D = 2048: TFLOP/s, and triton / sdpa")
    print(f"{'T':>5} {'D':>4} {'group':>5} | {'fwd triton':>10} {'flash':>6} {'ratio':>5} | "
          f"{'fwd+bwd triton':>14} {'flash':>6} {'ratio':>5} {'default':>7} {'ratio':>5}")
    flash, default = SDPBackend.FLASH_ATTENTION, None
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    shapes = [(T, D, 1) for D in (64, 128) for T in (1024, 2048, 4096, 8192)]
    shapes += [(T, D, 4) for D in (64, 128) for T in (2048, 8192)]
    for T, D, group in shapes:
        B, H = 16384 // T, 2048 // D
        q = torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(B, H // group, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        do = torch.randn_like(q)
        fwd_flops = 4 * B * H * T * T * D / 2

        def tflops(attn, backend, backward):
            with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                if backward:
                    ms = _median_ms(lambda: torch.autograd.grad(attn(q, k, v), (q, k, v), do))
                    return 3.5 * fwd_flops / ms / 1e9
                with torch.no_grad():
                    return fwd_flops / _median_ms(lambda: attn(q, k, v)) / 1e9

        ours = lambda q, k, v: _FlashAttention.apply(q, k, v, True)  # noqa: E731
        ours_f, flash_f = tflops(ours, default, False), tflops(sdpa, flash, False)
        ours_fb, flash_fb, default_fb = tflops(ours, default, True), tflops(sdpa, flash, True), tflops(sdpa, default, True)
        print(f"{T:>5} {D:>4} {group:>5} | {ours_f:>10.0f} {flash_f:>6.0f} {ours_f / flash_f:>5.2f} | {ours_fb:>14.0f} "
              f"{flash_fb:>6.0f} {ours_fb / flash_fb:>5.2f} {default_fb:>7.0f} {ours_fb / default_fb:>5.2f}")


def _bench_moe(dtype):
    """MoE layer forward+backward (routing included) against the per-expert loop of
    moe_swiglu_reference, and against a dense SwiGLU MLP doing the same FLOPs without routing."""
    E, top_k = 8, 2
    print(f"\nMoE SwiGLU forward+backward, {dtype}, {E} experts, top-{top_k}: ms (TFLOP/s at 18*N*k*C*F FLOPs)")
    print(f"{'N':>6} {'C':>5} {'F':>5} | {'triton':>13} | {'per-expert loop':>15} {'speedup':>7} |"
          f" {'dense, same FLOPs':>17} {'triton/dense':>12}")
    for N, C, d_ff in ((8192, 512, 1024), (16384, 1024, 2816)):
        x = torch.randn(N, C, device="cuda", dtype=dtype, requires_grad=True)
        logits = torch.randn(N, E, device="cuda", requires_grad=True)
        ws = [(torch.randn(E, *shape, device="cuda", dtype=dtype) / shape[0] ** 0.5).requires_grad_()
              for shape in ((C, d_ff), (C, d_ff), (d_ff, C))]
        dout = torch.randn(N, C, device="cuda", dtype=dtype)

        def moe_step(layer):
            gates, experts, _ = route(logits, top_k)
            torch.autograd.grad(layer(x, gates, experts, *ws), (x, logits, *ws), dout)

        x_dense = torch.randn(N * top_k, C, device="cuda", dtype=dtype, requires_grad=True)
        w_dense = [w[0].detach().clone().requires_grad_() for w in ws]
        dout_dense = torch.randn(N * top_k, C, device="cuda", dtype=dtype)

        def dense_step():
            y = (F.silu(x_dense @ w_dense[0]) * (x_dense @ w_dense[1])) @ w_dense[2]
            torch.autograd.grad(y, (x_dense, *w_dense), dout_dense)

        ours, loop = _median_ms(lambda: moe_step(_MoESwiGLU.apply)), _median_ms(lambda: moe_step(moe_swiglu_reference))
        dense = _median_ms(dense_step)
        tf = lambda ms: 18 * N * top_k * C * d_ff / ms / 1e9  # noqa: E731
        print(f"{N:>6} {C:>5} {d_ff:>5} | {ours:>6.2f} ({tf(ours):>4.0f}) | {loop:>6.2f} ({tf(loop):>4.0f})"
              f" {loop / ours:>7.2f} | {dense:>8.2f} ({tf(dense):>4.0f}) {dense / ours:>12.2f}")


def _check():
    """Compare the kernels with the float64 references on the present device, in every dtype the
    device runs (on a CPU the kernels run only under TRITON_INTERPRET=1, and not in bf16)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if HAS_TRITON and (device == "cuda" or _INTERPRET):
        set_backend("triton")
    else:
        print("Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 on a CPU); checking the PyTorch path only.")
    # Largest error allowed relative to the reference's largest magnitude; a GPU's fp32 dots are TF32.
    tolerances = {torch.float32: 1e-2 if device == "cuda" else 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
    dtypes = list(tolerances) if device == "cuda" else [torch.float32]
    ok = True
    for dtype in dtypes:
        worst = 0.0

        def compare(got, ref):
            nonlocal worst
            for a, b in zip(got, ref):
                err = (a.double() - b).abs().max().item() / max(b.abs().max().item(), 1.0)
                worst = max(worst, err if math.isfinite(err) else float("inf"))

        for B, H, Hkv, Tq, Tk, D in ((2, 4, 2, 300, 300, 64), (2, 4, 1, 1, 77, 128), (1, 2, 2, 33, 95, 32)):
            q = torch.randn(B, H, Tq, D, device=device, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(B, Hkv, Tk, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
            do = torch.randn_like(q)
            out = attention(q, k, v)
            ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref = attention_reference(*ref_in)
            compare([out, *torch.autograd.grad(out, (q, k, v), do)],
                    [ref, *torch.autograd.grad(ref, ref_in, do.double())])
        N, C, d_ff, E = 300, 64, 96, 8
        x = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
        gates, experts, _ = route(torch.randn(N, E, device=device), 2)
        ws = [(torch.randn(E, *s, device=device) / s[0] ** 0.5).to(dtype).requires_grad_()
              for s in ((C, d_ff), (C, d_ff), (d_ff, C))]
        dout = torch.randn(N, C, device=device, dtype=dtype)
        out = moe_swiglu(x, gates, experts, *ws)
        ref_in = [t.detach().double().requires_grad_() for t in (x, *ws)]
        ref = moe_swiglu_reference(ref_in[0], gates.double(), experts, *ref_in[1:])
        compare([out, *torch.autograd.grad(out, (x, *ws), dout)],
                [ref, *torch.autograd.grad(ref, ref_in, dout.double())])
        passed = worst < tolerances[dtype]
        ok &= passed
        print(f"{device} {str(dtype):>14} backend {BACKEND}: largest relative error {worst:.1e} "
              f"(limit {tolerances[dtype]:.0e}) {'ok' if passed else 'FAILED'}")
    return ok


# --------------------------------------------------------------------------------------------
# --compile-report: what the kernels cost a GPU, measured without one
# --------------------------------------------------------------------------------------------
# Triton compiles ahead of time for any NVIDIA architecture on any machine: its wheel carries ptxas.
# The report records the launches of one training step (forward and backward of attention and of the
# MoE layer, on CPU tensors, with nothing run), compiles each for the chosen GPU and reads what the
# assembler reports. Spilled registers and over-sized shared memory are the first things that make a
# tile choice slow or unlaunchable; the interpreter tests cannot see either.

_LAUNCHED_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                     "_moe_gate_up_kernel", "_moe_grouped_mm_kernel", "_moe_weight_grad_kernel")
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                 torch.int32: "i32", torch.int64: "i64"}


class _LaunchRecorder:
    """Stands in for a kernel: kernel[grid](*args, **meta) records the launch instead of running it."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((self.kernel, args, meta))


def record_launches(step):
    """Run step() with every kernel replaced by a recorder; return the launches it made, in order."""
    launches, names = [], globals()  # the launch sites look their kernels up here at call time
    kernels = {name: names[name] for name in _LAUNCHED_KERNELS}
    try:
        for name, kernel in kernels.items():
            names[name] = _LaunchRecorder(kernel, launches)
        step()
    finally:
        names.update(kernels)
    return launches


def _specialise(kernel, args, meta):
    """The signature, constants and alignment attributes Triton's launcher would derive from these
    arguments: tensors become typed pointers, ints i32 (i64 if large), floats fp32; an int equal to 1
    becomes a constant, and pointers and ints divisible by 16 are marked so (which lets the compiler
    vectorise loads)."""
    meta = dict(meta)
    options = dict(num_warps=meta.pop("num_warps", 4), num_stages=meta.pop("num_stages", 3),
                   enable_fp_fusion=True)  # Triton's default, said out loud (3.9 warns when it is left unsaid)
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = args[i] if i < len(args) else meta[name]
        if name in meta or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name], constants[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    return signature, constants, attrs, options


def compile_for_gpu(kernel, args, meta, capability: int):
    """Compile one launch for an NVIDIA GPU of this compute capability (90 = H100); no GPU needed.
    Returns a dict: registers per thread, spilled bytes (stores + loads), shared memory bytes, and the
    tensor-core instruction its matmuls became ("wgmma" on Hopper, "mma" before it)."""
    import re
    import subprocess
    import tempfile
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    signature, constants, attrs, options = _specialise(kernel, args, meta)
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs),
                              target=GPUTarget("cuda", capability, 32), options=options)
    ptx = compiled.asm["ptx"]
    # Triton ran ptxas already but keeps quiet about what it said; run it again, verbosely.
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", path, "-o", path + ".o"],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(registers=int(re.search(r"Used (\d+) registers", log).group(1)),
                spilled=int(spills.group(1)) + int(spills.group(2)),
                shared=compiled.metadata.shared,
                tensor_cores="wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none")


def _training_step_launches():
    """Launches of attention (head dims 64 and 128, 1 and 4 query heads per kv head, T = 2048, and one
    decoding step against those 2048 keys, with and without left padding) and of
    an 8-expert top-2 MoE layer, forward and backward, in bf16 and fp32: tiles depend on dtype."""
    launches = []
    for dtype in (torch.bfloat16, torch.float32):
        for D, group in ((64, 1), (128, 1), (128, 4)):
            q = torch.zeros(1, 2048 // D * group, 2048, D, dtype=dtype, requires_grad=True)
            k, v = (torch.zeros(1, 2048 // D, 2048, D, dtype=dtype, requires_grad=True) for _ in range(2))
            launches += record_launches(lambda: torch.autograd.grad(
                _FlashAttention.apply(q, k, v, True), (q, k, v), torch.zeros_like(q)))
            launches += record_launches(lambda: _FlashAttention.apply(q[:, :, -1:].detach(), k.detach(), v.detach(), True))
            # ... and the same step for left-padded rows (batched generation of prompts of different lengths)
            launches += record_launches(lambda: _FlashAttention.apply(
                q[:, :, -1:].detach(), k.detach(), v.detach(), True, torch.zeros(1, dtype=torch.int32)))
        N, C, d_ff, E = 4096, 1024, 2816, 8
        x = torch.zeros(N, C, dtype=dtype, requires_grad=True)
        gates, experts, _ = route(torch.randn(N, E), 2)
        ws = [torch.zeros(E, *s, dtype=dtype, requires_grad=True) for s in ((C, d_ff), (C, d_ff), (d_ff, C))]
        launches += record_launches(lambda: torch.autograd.grad(
            _MoESwiGLU.apply(x, gates, experts, *ws), (x, *ws), torch.zeros(N, C, dtype=dtype)))
    return launches


def _compile_report(capability: int) -> bool:
    """Print one line per distinct kernel build of a training step; False if any spills registers or
    needs more shared memory than the GPU has."""
    if _INTERPRET:
        print("Unset TRITON_INTERPRET: the report compiles the GPU tiles, not the interpreter's.")
        return False
    global _CAPABILITY
    _CAPABILITY = capability  # the tiles chosen for that GPU
    shared_limit = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}.get(capability, 99 * 1024)
    print(f"Compiled for sm_{capability} with triton {triton.__version__} (no GPU used); "
          f"shared memory limit {shared_limit // 1024} KiB per block")
    print(f"{'kernel':<24} {'variant':<26} {'dtype':>5} {'D':>4} {'tiles':>11} {'warps':>5} {'stages':>6} | "
          f"{'regs':>4} {'spilled B':>9} {'shared KiB':>10} {'tensor cores':>12}")
    ok, seen = True, set()
    for kernel, args, meta in _training_step_launches():
        signature, constants, attrs, options = _specialise(kernel, args, meta)
        key = (kernel.__name__, tuple(signature.items()), tuple(sorted(constants.items())), tuple(options.items()))
        if key in seen:
            continue
        seen.add(key)
        stats = compile_for_gpu(kernel, args, meta, capability)
        dtype = next(t for t in signature.values() if t.startswith("*")).lstrip("*")
        tiles = "x".join(str(meta[n]) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if n in meta)
        # What else was fixed at compile time: flags that are on, and ints Triton made constants.
        variant = ",".join([n.lower() for n, v in meta.items() if v is True and n != "CAUSAL"] +
                           [f"{kernel.arg_names[i]}=1" for (i,), v in constants.items()
                            if kernel.arg_names[i] not in meta]) or "-"
        measured = (capability, kernel.__name__, meta.get("HEAD_DIM")) in _MEASURED_SPILLS
        fits = (stats["spilled"] == 0 or measured) and stats["shared"] <= shared_limit
        ok &= fits
        print(f"{kernel.__name__:<24} {variant:<26} {dtype:>5} {meta.get('HEAD_DIM', ''):>4} {tiles:>11} "
              f"{options['num_warps']:>5} {options['num_stages']:>6} | {stats['registers']:>4} "
              f"{stats['spilled']:>9} {stats['shared'] / 1024:>10.1f} {stats['tensor_cores']:>12}"
              f"{'' if fits else '  <- does not fit'}{'  (spill timed on a GPU and kept)' if measured and stats['spilled'] else ''}")
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", action="store_true", help="time the kernels against PyTorch (CUDA only)")
    parser.add_argument("--check", action="store_true", help="compare the kernels with the references")
    parser.add_argument("--compile-report", type=int, nargs="?", const=90, metavar="CAPABILITY",
                        help="compile a training step's kernels for a GPU (default 90 = H100; 80 = A100) "
                             "without one and print registers, spills and shared memory")
    args = parser.parse_args()
    if args.compile_report:
        sys.exit(0 if _compile_report(args.compile_report) else 1)
    if args.check:
        sys.exit(0 if _check() else 1)
    if args.bench:
        if not (torch.cuda.is_available() and HAS_TRITON):
            print("The benchmark needs a CUDA GPU with Triton; none was found, so nothing was measured.")
            sys.exit(1)
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
        _bench_attention(torch.bfloat16)
        _bench_moe(torch.bfloat16)
        sys.exit(0)
    parser.print_help()
