"""Flash attention forward and backward in Triton for the AIMv2 masks (full, causal, per-sample prefix).

The algorithm is FlashAttention-2 (Dao 2023) as laid out in Triton's fused-attention tutorial
(python/tutorials/06-fused-attention.py): online softmax in fp32, the forward saves the log-sum-exp of each query
row, the backward recomputes the probabilities from it, a preprocess kernel computes delta = rowsum(dO * O), one
kernel accumulates dK/dV per key block and one dQ per query block (no atomics, deterministic).

All three masks are one rule with a per-sample prefix length P: query i sees key j iff ``j <= i or j < P``
(full: P = T, causal: P = 0, prefix: P = prefix_len[b]). That rule gives every program its loop bounds, so blocks
with no allowed pair are never visited, and splits the visited blocks into fully allowed ones (no mask applied)
and the few on the diagonal, across the prefix edge or over the sequence end (masked elementwise). Sequences of
any length are handled with masked loads and stores: nothing is padded or copied.

Only stable ``tl`` APIs are used (pointer arithmetic, masked load/store, ``tl.dot``, ``tl.exp2``) so the kernels
build with triton 3.6 (torch 2.11's) as well as newer releases, and run under ``TRITON_INTERPRET=1`` on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from aimpre.kernels.backends import TRITON_DTYPES as DTYPES
from aimpre.kernels.backends import TRITON_HEAD_DIMS as HEAD_DIMS  # powers of two (tl.arange); 256 would not fit

# The softmax runs on exp2 with log2(e) folded into the scale; the saved log-sum-exp is natural-log.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
_TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])
_MAX_GRID_Y = 65535  # CUDA's limit on grid dimension 1, which holds batch * heads


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs get a true fp32 product (tl.dot would use tf32). Under the interpreter bf16 takes this path too:
    # its tl.dot multiplies the raw uint16 bit patterns (triton 3.8). Upcasting is exact there: a bf16 x bf16
    # product fits fp32's mantissa, so the result equals the tensor-core dot with fp32 accumulation.
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _program(H, PREFIX, P_CONST, HAS_PREFIX: tl.constexpr):
    """This program's block index along T, its (batch * head) row bh = b * H + h, and P of sample b."""
    bh = tl.program_id(1)
    b = bh // H
    if HAS_PREFIX:  # noqa: SIM108 (a static branch: the two sides differ in type)
        P = tl.load(PREFIX + b)  # prefix_len[b]
    else:
        P = P_CONST  # T for the full mask, 0 for causal
    return tl.program_id(0), bh, b, bh % H, P


@triton.jit
def _head(X, b, h, stride_b, stride_h):
    """Start of head h of sample b in a [B, H, T, D] tensor (int64: large batches overflow int32 offsets)."""
    return X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _store_visits(VISITS, bh, pid, unmasked, masked):
    # Blocks visited by this program's loops (debug path): the tests check that exactly the blocks holding an
    # allowed pair are visited, and that only the partly allowed ones pay for the mask.
    slot = VISITS + (bh * tl.num_programs(0) + pid) * 2
    tl.store(slot, unmasked)
    tl.store(slot + 1, masked)


@triton.jit
def _key_bounds(m0, P, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks of queries [m0, m0 + BLOCK_M): [0, full_end) all allowed, [full_end, end) need the mask.

    Query i sees keys j < max(i + 1, P). The first query of the block bounds the fully allowed keys, its last
    query bounds the keys seen at all (for the prefix mask: up to max(m1 - 1, P - 1)); keys stop at T.
    """
    full_end = (tl.minimum(tl.maximum(m0 + 1, P), T) // BLOCK_N) * BLOCK_N
    end = tl.minimum(tl.maximum(m0 + BLOCK_M, P), T)
    return full_end, end


@triton.jit
def _query_bounds(n0, P, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks that see keys [n0, n0 + BLOCK_N): [lo, band_end) need the mask, [band_end, T) do not.

    A key inside the prefix (n0 < P) is seen by every query; a later key only from its own position on, so the
    loop starts at the query block holding row n0. A query block is fully allowed once its first row m0 satisfies
    n1 <= max(m0 + 1, P) for the block's last real key n1 - 1.
    """
    lo = tl.where(n0 < P, 0, (n0 // BLOCK_M) * BLOCK_M)
    n1 = tl.minimum(n0 + BLOCK_N, T)
    band_end = tl.where(n1 <= P, lo, tl.maximum(lo, tl.cdiv(n1 - 1, BLOCK_M) * BLOCK_M))
    return lo, band_end


@triton.jit
def _allowed(rows, cols, P):
    return (cols <= rows) | (cols < P)


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, stride_kt, stride_vt, n0, offs_m, offs_n, offs_d, P, T, qk_scale,
              MASKED: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    cols = n0 + offs_n
    if MASKED:
        in_seq = cols[:, None] < T
        k = tl.load(k_ptr + cols[:, None] * stride_kt + offs_d[None, :], mask=in_seq, other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_vt + offs_d[None, :], mask=in_seq, other=0.0)
    else:
        k = tl.load(k_ptr + cols[:, None] * stride_kt + offs_d[None, :])
        v = tl.load(v_ptr + cols[:, None] * stride_vt + offs_d[None, :])
    s = _dot(q, tl.trans(k), IEEE) * qk_scale  # [BLOCK_M, BLOCK_N] scores in log2 units
    if MASKED:
        ok = _allowed(offs_m[:, None], cols[None, :], P) & (cols[None, :] < T)
        s = tl.where(ok, s, float("-inf"))
    # Every row sees key 0, which lies in the first block visited: m_new is finite from the first step on.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(Q, K, V, OUT, LSE, PREFIX, VISITS, sm_scale, T, H, P_CONST,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
              HAS_PREFIX: tl.constexpr, COUNT: tl.constexpr, IEEE: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    pid_m, bh, b, h, P = _program(H, PREFIX, P_CONST, HAS_PREFIX)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptr = _head(Q, b, h, stride_qb, stride_qh)
    k_ptr = _head(K, b, h, stride_kb, stride_kh)
    v_ptr = _head(V, b, h, stride_vb, stride_vh)
    row_ok = offs_m < T
    q = tl.load(q_ptr + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end, end = _key_bounds(m0, P, T, BLOCK_M, BLOCK_N)
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, stride_kt, stride_vt, n0, offs_m, offs_n,
                                  offs_d, P, T, qk_scale, False, IEEE)  # fmt: skip
    for n0 in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, stride_kt, stride_vt, n0, offs_m, offs_n,
                                  offs_d, P, T, qk_scale, True, IEEE)  # fmt: skip

    acc = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * LN2  # log-sum-exp of the scaled scores
    o_ptr = OUT + bh.to(tl.int64) * T * HEAD_DIM  # OUT and LSE are ours: contiguous [B, H, T, D] and [B, H, T]
    tl.store(o_ptr + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)
    if COUNT:
        _store_visits(VISITS, bh, pid_m, full_end // BLOCK_N, tl.cdiv(end - full_end, BLOCK_N))


@triton.jit
def _bwd_preprocess(OUT, DO, DELTA, T, H, stride_db, stride_dh, stride_dt,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """delta[b, h, i] = sum_d dO * O, the softmax-gradient term shared by every key of row i."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < T
    o = tl.load(OUT + bh.to(tl.int64) * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok)
    do_ptr = _head(DO, bh // H, bh % H, stride_db, stride_dh)
    do = tl.load(do_ptr + offs_m[:, None] * stride_dt + offs_d[None, :], mask=row_ok)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qt, stride_dt, m0, offs_n, offs_m_base,
               offs_d, P, T, qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    offs_m = m0 + offs_m_base
    row_ok = offs_m < T
    # Rows past T load zeros (dO = delta = 0), so they add exactly nothing: no row mask needed on the math.
    q_t = tl.load(q_ptr + offs_d[:, None] + offs_m[None, :] * stride_qt, mask=row_ok[None, :], other=0.0)  # [D, M]
    do = tl.load(do_ptr + offs_m[:, None] * stride_dt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
    p_t = tl.exp2(_dot(k, q_t, IEEE) * qk_scale - lse2[None, :])  # [BLOCK_N, BLOCK_M] probabilities, transposed
    if MASKED:
        p_t = tl.where(_allowed(offs_m[None, :], offs_n[:, None], P), p_t, 0.0)
    dv += _dot(p_t.to(do.dtype), do, IEEE)
    dp_t = _dot(v, tl.trans(do), IEEE)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q_t.dtype), tl.trans(q_t), IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, PREFIX, VISITS, sm_scale, T, H, P_CONST,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                   stride_db, stride_dh, stride_dt,
                   HAS_PREFIX: tl.constexpr, COUNT: tl.constexpr, IEEE: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    pid_n, bh, b, h, P = _program(H, PREFIX, P_CONST, HAS_PREFIX)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n[:, None] < T
    k = tl.load(_head(K, b, h, stride_kb, stride_kh) + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_ok,
                other=0.0)  # fmt: skip
    v = tl.load(_head(V, b, h, stride_vb, stride_vh) + offs_n[:, None] * stride_vt + offs_d[None, :], mask=key_ok,
                other=0.0)  # fmt: skip
    q_ptr = _head(Q, b, h, stride_qb, stride_qh)
    do_ptr = _head(DO, b, h, stride_db, stride_dh)
    lse_ptr = LSE + bh.to(tl.int64) * T
    delta_ptr = DELTA + bh.to(tl.int64) * T
    qk_scale = sm_scale * LOG2E

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo, band_end = _query_bounds(n0, P, T, BLOCK_M, BLOCK_N)
    for m0 in range(lo, tl.minimum(band_end, T), BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qt, stride_dt, m0, offs_n,
                            offs_m, offs_d, P, T, qk_scale, True, IEEE)  # fmt: skip
    for m0 in range(band_end, T, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qt, stride_dt, m0, offs_n,
                            offs_m, offs_d, P, T, qk_scale, False, IEEE)  # fmt: skip

    dk *= sm_scale
    out = bh.to(tl.int64) * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # dK, dV: contiguous
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=key_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=key_ok)
    if COUNT:
        unmasked = tl.where(band_end < T, tl.cdiv(T - band_end, BLOCK_M), 0)
        _store_visits(VISITS, bh, pid_n, unmasked, tl.cdiv(tl.minimum(band_end, T) - lo, BLOCK_M))


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, stride_kt, stride_vt, n0, offs_m, offs_n, offs_d, P, T, qk_scale,
             MASKED: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    cols = n0 + offs_n
    if MASKED:
        in_seq = cols[None, :] < T
        k_t = tl.load(k_ptr + offs_d[:, None] + cols[None, :] * stride_kt, mask=in_seq, other=0.0)  # [D, N]
        v_t = tl.load(v_ptr + offs_d[:, None] + cols[None, :] * stride_vt, mask=in_seq, other=0.0)
    else:
        k_t = tl.load(k_ptr + offs_d[:, None] + cols[None, :] * stride_kt)
        v_t = tl.load(v_ptr + offs_d[:, None] + cols[None, :] * stride_vt)
    p = tl.exp2(_dot(q, k_t, IEEE) * qk_scale - lse2[:, None])  # [BLOCK_M, BLOCK_N]
    if MASKED:
        p = tl.where(_allowed(offs_m[:, None], cols[None, :], P) & (cols[None, :] < T), p, 0.0)
    ds = p * (_dot(do, v_t, IEEE) - delta[:, None])
    dq += _dot(ds.to(k_t.dtype), tl.trans(k_t), IEEE)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, PREFIX, VISITS, sm_scale, T, H, P_CONST,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                 stride_db, stride_dh, stride_dt,
                 HAS_PREFIX: tl.constexpr, COUNT: tl.constexpr, IEEE: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    pid_m, bh, b, h, P = _program(H, PREFIX, P_CONST, HAS_PREFIX)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    rows = offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(_head(Q, b, h, stride_qb, stride_qh) + rows, mask=row_ok[:, None], other=0.0)
    rows = offs_m[:, None] * stride_dt + offs_d[None, :]
    do = tl.load(_head(DO, b, h, stride_db, stride_dh) + rows, mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    k_ptr = _head(K, b, h, stride_kb, stride_kh)
    v_ptr = _head(V, b, h, stride_vb, stride_vh)
    qk_scale = sm_scale * LOG2E

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end, end = _key_bounds(m0, P, T, BLOCK_M, BLOCK_N)
    for n0 in range(0, full_end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, stride_kt, stride_vt, n0, offs_m, offs_n, offs_d, P, T,
                      qk_scale, False, IEEE)  # fmt: skip
    for n0 in range(full_end, end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, stride_kt, stride_vt, n0, offs_m, offs_n, offs_d, P, T,
                      qk_scale, True, IEEE)  # fmt: skip

    dq *= sm_scale
    out = bh.to(tl.int64) * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
    if COUNT:
        _store_visits(VISITS, bh, pid_m, full_end // BLOCK_N, tl.cdiv(end - full_end, BLOCK_N))


# ----------------------------------------------------------------------------------------------------------------
# Host side: input checks, block sizes, launches.

INTERPRETED = isinstance(_attn_fwd, InterpretedFunction)  # TRITON_INTERPRET=1 was set before this import
# The interpreter runs tiles as numpy arrays: 16 is tl.dot's smallest tile, and small tiles make the tests cross
# many block edges (diagonal, prefix edge, sequence end) on short sequences.
_INTERPRETER_BLOCKS = (16, 16)


def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Autotuner candidates (BLOCK_M, BLOCK_N, warps, stages), around those of Triton's fused-attention tutorial for
# Hopper: wide query tiles for the forward and dQ, wide key tiles for dK/dV. Unmeasured until the benchmark runs
# on a GPU; configs that overflow shared memory are dropped by the autotuner.
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
                         (64, 64, 4, 4), (64, 32, 4, 3)])  # fmt: skip
_DKDV_CONFIGS = _configs([(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 4, 3), (128, 128, 8, 2),
                          (16, 64, 4, 4)])  # fmt: skip
_DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3), (128, 128, 8, 2)])
_KEY = ["T", "HEAD_DIM", "HAS_PREFIX", "P_CONST", "IEEE"]
_fwd_tuned: Any = None  # the autotuned launchers; None under the interpreter
_dkdv_tuned: Any = None
_dq_tuned: Any = None
if not INTERPRETED:  # the autotuner times configs with CUDA events: GPU only
    _fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY)(_attn_fwd)
    _dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_KEY)(_attn_bwd_dkdv)
    _dq_tuned = triton.autotune(_DQ_CONFIGS, key=_KEY)(_attn_bwd_dq)


def check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raises ValueError naming what the kernels cannot take (works on fake tensors: only metadata is read).

    Args:
        q, k, v: [B, H, T, D] query, key and value.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, H, T, D] shape, got {q.shape}, {k.shape}, {v.shape}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in DTYPES:
        raise ValueError(f"backend='triton' takes q, k, v of one dtype among {DTYPES}; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")  # fmt: skip
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"backend='triton' supports head dims {HEAD_DIMS}, got D={q.shape[-1]}; use 'sdpa' or 'flex'")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if INTERPRETED and _TRITON_VERSION < (3, 7):
        raise ValueError(f"the Triton interpreter of triton {triton.__version__} cannot run these kernels (loop "
                         "bounds from program ids); the CPU path needs triton>=3.7")  # fmt: skip
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"backend='triton' runs on CUDA tensors, got {q.device}; to run it (slowly) on CPU, set "
                         "TRITON_INTERPRET=1 before aimpre.kernels.triton_attention is first imported")  # fmt: skip
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
        raise ValueError(f"batch * heads = {q.shape[0] * q.shape[1]} exceeds {_MAX_GRID_Y}; split the batch")


def _mask_args(mask: str, prefix_len: Tensor | None, T: int, dummy: Tensor) -> dict:
    """The mask as kernel arguments: P = prefix_len[b] for "prefix", T for "full", 0 for "causal"."""
    if mask == "prefix":
        if prefix_len is None or prefix_len.dtype != torch.int32 or prefix_len.device != dummy.device:
            raise ValueError(f"mask='prefix' needs prefix_len as int32 on {dummy.device}")
        return dict(PREFIX=prefix_len.contiguous(), P_CONST=0, HAS_PREFIX=True)
    return dict(PREFIX=dummy, P_CONST=T if mask == "full" else 0, HAS_PREFIX=False)


def _rows(x: Tensor) -> Tensor:
    """The kernels index the head dim with stride 1; other strides (views of a fused qkv) are taken as they are."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _common_args(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None, dummy: Tensor,
                 count: bool) -> dict:  # fmt: skip
    """The keyword arguments every attention kernel takes: mask, scale, sizes, q/k/v strides, constants."""
    _, H, T, D = q.shape
    return dict(**_mask_args(mask, prefix_len, T, dummy), sm_scale=D**-0.5, T=T, H=H,
                stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2),
                stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kt=k.stride(2),
                stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vt=v.stride(2),
                COUNT=count, IEEE=_ieee(q.dtype), HEAD_DIM=D)  # fmt: skip


def _launch(raw: triton.JITFunction, tuned: Any, axis: str, T: int, BH: int, args: tuple, kwargs: dict,
            blocks: tuple[int, int] | None) -> None:  # fmt: skip
    """Launches over (blocks along T, batch * heads): autotuned on a GPU, fixed tiles under the interpreter or when
    ``blocks`` is given."""
    if blocks is None and tuned is not None:
        tuned[lambda meta: (triton.cdiv(T, meta[axis]), BH)](*args, **kwargs)
        return
    bm, bn = blocks or _INTERPRETER_BLOCKS
    raw[(triton.cdiv(T, bm if axis == "BLOCK_M" else bn), BH)](*args, **kwargs, BLOCK_M=bm, BLOCK_N=bn)


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: str,
    prefix_len: Tensor | None,
    *,
    blocks: tuple[int, int] | None = None,
    visits: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention forward.

    Args:
        q, k, v: [B, H, T, D], checked by ``check_inputs``.
        mask: "full", "causal" or "prefix".
        prefix_len: int32 [B] on q's device for the prefix mask, else None.
        blocks: (BLOCK_M, BLOCK_N) instead of the autotuner's choice.
        visits: contiguous int32 [B, H, cdiv(T, BLOCK_M), 2] receiving each program's (unmasked, masked)
            key-block counts; needs ``blocks``.

    Returns:
        out [B, H, T, D] (contiguous, q's dtype) and the log-sum-exp of the scaled scores, float32 [B, H, T].
    """
    check_inputs(q, k, v)
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, H, T, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [B, H, T, D] contiguous
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    args = (q, k, v, out, lse)
    kwargs = _common_args(q, k, v, mask, prefix_len, lse, visits is not None)
    kwargs["VISITS"] = lse if visits is None else visits
    _launch(_attn_fwd, _fwd_tuned, "BLOCK_M", T, B * H, args, kwargs, blocks)
    return out, lse


def backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: str,
    prefix_len: Tensor | None,
    *,
    blocks: tuple[int, int] | None = None,
    visits: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention backward from the forward's ``out`` and ``lse``.

    Args:
        grad_out: [B, H, T, D] gradient of ``out``.
        q, k, v, out, lse, mask, prefix_len: as passed to and returned by ``forward``.
        blocks: (BLOCK_M, BLOCK_N) instead of the autotuner's choice.
        visits: two contiguous int32 tensors receiving the (unmasked, masked) block counts of the dK/dV programs
            ([B, H, cdiv(T, BLOCK_N), 2]: query blocks per key block) and of the dQ programs
            ([B, H, cdiv(T, BLOCK_M), 2]: key blocks per query block); needs ``blocks``.

    Returns:
        dq, dk, dv: [B, H, T, D] contiguous, in q's dtype.
    """
    check_inputs(q, k, v)
    q, k, v, grad_out = _rows(q), _rows(k), _rows(v), _rows(grad_out)
    B, H, T, D = q.shape
    delta = torch.empty_like(lse)  # [B, H, T] float32
    pre_m = _INTERPRETER_BLOCKS[0] if INTERPRETED else 64
    _bwd_preprocess[(triton.cdiv(T, pre_m), B * H)](
        out, grad_out, delta, T, H, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        HEAD_DIM=D, BLOCK_M=pre_m,
    )  # fmt: skip
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    common = dict(_common_args(q, k, v, mask, prefix_len, lse, visits is not None),
                  stride_db=grad_out.stride(0), stride_dh=grad_out.stride(1), stride_dt=grad_out.stride(2))  # fmt: skip
    kv_visits, q_visits = visits if visits is not None else (lse, lse)
    _launch(_attn_bwd_dkdv, _dkdv_tuned, "BLOCK_N", T, B * H, (q, k, v, grad_out, lse, delta, dk, dv),
            dict(common, VISITS=kv_visits), blocks)  # fmt: skip
    _launch(_attn_bwd_dq, _dq_tuned, "BLOCK_M", T, B * H, (q, k, v, grad_out, lse, delta, dq),
            dict(common, VISITS=q_visits), blocks)  # fmt: skip
    return dq, dk, dv


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


def visited_blocks(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None,
                   blocks: tuple[int, int]) -> dict[str, Tensor]:  # fmt: skip
    """Runs forward and backward with block counting on; for tests of the loop bounds.

    Returns:
        {"fwd", "dq": [B, H, cdiv(T, BLOCK_M), 2], "dkdv": [B, H, cdiv(T, BLOCK_N), 2]}: per program, the
        number of (unmasked, masked) blocks its loop visited.
    """
    B, H, T, _ = q.shape
    n_m, n_n = triton.cdiv(T, blocks[0]), triton.cdiv(T, blocks[1])
    counts = {name: torch.full((B, H, n, 2), -1, dtype=torch.int32, device=q.device)
              for name, n in (("fwd", n_m), ("dkdv", n_n), ("dq", n_m))}  # fmt: skip
    out, lse = forward(q, k, v, mask, prefix_len, blocks=blocks, visits=counts["fwd"])
    backward(torch.ones_like(out), q, k, v, out, lse, mask, prefix_len, blocks=blocks,
             visits=(counts["dkdv"], counts["dq"]))  # fmt: skip
    return counts
