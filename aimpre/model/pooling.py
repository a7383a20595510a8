"""Probe heads on frozen encoder tokens: the attentive probe of AIM/AIMv2 and a mean-pooled linear probe.

The attentive probe follows AIM (El-Nouby et al. 2024) and apple/ml-aim's ``AttentionPoolingClassifier``, the
frozen-trunk evaluation AIMv2 (Fini et al. 2024) reports: tokens are standardised per channel by a BatchNorm without
affine parameters, a learned query (std 0.02) attends over them through bias-free key and value projections
(multi-head, softmax(q k^T / sqrt(d)) v), the heads' outputs are concatenated, averaged over queries, and a linear
layer classifies. The linear probe standardises the mean-pooled tokens the same way before its linear layer.

Both take an optional ``valid`` mask [B, N] (native-resolution images zero-padded to a canvas): padded tokens are
left out of the mean, the BatchNorm's statistics and the attention's keys, so what the padding holds never changes
the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttentionPoolingClassifier(nn.Module):
    def __init__(self, dim: int, classes: int, heads: int, queries: int = 1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"probe width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.randn(1, queries, dim) * 0.02)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor, valid: Tensor | None = None) -> Tensor:
        """Logits [B, classes] from tokens [B, N, dim]; ``valid`` [B, N] bool: False on padded tokens."""
        B, N, C = tokens.shape
        H, D = self.heads, C // self.heads
        mask = None
        if valid is None:
            x = self.norm(tokens.transpose(1, 2)).transpose(1, 2)  # BatchNorm1d normalises dim 1: [B, C, N] and back
        else:  # statistics over the image's tokens only: [M, C] is what BatchNorm1d sees of them
            x = torch.zeros_like(tokens)
            x[valid] = self.norm(tokens[valid])
            mask = valid[:, None, None, :]  # [B, 1, 1, N]: no query attends to a padded key
        q = self.query.expand(B, -1, -1).reshape(B, -1, H, D).transpose(1, 2)  # [B, Q, C] -> [B, H, Q, D]
        k = self.k(x).view(B, N, H, D).transpose(1, 2)  # [B, H, N, D]
        v = self.v(x).view(B, N, H, D).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, Q, D]
        pooled = pooled.transpose(1, 2).reshape(B, -1, C).mean(dim=1)  # [B, Q, C] -> [B, C]
        return self.linear(pooled)


class MeanPoolingClassifier(nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor, valid: Tensor | None = None) -> Tensor:
        """Logits [B, classes] from tokens [B, N, dim]; ``valid`` [B, N] bool: False on padded tokens."""
        return self.linear(self.norm(masked_mean(tokens, valid)))


def masked_mean(tokens: Tensor, valid: Tensor | None = None) -> Tensor:
    """[B, dim]: the mean of tokens [B, N, dim] over those ``valid`` [B, N] marks (all when None).

    ``torch.where``, not a product: a padded token holding inf or NaN stays out too.
    """
    if valid is None:
        return tokens.mean(dim=1)
    kept = torch.where(valid[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
    return kept.sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp(min=1).to(tokens.dtype)
