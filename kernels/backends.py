"""Attention backends: eager reference, SDPA, FlexAttention, our Triton kernel and xformers.

All take ``q, k, v`` [B, H, T, D] and return [B, H, T, D] in the input dtype. Triton and xformers are optional
imports, made only when their backend is called: ``import aimpre.kernels`` works on CPU-only installs.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from aimpre.kernels.masks import Mask, dense_mask

# What the Triton kernels take (checked again, with errors, by triton_attention.check_inputs).
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def reference(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None) -> Tensor:
    """Eager softmax(q k^T / sqrt(D)) v; float32 math for half inputs, float64 stays float64 (the test oracle)."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = (q.to(dt) @ k.to(dt).transpose(-2, -1)) * q.shape[-1] ** -0.5  # [B, H, T, T]
    allowed = dense_mask(mask, prefix_len, q.shape[-2], q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return (s.softmax(dim=-1) @ v.to(dt)).to(q.dtype)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None, prebuilt: Mask | None = None) -> Tensor:
    """torch SDPA: flash for full/causal; the prefix mask goes in as an explicit boolean matrix (``prebuilt``'s,
    built once per forward, or one built for this call)."""
    if mask == "full":
        return F.scaled_dot_product_attention(q, k, v)
    if mask == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    dense = prebuilt.dense if prebuilt is not None and prebuilt.dense is not None else None
    if dense is None:
        dense = dense_mask(mask, prefix_len, q.shape[-2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)


@cache
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_mask(mask: str, prefix_len: Tensor | None, B: int, T: int, device: torch.device) -> Any:
    """FlexAttention's BlockMask for ``mask``; None for "full".

    No cache: the encoder and decoder build it once per forward (``dispatch.prepare_mask``) and hand it to every
    block. A cache looked up inside the blocks broke a compiled model's graph at every block (issue 22).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if mask == "full":
        return None
    if mask == "causal":

        def causal(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return ki <= qi

        return create_block_mask(causal, None, None, T, T, device=device)
    assert prefix_len is not None
    plen = prefix_len.to(device)

    def prefix(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        return (ki <= qi) | (ki < plen[b])

    return create_block_mask(prefix, B, None, T, T, device=device)


def flex(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None, prebuilt: Mask | None = None) -> Tensor:
    """FlexAttention with a block mask (compiled on CUDA; eager elsewhere, where it is a slow reference).

    ``prebuilt``: the forward's mask with its block mask; without one the block mask is built for this call.
    Inside a compiled model flex_attention is called as is: the model's own compile covers it.
    """
    from torch.nn.attention.flex_attention import flex_attention

    bm = prebuilt.block_mask if prebuilt is not None and prebuilt.block_mask is not None else None
    if bm is None and mask != "full":
        bm = block_mask(mask, prefix_len, q.shape[0], q.shape[-2], q.device)
    fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    return fn(q, k, v, block_mask=bm)


def _triton_op() -> Any:
    try:
        from aimpre.kernels import triton_op
    except ImportError as e:
        raise RuntimeError(
            f"backend='triton' needs the triton package (it ships with PyTorch's CUDA wheels) and it did not import "
            f"({e}); use backend='sdpa' or 'flex'"
        ) from e
    return triton_op


def triton(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None) -> Tensor:
    """Our Triton flash attention (``triton_attention.py``): direct launches eager, visible kernels compiled."""
    return _triton_op().flash_attention(q, k, v, mask, prefix_len)


def triton_qkv(qkv: Tensor, mask: str, prefix_len: Tensor | None) -> Tensor:
    """Our Triton flash attention on the packed [B, T, 3, H, D] projection; returns [B, T, H, D]."""
    return _triton_op().flash_attention_qkv(qkv, mask, prefix_len)


def xformers(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None) -> Tensor:
    """xformers' memory-efficient attention: optional (``pip install 'aimpre[xformers]'``), CUDA only."""
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise RuntimeError(f"backend='xformers' needs the xformers package, which did not import ({e})") from e
    if not q.is_cuda:
        raise ValueError(f"backend='xformers' runs on CUDA tensors only, got {q.device}")
    B, H, T, _ = q.shape
    bias: Any = None
    if mask == "causal":
        bias = xops.LowerTriangularMask()
    elif mask == "prefix":
        # No per-sample prefix bias in xformers: an additive one, its rows padded to a multiple of 8 as xformers
        # wants them aligned, broadcast over heads.
        allowed = dense_mask(mask, prefix_len, T, q.device)  # [B, 1, T, T]
        assert allowed is not None
        bias = torch.zeros(B, 1, T, -(-T // 8) * 8, dtype=q.dtype, device=q.device)[..., :T]
        bias = bias.masked_fill_(~allowed, float("-inf")).expand(B, H, T, T)  # in place: keeps the padded rows
    # xformers takes [B, T, H, D]: transposed views, no copies
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)  # [B, T, H, D] -> [B, H, T, D]
