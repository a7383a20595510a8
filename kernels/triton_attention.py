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

import os
import time
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

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
def _program(H):
    """This program's block index along T and its (batch * head) row bh = b * H + h, with b and h."""
    bh = tl.program_id(1)
    return tl.program_id(0), bh, bh // H, bh % H


@triton.jit
def _prefix_of(PREFIX, b, P_CONST, HAS_PREFIX: tl.constexpr):
    # Apart from _program: torch.compile's analysis of which arguments a kernel writes follows every value that
    # flows into a store's address back through function calls, and would count PREFIX as written.
    if HAS_PREFIX:  # noqa: SIM108 (a static branch: the two sides differ in type)
        P = tl.load(PREFIX + b).to(tl.int32)  # prefix_len[b], int32 or int64
    else:
        P = P_CONST  # T for the full mask, 0 for causal
    return P


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
def _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, stride_t, n0, offs_m, offs_n, offs_d, P, T, qk_scale,
              MASKED: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    cols = n0 + offs_n
    if MASKED:
        in_seq = cols[:, None] < T
        k = tl.load(k_ptr + cols[:, None] * stride_t + offs_d[None, :], mask=in_seq, other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_t + offs_d[None, :], mask=in_seq, other=0.0)
    else:
        k = tl.load(k_ptr + cols[:, None] * stride_t + offs_d[None, :])
        v = tl.load(v_ptr + cols[:, None] * stride_t + offs_d[None, :])
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


# Strides: q, k and v share one set (stride_b, stride_h, stride_t: batch, head, position; the head dim is
# contiguous), so [B, H, T, D] tensors and the q/k/v parts of a fused [B, T, 3, H, D] projection are read alike;
# K and V start stride_s and 2 * stride_s elements after their pointer: 0 for three tensors, H * D when Q, K and V
# are all the packed projection (no views to make on the host).
# OUT and DO have their own. The gradients dq, dk, dv live in ONE tensor G, stride_gs elements apart, with one set
# of strides: [3, B, H, T, D] for [B, H, T, D] inputs, the [B, T, 3, H, D] gradient of the packed projection for
# the packed entry point (whose output is [B, T, H, D]). One fresh buffer, written in place, so torch.compile's
# functionalization sees no views to scatter back. LSE and DELTA are ours, [B, H, T].
@triton.jit
def _attn_fwd(Q, K, V, OUT, LSE, PREFIX, VISITS, H, sm_scale, T, P_CONST,
              stride_s, stride_b, stride_h, stride_t, stride_ob, stride_oh, stride_ot,
              HAS_PREFIX: tl.constexpr, COUNT: tl.constexpr, IEEE: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    pid_m, bh, b, h = _program(H)
    P = _prefix_of(PREFIX, b, P_CONST, HAS_PREFIX)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptr = _head(Q, b, h, stride_b, stride_h)
    k_ptr = _head(K, b, h, stride_b, stride_h) + stride_s
    v_ptr = _head(V, b, h, stride_b, stride_h) + stride_s + stride_s
    row_ok = offs_m < T
    q = tl.load(q_ptr + offs_m[:, None] * stride_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end, end = _key_bounds(m0, P, T, BLOCK_M, BLOCK_N)
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, stride_t, n0, offs_m, offs_n, offs_d, P, T,
                                  qk_scale, False, IEEE)  # fmt: skip
    for n0 in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, stride_t, n0, offs_m, offs_n, offs_d, P, T,
                                  qk_scale, True, IEEE)  # fmt: skip

    acc = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * LN2  # log-sum-exp of the scaled scores
    o_ptr = _head(OUT, b, h, stride_ob, stride_oh)
    tl.store(o_ptr + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)
    if COUNT:
        _store_visits(VISITS, bh, pid_m, full_end // BLOCK_N, tl.cdiv(end - full_end, BLOCK_N))


@triton.jit
def _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_t, stride_dt, m0, offs_n, offs_m_base,
               offs_d, P, T, qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    offs_m = m0 + offs_m_base
    row_ok = offs_m < T
    # Rows past T load zeros (dO = delta = 0), so they add exactly nothing: no row mask needed on the math.
    q_t = tl.load(q_ptr + offs_d[:, None] + offs_m[None, :] * stride_t, mask=row_ok[None, :], other=0.0)  # [D, M]
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
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, G, PREFIX, VISITS, H, sm_scale, T, P_CONST,
                   stride_s, stride_b, stride_h, stride_t, stride_db, stride_dh, stride_dt,
                   stride_gs, stride_gb, stride_gh, stride_gt,
                   HAS_PREFIX: tl.constexpr, COUNT: tl.constexpr, IEEE: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """dK and dV of one key block; reads the DELTA that _attn_bwd_dq wrote, so it runs after it."""
    pid_n, bh, b, h = _program(H)
    P = _prefix_of(PREFIX, b, P_CONST, HAS_PREFIX)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n[:, None] < T
    rows = offs_n[:, None] * stride_t + offs_d[None, :]
    k = tl.load(_head(K, b, h, stride_b, stride_h) + stride_s + rows, mask=key_ok, other=0.0)
    v = tl.load(_head(V, b, h, stride_b, stride_h) + stride_s + stride_s + rows, mask=key_ok, other=0.0)
    q_ptr = _head(Q, b, h, stride_b, stride_h)
    do_ptr = _head(DO, b, h, stride_db, stride_dh)
    lse_ptr = LSE + bh.to(tl.int64) * T
    delta_ptr = DELTA + bh.to(tl.int64) * T
    qk_scale = sm_scale * LOG2E

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo, band_end = _query_bounds(n0, P, T, BLOCK_M, BLOCK_N)
    for m0 in range(lo, tl.minimum(band_end, T), BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_t, stride_dt, m0, offs_n,
                            offs_m, offs_d, P, T, qk_scale, True, IEEE)  # fmt: skip
    for m0 in range(band_end, T, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_t, stride_dt, m0, offs_n,
                            offs_m, offs_d, P, T, qk_scale, False, IEEE)  # fmt: skip

    dk *= sm_scale
    dk_ptr = _head(G, b, h, stride_gb, stride_gh) + stride_gs + offs_n[:, None] * stride_gt + offs_d[None, :]
    tl.store(dk_ptr, dk.to(G.dtype.element_ty), mask=key_ok)  # G holds dq, dk, dv, stride_gs apart
    tl.store(dk_ptr + stride_gs, dv.to(G.dtype.element_ty), mask=key_ok)
    if COUNT:
        unmasked = tl.where(band_end < T, tl.cdiv(T - band_end, BLOCK_M), 0)
        _store_visits(VISITS, bh, pid_n, unmasked, tl.cdiv(tl.minimum(band_end, T) - lo, BLOCK_M))


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, stride_t, n0, offs_m, offs_n, offs_d, P, T, qk_scale,
             MASKED: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    cols = n0 + offs_n
    if MASKED:
        in_seq = cols[None, :] < T
        k_t = tl.load(k_ptr + offs_d[:, None] + cols[None, :] * stride_t, mask=in_seq, other=0.0)  # [D, N]
        v_t = tl.load(v_ptr + offs_d[:, None] + cols[None, :] * stride_t, mask=in_seq, other=0.0)
    else:
        k_t = tl.load(k_ptr + offs_d[:, None] + cols[None, :] * stride_t)
        v_t = tl.load(v_ptr + offs_d[:, None] + cols[None, :] * stride_t)
    p = tl.exp2(_dot(q, k_t, IEEE) * qk_scale - lse2[:, None])  # [BLOCK_M, BLOCK_N]
    if MASKED:
        p = tl.where(_allowed(offs_m[:, None], cols[None, :], P) & (cols[None, :] < T), p, 0.0)
    ds = p * (_dot(do, v_t, IEEE) - delta[:, None])
    dq += _dot(ds.to(k_t.dtype), tl.trans(k_t), IEEE)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, OUT, DO, LSE, DELTA, G, PREFIX, VISITS, H, sm_scale, T, P_CONST,
                 stride_s, stride_b, stride_h, stride_t, stride_ob, stride_oh, stride_ot, stride_db, stride_dh,
                 stride_dt, stride_gs, stride_gb, stride_gh, stride_gt,
                 HAS_PREFIX: tl.constexpr, COUNT: tl.constexpr, IEEE: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """dQ of one query block. It first computes and stores delta = rowsum(dO * O) for its rows, the softmax-gradient
    term that _attn_bwd_dkdv reads: no separate preprocess launch (it has dO in hand; O adds one tile load)."""
    pid_m, bh, b, h = _program(H)
    P = _prefix_of(PREFIX, b, P_CONST, HAS_PREFIX)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(_head(Q, b, h, stride_b, stride_h) + offs_m[:, None] * stride_t + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    do = tl.load(_head(DO, b, h, stride_db, stride_dh) + offs_m[:, None] * stride_dt + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)  # fmt: skip
    o = tl.load(_head(OUT, b, h, stride_ob, stride_oh) + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=row_ok)
    lse2 = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0) * LOG2E
    k_ptr = _head(K, b, h, stride_b, stride_h) + stride_s
    v_ptr = _head(V, b, h, stride_b, stride_h) + stride_s + stride_s
    qk_scale = sm_scale * LOG2E

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end, end = _key_bounds(m0, P, T, BLOCK_M, BLOCK_N)
    for n0 in range(0, full_end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, stride_t, n0, offs_m, offs_n, offs_d, P, T, qk_scale,
                      False, IEEE)  # fmt: skip
    for n0 in range(full_end, end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, stride_t, n0, offs_m, offs_n, offs_d, P, T, qk_scale,
                      True, IEEE)  # fmt: skip

    dq *= sm_scale
    dq_ptr = _head(G, b, h, stride_gb, stride_gh) + offs_m[:, None] * stride_gt + offs_d[None, :]
    tl.store(dq_ptr, dq.to(G.dtype.element_ty), mask=row_ok[:, None])
    if COUNT:
        _store_visits(VISITS, bh, pid_m, full_end // BLOCK_N, tl.cdiv(end - full_end, BLOCK_N))


# ----------------------------------------------------------------------------------------------------------------
# Host side: input checks, tiles (fixed or autotuned, chosen once per shape key), launches.

INTERPRETED = isinstance(_attn_fwd, InterpretedFunction)  # TRITON_INTERPRET=1 was set before this import
AUTOTUNE_ENV = "AIMPRE_TRITON_AUTOTUNE"


def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Autotuner candidates (BLOCK_M, BLOCK_N, warps, stages), around those of Triton's fused-attention tutorial for
# Hopper: wide query tiles for the forward and dQ, wide key tiles for dK/dV. Unmeasured until the benchmark runs
# on a GPU; configs that overflow shared memory are dropped by the autotuner. The first of each list is also the
# fixed tile of every head dim (AIMPRE_TRITON_AUTOTUNE=0), compiled for sm_90 by tests/compile_sm90.py.
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
                         (64, 64, 4, 4), (64, 32, 4, 3)])  # fmt: skip
_DKDV_CONFIGS = _configs([(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 4, 3), (128, 128, 8, 2),
                          (16, 64, 4, 4)])  # fmt: skip
_DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3), (128, 128, 8, 2)])
# What the Autotuner keys its choice on (Triton adds the dtype of every tensor argument); stride_t tells the
# packed [B, T, 3, H, D] layout from [B, H, T, D].
_KEY = ["T", "HEAD_DIM", "HAS_PREFIX", "P_CONST", "IEEE", "stride_t"]
# The interpreter runs tiles as numpy arrays: 16 is tl.dot's smallest tile, and small tiles make the tests cross
# many block edges (diagonal, prefix edge, sequence end) on short sequences.
_INTERPRETER_TILES = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)


def autotuning() -> bool:
    """Whether launches autotune their tiles: ``AIMPRE_TRITON_AUTOTUNE`` = 1 or 0, read at every call; unset, on
    a GPU and off under the interpreter (where tiles are 16 x 16). 0 gives fixed tiles per kernel and head dim with
    no benchmarking: what the tests use."""
    flag = os.environ.get(AUTOTUNE_ENV, "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV} must be 0 or 1, got {flag!r}")
    return flag == "1" or (flag == "" and not INTERPRETED)


def _interpreter_bench(kernel_call: Callable[[], None], quantiles: Any) -> list[float]:
    """The Autotuner's timer under the interpreter (Triton's times CUDA events): one run, wall clock. The times
    say nothing about GPU tiles; it lets the tuning and caching logic run, and be tested, on CPU."""
    start = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - start) * 1e3
    return [ms, ms, ms]


class _InterpretedJIT(JITFunction):
    """A JITFunction whose launches run the interpreter. torch's ``wrap_triton`` traces only JITFunctions into the
    graph (it hands interpreted kernels back untraced, and those cannot run on fake tensors), so under
    ``TRITON_INTERPRET=1`` the torch.compile path launches this: the same graph as on a GPU, run by the interpreter.
    """

    def __init__(self, interpreted: Any) -> None:
        super().__init__(interpreted.fn)
        self.interpreted = interpreted

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        return self.interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)


class _Kernel:
    """One kernel and its launch choices: the JITFunction, its Autotuner, fixed tiles per head dim, and the tiles
    chosen per shape key (filled on the first eager call of each key)."""

    def __init__(self, fn: Any, configs: list[triton.Config], axis: str) -> None:
        self.fn = fn  # JITFunction (InterpretedFunction under the interpreter): the eager launches
        self.axis = axis  # the tile along T that sets the grid: "BLOCK_M" (forward, dQ) or "BLOCK_N" (dK/dV)
        traceable = _InterpretedJIT(fn) if INTERPRETED else fn
        bench = _interpreter_bench if INTERPRETED else None
        self.tuned = triton.autotune(configs, key=_KEY, do_bench=bench)(traceable)
        self.fixed = {D: _INTERPRETER_TILES if INTERPRETED else configs[0] for D in HEAD_DIMS}
        # Fixed tiles as one-config Autotuners: how torch.compile gets them (tiles and warps in one Config).
        self.pinned = {D: triton.autotune([c], key=[])(traceable) for D, c in self.fixed.items()}
        self.chosen: dict[tuple, tuple[int, dict]] = {}  # shape key -> (blocks along T, launch kwargs)


_FWD = _Kernel(_attn_fwd, _FWD_CONFIGS, "BLOCK_M")
_DQ = _Kernel(_attn_bwd_dq, _DQ_CONFIGS, "BLOCK_M")
_DKDV = _Kernel(_attn_bwd_dkdv, _DKDV_CONFIGS, "BLOCK_N")
KERNELS = {"fwd": _FWD, "dq": _DQ, "dkdv": _DKDV}


def chosen_tiles() -> list[dict[str, Any]]:
    """The tiles chosen so far, one entry per kernel and shape key: kernel, how ("autotuned" or "fixed"), mask,
    dtype, T, H, D, layout (of q, k, v: "packed qkv" or separate), BLOCK_M, BLOCK_N, num_warps, num_stages. For the
    attention bench's report, from which the fixed-tile table can be set."""
    out = []
    for name, kern in KERNELS.items():
        for key, (_, kw) in kern.chosen.items():
            autotuned, mask, dtype, T, H, D, qs = key[:7]
            out.append(dict(kernel=name, how="autotuned" if autotuned else "fixed", mask=mask,
                            dtype=str(dtype).removeprefix("torch."), T=T, H=H, D=D,
                            layout="packed qkv" if len(qs) == 4 and qs[0] else "q, k, v",
                            **{k: kw.get(k) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}))  # fmt: skip
    return out


def clear_tile_cache() -> None:
    """Forgets the tiles chosen per shape key (and the Autotuner's own choices): the next call chooses again."""
    for kern in KERNELS.values():
        kern.chosen.clear()
        kern.tuned.cache.clear()


def _launch(kern: _Kernel, key: tuple, T: int, BH: int, args: tuple, kwargs: Callable[[], dict]) -> None:
    """Eager launch over (blocks along T, batch * heads) with the tiles chosen for ``key`` = (autotune, ...shape).

    The first call of a key chooses them: the fixed tiles of its head dim, or the Autotuner's pick (it benchmarks
    here, once, and launches). Every later call is one dict lookup and a plain JITFunction launch with every
    constant precomputed: no Autotuner on the hot path.
    """
    hit = kern.chosen.get(key)
    if hit is None:
        base = kwargs()
        if key[0]:
            kern.tuned[lambda meta: (triton.cdiv(T, meta[kern.axis]), BH)](*args, **base)
            cfg = kern.tuned.best_config
        else:
            cfg = kern.fixed[base["HEAD_DIM"]]
        hit = kern.chosen[key] = (triton.cdiv(T, cfg.kwargs[kern.axis]), {**base, **cfg.all_kwargs()})
        if key[0]:
            return
    kern.fn.run(*args, grid=(hit[0], BH), warmup=False, **hit[1])


def _launch_traced(kern: _Kernel, T: Any, BH: Any, args: tuple, kwargs: dict, autotune: bool) -> None:
    """Launch inside a ``torch.library.triton_op``: through ``wrap_triton`` so torch.compile puts the kernel in its
    graph. With autotuning, Inductor benchmarks the Autotuner's configs itself and bakes its pick into the compiled
    code; without, the fixed tiles."""
    from torch.library import wrap_triton

    tuner = kern.tuned if autotune else kern.pinned[kwargs["HEAD_DIM"]]
    wrap_triton(tuner)[lambda meta: (triton.cdiv(T, meta[kern.axis]), BH)](*args, **kwargs)


def _launch_tiles(kern: _Kernel, tiles: tuple[int, int], T: int, BH: int, args: tuple, kwargs: dict) -> None:
    """Launch with given (BLOCK_M, BLOCK_N), for tests of the loop bounds."""
    bm, bn = tiles
    kern.fn[(triton.cdiv(T, bm if kern.axis == "BLOCK_M" else bn), BH)](*args, **kwargs, BLOCK_M=bm, BLOCK_N=bn)


def _check_common(dtype: torch.dtype, D: int, device: torch.device, BH: int) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"backend='triton' takes q, k, v of one dtype among {DTYPES}; got {dtype}")
    if D not in HEAD_DIMS:
        raise ValueError(f"backend='triton' supports head dims {HEAD_DIMS}, got D={D}; use 'sdpa' or 'flex'")
    if INTERPRETED and _TRITON_VERSION < (3, 7):
        raise ValueError(f"the Triton interpreter of triton {triton.__version__} cannot run these kernels (loop "
                         "bounds from program ids); the CPU path needs triton>=3.7")  # fmt: skip
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"backend='triton' runs on CUDA tensors, got {device}; to run it (slowly) on CPU, set "
                         "TRITON_INTERPRET=1 before aimpre.kernels.triton_attention is first imported")  # fmt: skip
    if BH > _MAX_GRID_Y:
        raise ValueError(f"batch * heads = {BH} exceeds {_MAX_GRID_Y}; split the batch")


def check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raises ValueError naming what the kernels cannot take (works on fake tensors: only metadata is read).

    Args:
        q, k, v: [B, H, T, D] query, key and value.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, H, T, D] shape, got {q.shape}, {k.shape}, {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"backend='triton' takes q, k, v of one dtype among {DTYPES}; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")  # fmt: skip
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    _check_common(q.dtype, q.shape[-1], q.device, q.shape[0] * q.shape[1])


def check_qkv(qkv: Tensor) -> None:
    """Raises ValueError naming what the kernels cannot take in a packed projection.

    Args:
        qkv: [B, T, 3, H, D], the fused q/k/v projection viewed as timm lays it out.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be [B, T, 3, H, D] (the fused projection viewed per head), got {qkv.shape}")
    _check_common(qkv.dtype, qkv.shape[-1], qkv.device, qkv.shape[0] * qkv.shape[3])


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


def _mask_kwargs(mask: str, T: int) -> dict:
    """The mask as kernel constants: P = prefix_len[b] for "prefix" (loaded), T for "full", 0 for "causal"."""
    return dict(P_CONST=T if mask == "full" else 0, HAS_PREFIX=mask == "prefix")


def _strides(prefix: str, s: tuple) -> dict:
    """Kernel stride arguments: (batch, head, position) as stride_{prefix}b/h/t, with a leading stride_{prefix}s
    (q to k to v, dq to dk to dv) when ``s`` has four."""
    names = ("s", "b", "h", "t")[4 - len(s) :]
    return {f"stride_{prefix}{n}": x for n, x in zip(names, s, strict=True)}


def _fwd(q: Tensor, k: Tensor, v: Tensor, qs: tuple, out: Tensor, os_: tuple, lse: Tensor, mask: str,
         prefix_len: Tensor | None, traced: bool, tiles: tuple[int, int] | None = None,
         visits: Tensor | None = None) -> None:  # fmt: skip
    """Launches the forward. ``qs``: (k - q offset, batch, head, position) strides of q, k, v; ``os_``: (batch,
    head, position) strides of out."""
    B, H, T, D = lse.shape[0], lse.shape[1], lse.shape[2], int(q.shape[-1])  # D: a constexpr, static even if traced
    args = (q, k, v, out, lse, q if prefix_len is None else prefix_len, q if visits is None else visits)

    def kwargs() -> dict:
        return dict(H=H, sm_scale=D**-0.5, T=T, **_mask_kwargs(mask, T), **_strides("", qs), **_strides("o", os_),
                    COUNT=visits is not None, IEEE=_ieee(q.dtype), HEAD_DIM=D)  # fmt: skip

    if tiles is not None:
        _launch_tiles(_FWD, tiles, T, B * H, args, kwargs())
    elif traced:
        _launch_traced(_FWD, T, B * H, args, kwargs(), autotuning())
    else:
        _launch(_FWD, (autotuning(), mask, q.dtype, T, H, D, qs, os_), T, B * H, args, kwargs)


def _bwd(do: Tensor, ds: tuple, q: Tensor, k: Tensor, v: Tensor, qs: tuple, out: Tensor, os_: tuple, lse: Tensor,
         g: Tensor, gs: tuple, mask: str, prefix_len: Tensor | None, traced: bool,
         tiles: tuple[int, int] | None = None, visits: tuple[Tensor, Tensor] | None = None) -> None:  # fmt: skip
    """Launches the backward: dQ (which also writes delta), then dK/dV. ``ds``: strides of dO; ``g`` receives dq,
    dk and dv, ``gs`` = (dq to dk offset, batch, head, position strides); the rest as for ``_fwd``."""
    B, H, T, D = lse.shape[0], lse.shape[1], lse.shape[2], int(q.shape[-1])  # D: a constexpr, static even if traced
    delta = torch.empty_like(lse)  # [B, H, T] float32, written by the dQ kernel
    plen = q if prefix_len is None else prefix_len
    q_visits, kv_visits = (q, q) if visits is None else visits
    dq_args = (q, k, v, out, do, lse, delta, g, plen, q_visits)
    kv_args = (q, k, v, do, lse, delta, g, plen, kv_visits)

    def kv_kwargs() -> dict:
        return dict(H=H, sm_scale=D**-0.5, T=T, **_mask_kwargs(mask, T), **_strides("", qs), **_strides("d", ds),
                    **_strides("g", gs), COUNT=visits is not None, IEEE=_ieee(q.dtype), HEAD_DIM=D)  # fmt: skip

    def dq_kwargs() -> dict:
        return dict(kv_kwargs(), **_strides("o", os_))

    if tiles is not None:
        _launch_tiles(_DQ, tiles, T, B * H, dq_args, dq_kwargs())
        _launch_tiles(_DKDV, tiles, T, B * H, kv_args, kv_kwargs())
    elif traced:
        autotune = autotuning()
        _launch_traced(_DQ, T, B * H, dq_args, dq_kwargs(), autotune)
        _launch_traced(_DKDV, T, B * H, kv_args, kv_kwargs(), autotune)
    else:
        key = (autotuning(), mask, q.dtype, T, H, D, qs, os_, ds, gs)
        _launch(_DQ, key, T, B * H, dq_args, dq_kwargs)
        _launch(_DKDV, key, T, B * H, kv_args, kv_kwargs)


def _rows(x: Tensor) -> Tensor:
    """The kernels index the head dim with stride 1; other strides are taken as they are."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _bhtd(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple]:
    """q, k, v [B, H, T, D] with one set of strides and a contiguous head dim, and those strides as ``qs``."""
    s = q.stride()
    if s[-1] != 1 or k.stride() != s or v.stride() != s:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        s = q.stride()
    return q, k, v, (0, s[0], s[1], s[2])


def forward(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None, *, traced: bool = False,
            tiles: tuple[int, int] | None = None, visits: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Attention forward on [B, H, T, D] inputs (checked by ``check_inputs``).

    Args:
        q, k, v: [B, H, T, D].
        mask: "full", "causal" or "prefix".
        prefix_len: int32 or int64 [B] on q's device for the prefix mask, else None.
        traced: launch through ``wrap_triton`` (inside a triton_op, for torch.compile).
        tiles: (BLOCK_M, BLOCK_N) instead of the fixed or autotuned ones.
        visits: contiguous int32 [B, H, cdiv(T, BLOCK_M), 2] receiving each program's (unmasked, masked)
            key-block counts; needs ``tiles``.

    Returns:
        out [B, H, T, D] (contiguous, q's dtype) and the log-sum-exp of the scaled scores, float32 [B, H, T].
    """
    q, k, v, qs = _bhtd(q, k, v)
    B, H, T, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [B, H, T, D]
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    _fwd(q, k, v, qs, out, out.stride()[:3], lse, mask, prefix_len, traced, tiles, visits)
    return out, lse


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: str,
             prefix_len: Tensor | None, *, traced: bool = False, tiles: tuple[int, int] | None = None,
             visits: tuple[Tensor, Tensor] | None = None) -> Tensor:  # fmt: skip
    """Attention backward from ``forward``'s ``out`` and ``lse``.

    Args:
        grad_out: [B, H, T, D] gradient of ``out``.
        q, k, v, out, lse, mask, prefix_len, traced, tiles: as for ``forward``.
        visits: two contiguous int32 tensors receiving the (unmasked, masked) block counts of the dQ programs
            ([B, H, cdiv(T, BLOCK_M), 2]: key blocks per query block) and of the dK/dV programs
            ([B, H, cdiv(T, BLOCK_N), 2]: query blocks per key block); needs ``tiles``.

    Returns:
        [3, B, H, T, D] contiguous, q's dtype: dq, dk and dv (``.unbind(0)``).
    """
    q, k, v, qs = _bhtd(q, k, v)
    grad_out = _rows(grad_out)
    g = torch.empty((3, *q.shape), dtype=q.dtype, device=q.device)  # [3, B, H, T, D]: dq, dk, dv
    _bwd(grad_out, grad_out.stride()[:3], q, k, v, qs, out, out.stride()[:3], lse, g, g.stride()[:4], mask,
         prefix_len, traced, tiles, visits)  # fmt: skip
    return g


def _packed(s: tuple) -> tuple:
    """(q to k offset, batch, head, position) strides of a [B, T, 3, H, D] tensor."""
    return s[2], s[0], s[3], s[1]


def _bth(s: tuple) -> tuple:
    """(batch, head, position) strides of a [B, T, H, D] tensor."""
    return s[0], s[2], s[1]


def forward_qkv(qkv: Tensor, mask: str, prefix_len: Tensor | None, *, traced: bool = False) -> tuple[Tensor, Tensor]:
    """Attention forward reading q, k and v by strides from the fused projection (checked by ``check_qkv``).

    Args:
        qkv: [B, T, 3, H, D] (a view of the [B, T, 3 * H * D] projection; other strides are read as they are).
        mask, prefix_len, traced: as for ``forward``.

    Returns:
        out [B, T, H, D] (contiguous: ``.view(B, T, H * D)`` is free) and the log-sum-exp, float32 [B, H, T].
    """
    qkv = _rows(qkv)
    B, T, _, H, D = qkv.shape
    out = torch.empty((B, T, H, D), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=qkv.device)
    _fwd(qkv, qkv, qkv, _packed(qkv.stride()), out, _bth(out.stride()), lse, mask, prefix_len, traced)
    return out, lse


def backward_qkv(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, mask: str, prefix_len: Tensor | None, *,
                 traced: bool = False) -> Tensor:  # fmt: skip
    """Attention backward of ``forward_qkv``, writing dq, dk and dv into one [B, T, 3, H, D] gradient.

    Args:
        grad_out: [B, T, H, D] gradient of ``out``.
        qkv, out, lse, mask, prefix_len, traced: as passed to and returned by ``forward_qkv``.

    Returns:
        [B, T, 3, H, D] contiguous, qkv's dtype: the gradient of ``qkv``, with no stack or copy.
    """
    qkv, grad_out = _rows(qkv), _rows(grad_out)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # contiguous [B, T, 3, H, D]
    _bwd(grad_out, _bth(grad_out.stride()), qkv, qkv, qkv, _packed(qkv.stride()), out, _bth(out.stride()), lse, dqkv,
         _packed(dqkv.stride()), mask, prefix_len, traced)  # fmt: skip
    return dqkv


def visited_blocks(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None,
                   blocks: tuple[int, int]) -> dict[str, Tensor]:  # fmt: skip
    """Runs forward and backward with block counting on; for tests of the loop bounds.

    Returns:
        {"fwd", "dq": [B, H, cdiv(T, BLOCK_M), 2], "dkdv": [B, H, cdiv(T, BLOCK_N), 2]}: per program, the
        number of (unmasked, masked) blocks its loop visited.
    """
    check_inputs(q, k, v)
    B, H, T, _ = q.shape
    n_m, n_n = triton.cdiv(T, blocks[0]), triton.cdiv(T, blocks[1])
    counts = {name: torch.full((B, H, n, 2), -1, dtype=torch.int32, device=q.device)
              for name, n in (("fwd", n_m), ("dkdv", n_n), ("dq", n_m))}  # fmt: skip
    out, lse = forward(q, k, v, mask, prefix_len, tiles=blocks, visits=counts["fwd"])
    backward(torch.ones_like(out), q, k, v, out, lse, mask, prefix_len, tiles=blocks,
             visits=(counts["dq"], counts["dkdv"]))  # fmt: skip
    return counts
