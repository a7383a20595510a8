"""``attention`` and ``attention_qkv``: the dispatch to a backend (``aimpre.kernels`` re-exports them)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

from aimpre.kernels import backends
from aimpre.kernels.masks import MASKS, check_mask, dense_mask

Backend = Callable[[Tensor, Tensor, Tensor, str, "Tensor | None"], Tensor]

BACKENDS: dict[str, Backend] = {
    "reference": backends.reference,
    "sdpa": backends.sdpa,
    "flex": backends.flex,
    "triton": backends.triton,
    "xformers": backends.xformers,
}

# Looked up once, without importing triton (CPU-only torch builds have none; the triton backend then says so).
HAS_TRITON = importlib.util.find_spec("triton") is not None


def available_backends() -> list[str]:
    return ["auto", *BACKENDS]


def _auto(q: Tensor, mask: str) -> str:
    # Expected, not yet measured (no GPU was lent to the session that wrote this; `aimpre bench attention` on one
    # decides): for prefix and causal masks our kernel skips the fully masked blocks, for the full mask SDPA's
    # flash kernel has nothing to skip and is the tuned one. fp32 goes to SDPA: our fp32 path is exact, not fast.
    if (
        q.is_cuda
        and mask != "full"
        and HAS_TRITON
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] in backends.TRITON_HEAD_DIMS
    ):
        return "triton"
    # Without Triton: SDPA falls back to a dense-mask kernel for the prefix mask, while FlexAttention (compiled,
    # so only under torch.compile) skips the fully masked blocks.
    if q.is_cuda and mask == "prefix" and torch.compiler.is_compiling():
        return "flex"
    return "sdpa"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: str = "full",
    prefix_len: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention with an AIMv2 mask.

    Args:
        q, k, v: [B, H, T, D].
        mask: "full", "causal" or "prefix" (bidirectional inside the first ``prefix_len[b]`` positions,
            causal after).
        prefix_len: int tensor [B], required for ``mask="prefix"``.
        backend: "auto" or a key of ``BACKENDS``.

    Returns:
        [B, H, T, D] in the dtype of ``q``.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, H, T, D] shape, got {q.shape}, {k.shape}, {v.shape}")
    check_mask(mask, prefix_len, q.shape[0])
    name = _auto(q, mask) if backend == "auto" else backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; available: {available_backends()}")
    return BACKENDS[name](q, k, v, mask, prefix_len)


# Backends that read the packed projection themselves; the others get q, k, v views of it.
PACKED: dict[str, Callable[[Tensor, str, Tensor | None], Tensor]] = {"triton": backends.triton_qkv}


def attention_qkv(
    qkv: Tensor,
    *,
    mask: str = "full",
    prefix_len: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """``attention`` on the fused q/k/v projection, in the layout a transformer block has it.

    The Triton backend reads q, k and v by strides from ``qkv``, writes its output as [B, T, H, D] and its
    backward writes one [B, T, 3, H, D] gradient: no permute, clone or stack on either side. Other backends get
    [B, H, T, D] views and their output transposed back (the copies they need stay theirs).

    Args:
        qkv: [B, T, 3, H, D], e.g. ``linear(x).view(B, T, 3, H, D)`` (timm's layout: q, k, v, then heads).
        mask, prefix_len, backend: as for ``attention``.

    Returns:
        [B, T, H, D] in the dtype of ``qkv`` (contiguous from the Triton backend, so ``.reshape(B, T, H * D)`` is
        a view).
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be [B, T, 3, H, D], got {tuple(qkv.shape)}")
    check_mask(mask, prefix_len, qkv.shape[0])
    name = _auto(qkv, mask) if backend == "auto" else backend
    if name in PACKED:
        return PACKED[name](qkv, mask, prefix_len)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, T, 3, H, D] -> 3 x [B, H, T, D] views
    y = attention(q, k, v, mask=mask, prefix_len=prefix_len, backend=name)  # [B, H, T, D]
    return y.transpose(1, 2)  # [B, T, H, D]


__all__ = ["BACKENDS", "MASKS", "attention", "attention_qkv", "available_backends", "dense_mask"]
