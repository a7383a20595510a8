"""Transformer building blocks shared by the encoder and the decoder.

Parameter names follow timm's ``vision_transformer.py`` as used by its ``aimv2_*`` models
(``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1_g/fc1_x/fc2``), so exporting the encoder to timm is
a prefix strip. The functions match apple/ml-l3m: RMSNorm (eps 1e-5), bias-free attention and
SwiGLU ``fc2(silu(fc1_g x) * fc1_x x)`` (ml-l3m's ``fc1``/``fc3``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from aimpre.kernels import attention_qkv


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden, bias=False)
        self.fc1_x = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1_g(x)) * self.fc1_x(x))


class Attention(nn.Module):
    """Multi-head self-attention; the mask kind is chosen per call, the kernel by ``aimpre.kernels``."""

    def __init__(self, dim: int, heads: int, backend: str = "auto") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, mask: str = "full", prefix_len: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        # [B, T, 3C] -> [B, T, 3, H, D] (timm's qkv layout: q, k, v then heads), read as it is by the kernel
        qkv = self.qkv(x).view(B, T, 3, self.heads, C // self.heads)
        y = attention_qkv(qkv, mask=mask, prefix_len=prefix_len, backend=self.backend)
        return self.proj(y.reshape(B, T, C))  # [B, T, H, D] -> [B, T, C], a view for the Triton backend


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1 x), then x + mlp(norm2 x).

    ``recompute = True`` (activation checkpointing) keeps only the block's input for backward and recomputes the
    rest; it is a flag rather than a wrapper module so parameter names stay the same.
    """

    def __init__(self, dim: int, heads: int, mlp_hidden: int, eps: float, backend: str = "auto") -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, eps)
        self.attn = Attention(dim, heads, backend)
        self.norm2 = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.recompute = False

    def _forward(self, x: Tensor, mask: str, prefix_len: Tensor | None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask, prefix_len)
        return x + self.mlp(self.norm2(x))

    def forward(self, x: Tensor, mask: str = "full", prefix_len: Tensor | None = None) -> Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            out: Tensor = checkpoint(self._forward, x, mask, prefix_len, use_reentrant=False)
            return out
        return self._forward(x, mask, prefix_len)


def init_linear_xavier(module: nn.Module) -> None:
    """ml-l3m's trunk init: xavier-uniform weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            m.reset_parameters()
