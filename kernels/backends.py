"""PyTorch attention backends: eager reference, SDPA and FlexAttention.

All take ``q, k, v`` [B, H, T, D] and return [B, H, T, D] in the input dtype.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from aimpre.kernels.masks import dense_mask


def reference(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None) -> Tensor:
    """Eager softmax(q k^T / sqrt(D)) v; float32 math for half inputs, float64 stays float64 (the test oracle)."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = (q.to(dt) @ k.to(dt).transpose(-2, -1)) * q.shape[-1] ** -0.5  # [B, H, T, T]
    allowed = dense_mask(mask, prefix_len, q.shape[-2], q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return (s.softmax(dim=-1) @ v.to(dt)).to(q.dtype)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None) -> Tensor:
    """torch SDPA: flash for full/causal; the prefix mask goes in as an explicit boolean matrix."""
    if mask == "full":
        return F.scaled_dot_product_attention(q, k, v)
    if mask == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(mask, prefix_len, q.shape[-2], q.device))


@cache
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# One forward passes the same prefix_len tensor to every block: build its block mask once.
_block_mask_cache: dict[str, Any] = {}


def _block_mask(mask: str, prefix_len: Tensor | None, B: int, T: int, device: torch.device) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    key = (mask, T, str(device), id(prefix_len), prefix_len._version if prefix_len is not None else 0)
    hit = _block_mask_cache.get("key")
    if hit == key:
        return _block_mask_cache["value"]
    if mask == "causal":

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return ki <= qi

        bm = create_block_mask(mask_mod, None, None, T, T, device=device)
    else:
        assert prefix_len is not None
        plen = prefix_len.to(device)

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return (ki <= qi) | (ki < plen[b])

        bm = create_block_mask(mask_mod, B, None, T, T, device=device)
    _block_mask_cache.update(key=key, value=bm, prefix_len=prefix_len)  # keep prefix_len alive: id() stays unique
    return bm


def flex(q: Tensor, k: Tensor, v: Tensor, mask: str, prefix_len: Tensor | None) -> Tensor:
    """FlexAttention with a block mask (compiled on CUDA; eager elsewhere, where it is a slow reference)."""
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = None if mask == "full" else _block_mask(mask, prefix_len, q.shape[0], q.shape[-2], q.device)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=block_mask)
