"""The Triton attention kernels as differentiable functions: a cheap eager path, and ops torch.compile sees into.

Two paths, one set of launchers (``triton_attention.py``):

- eager: a ``torch.autograd.Function`` that launches the kernels directly, with the tiles chosen once per shape
  key. It costs what Python must: no dispatcher round trips, no Autotuner on the hot path.
- under ``torch.compile`` (or any tracing, e.g. fake tensors): ``torch.library.triton_op`` ops, forward and
  backward tied by ``register_autograd``, whose bodies launch through ``wrap_triton``: AOTAutograd decomposes them
  into ``triton_kernel_wrapper`` nodes, Inductor launches our kernels from its compiled code (autotuning their
  configs itself) and CUDA graphs can capture them. An opaque ``custom_op`` would stay one Python call per use.

The triton_op path is also the fake/meta implementation, so shapes trace without running Triton. Eager, the same
ops would work but cost more. Host time of one fwd+bwd with every Triton launch stubbed out (the launches
themselves, three, come on top), on the 2-core CPU of the session that built this: a no-op autograd.Function in
the same loop (the floor) 28 us; the custom_op before this design, on q/k/v views, 253 us (275 us in a second
run, 2026-12-01; + 3 x 12 us of Autotuner.__call__ on a GPU); the triton_op called eagerly 133 us; this
autograd.Function on [B, H, T, D] views 128 us, on the packed projection 64 us (66 us in the second run). Not yet
measured on a GPU host.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.library import triton_op

from aimpre.kernels import triton_attention as ta

# ----------------------------------------------------------------------------------------------------------------
# Ops for torch.compile. Inputs are checked by the entry points below (under compile only fake tensors reach here).


@triton_op("aimpre::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None) -> tuple[Tensor, Tensor]:
    """Output [B, H, T, D] and log-sum-exp float32 [B, H, T] of q, k, v [B, H, T, D]."""
    return ta.forward(q, k, v, mask, prefix_len, traced=True)


@triton_op("aimpre::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: str, prefix_len: Tensor | None
) -> Tensor:
    """dq, dk, dv stacked [3, B, H, T, D] from the gradient of the output and the forward's output and log-sum-exp."""
    return ta.backward(grad_out, q, k, v, out, lse, mask, prefix_len, traced=True)


@triton_op("aimpre::flash_attention_qkv_fwd", mutates_args=())
def flash_attention_qkv_fwd(qkv: Tensor, mask: str, prefix_len: Tensor | None) -> tuple[Tensor, Tensor]:
    """Output [B, T, H, D] and log-sum-exp float32 [B, H, T] of the packed projection qkv [B, T, 3, H, D]."""
    return ta.forward_qkv(qkv, mask, prefix_len, traced=True)


@triton_op("aimpre::flash_attention_qkv_bwd", mutates_args=())
def flash_attention_qkv_bwd(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, mask: str, prefix_len: Tensor | None
) -> Tensor:
    """The gradient of qkv, one [B, T, 3, H, D] tensor, from the gradient of the [B, T, H, D] output."""
    return ta.backward_qkv(grad_out, qkv, out, lse, mask, prefix_len, traced=True)


def _setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    *tensors, mask, prefix_len = inputs
    ctx.save_for_backward(*tensors, *output, prefix_len)
    ctx.mask = mask


def _backward(ctx: Any, grad_out: Tensor, _grad_lse: Tensor | None) -> tuple:
    q, k, v, out, lse, prefix_len = ctx.saved_tensors
    return *flash_attention_bwd(grad_out, q, k, v, out, lse, ctx.mask, prefix_len).unbind(0), None, None


def _backward_qkv(ctx: Any, grad_out: Tensor, _grad_lse: Tensor | None) -> tuple:
    qkv, out, lse, prefix_len = ctx.saved_tensors
    return flash_attention_qkv_bwd(grad_out, qkv, out, lse, ctx.mask, prefix_len), None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup)
flash_attention_qkv_fwd.register_autograd(_backward_qkv, setup_context=_setup)


def _name_kernels() -> None:
    # torch folds the source of a triton_op's kernels into the keys of its compile caches (AOTAutograd), finding
    # them by reading the op's source for wrap_triton(NAME); ours launch through one helper, so name them here, or
    # an edited kernel could be served stale from the cache. A private table: skipped if a torch lacks it.
    table = getattr(torch._library.triton, "triton_ops_to_kernels", None)
    if isinstance(table, dict):
        kernels = [k.tuned for k in ta.KERNELS.values()]
        for op in ("fwd", "bwd", "qkv_fwd", "qkv_bwd"):
            table[f"aimpre::flash_attention_{op}"] = kernels


_name_kernels()

# ----------------------------------------------------------------------------------------------------------------
# Eager path.


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None) -> Tensor:
        out, lse = ta.forward(q, k, v, mask, prefix_len)
        ctx.save_for_backward(q, k, v, out, lse, prefix_len)
        ctx.mask = mask
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        q, k, v, out, lse, prefix_len = ctx.saved_tensors
        return *ta.backward(grad_out, q, k, v, out, lse, ctx.mask, prefix_len).unbind(0), None, None


class _AttentionQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, qkv: Tensor, mask: str, prefix_len: Tensor | None) -> Tensor:
        out, lse = ta.forward_qkv(qkv, mask, prefix_len)
        ctx.save_for_backward(qkv, out, lse, prefix_len)
        ctx.mask = mask
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        qkv, out, lse, prefix_len = ctx.saved_tensors
        return ta.backward_qkv(grad_out, qkv, out, lse, ctx.mask, prefix_len), None, None


def _eager(x: Tensor) -> bool:
    """Plain tensors outside torch.compile take the autograd.Function; compiling or tracing (fake, functional or
    other subclass tensors) takes the triton_op, which is what tracers understand."""
    return type(x) is Tensor and not torch.compiler.is_compiling()


def _prefix(mask: str, prefix_len: Tensor | None, device: torch.device) -> Tensor | None:
    """prefix_len as the kernels read it: int32 or int64 on q's device (no copy when it already is), else None."""
    if mask != "prefix" or prefix_len is None:
        return None
    if prefix_len.device != device or prefix_len.dtype not in (torch.int32, torch.int64):
        return prefix_len.to(device=device, dtype=torch.int32)
    return prefix_len


def flash_attention(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None) -> Tensor:
    """Triton attention with an AIMv2 mask; the ``triton`` backend of ``aimpre.kernels.attention``.

    Args:
        q, k, v: [B, H, T, D], fp16/bf16 (fp32 runs too, with exact fp32 products: a test path, not a fast one),
            D in ``triton_attention.HEAD_DIMS``.
        mask: "full", "causal" or "prefix".
        prefix_len: int tensor [B] for mask="prefix" (int32/int64 on q's device are read as they are).

    Returns:
        [B, H, T, D] in q's dtype.
    """
    ta.check_inputs(q, k, v)
    plen = _prefix(mask, prefix_len, q.device)
    if _eager(q):
        return _Attention.apply(q, k, v, mask, plen)
    return flash_attention_fwd(q, k, v, mask, plen)[0]


def flash_attention_qkv(qkv: Tensor, mask: str, prefix_len: Tensor | None) -> Tensor:
    """Triton attention reading q, k, v straight from the fused projection; the ``triton`` backend of
    ``aimpre.kernels.attention_qkv``.

    The output is written as [B, T, H, D] (so ``.view(B, T, H * D)`` feeds the output projection) and the backward
    writes dq, dk and dv into one [B, T, 3, H, D] gradient: no permute, clone or stack either way.

    Args:
        qkv: [B, T, 3, H, D] (timm's layout: q, k, v, then heads), dtype and head dim as for ``flash_attention``.
        mask, prefix_len: as for ``flash_attention``.

    Returns:
        [B, T, H, D] contiguous, in qkv's dtype.
    """
    ta.check_qkv(qkv)
    plen = _prefix(mask, prefix_len, qkv.device)
    if _eager(qkv):
        return _AttentionQKV.apply(qkv, mask, plen)
    return flash_attention_qkv_fwd(qkv, mask, plen)[0]
