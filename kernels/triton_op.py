"""The Triton attention kernels as torch custom ops, differentiable and opaque to ``torch.compile``.

Registered the way torchtitan registers its kernels: ``torch.library.custom_op`` for the forward and the
backward, ``register_fake`` so the compiler can trace shapes without running Triton, and ``register_autograd``
to tie them together (the custom-op form of a ``torch.autograd.Function``). The forward returns the
log-sum-exp next to the output so that the backward can rebuild the probabilities (FlashAttention-2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from aimpre.kernels import triton_attention as ta


@torch.library.custom_op("aimpre::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None) -> tuple[Tensor, Tensor]:
    """Output [B, H, T, D] and log-sum-exp float32 [B, H, T]; ``prefix_len`` int32 [B] for mask="prefix"."""
    return ta.forward(q, k, v, mask, prefix_len)


@flash_attention_fwd.register_fake
def _fwd_fake(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None) -> tuple[Tensor, Tensor]:
    B, H, T, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32)  # contiguous, as ta.forward's


@torch.library.custom_op("aimpre::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: str, prefix_len: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv [B, H, T, D] from the gradient of the output and the forward's output and log-sum-exp."""
    return ta.backward(grad_out, q, k, v, out, lse, mask, prefix_len)


@flash_attention_bwd.register_fake
def _bwd_fake(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: str, prefix_len: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, mask, prefix_len = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, prefix_len)
    ctx.mask = mask


def _backward(ctx: Any, grad_out: Tensor, _grad_lse: Tensor | None) -> tuple:
    q, k, v, out, lse, prefix_len = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(grad_out, q, k, v, out, lse, ctx.mask, prefix_len)
    return dq, dk, dv, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None) -> Tensor:
    """Triton attention with an AIMv2 mask; the ``triton`` backend of ``aimpre.kernels.attention``.

    Args:
        q, k, v: [B, H, T, D], fp16/bf16 (fp32 runs too, with exact fp32 products: a test path, not a fast one),
            D in ``triton_attention.HEAD_DIMS``.
        mask: "full", "causal" or "prefix".
        prefix_len: int tensor [B] for mask="prefix" (any int dtype, any device; moved to q's as int32).

    Returns:
        [B, H, T, D] in q's dtype.
    """
    ta.check_inputs(q, k, v)  # here rather than in the op: under torch.compile only the fake op sees the inputs
    plen = prefix_len.to(device=q.device, dtype=torch.int32) if mask == "prefix" and prefix_len is not None else None
    return flash_attention_fwd(q, k, v, mask, plen)[0]
