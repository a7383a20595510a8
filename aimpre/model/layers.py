"""Transformer building blocks shared by the encoder and the decoder.

Parameter names follow timm's ``vision_transformer.py`` as used by its ``aimv2_*`` models
(``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1_g/fc1_x/fc2``), so exporting the encoder to timm is
a prefix strip. The functions match apple/ml-l3m: RMSNorm (eps 1e-5), bias-free attention and
SwiGLU ``fc2(silu(fc1_g x) * fc1_x x)`` (ml-l3m's ``fc1``/``fc3``).

``fused`` (``model.fused``: auto | torch | liger) picks, per call and device, plain torch or liger-kernel's fused
RMSNorm, residual-add + RMSNorm and SwiGLU (``aimpre.kernels.fused``); it changes no parameter and no result beyond
rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from aimpre.kernels import Mask, attention_qkv, prepare_mask
from aimpre.kernels import fused as fused_ops
from aimpre.model.moe import MoEFeedForward


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, fused: str = "torch") -> None:
        super().__init__()
        fused_ops.check_mode(fused)
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return fused_ops.rms_norm(x, self.weight, self.eps, self.fused)

    def add(self, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """``(self(x + delta), x + delta)``: the residual add fused into the norm (one pass with liger)."""
        return fused_ops.add_rms_norm(x, delta, self.weight, self.eps, self.fused)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, fused: str = "torch") -> None:
        super().__init__()
        fused_ops.check_mode(fused)
        self.fused = fused
        self.fc1_g = nn.Linear(dim, hidden, bias=False)
        self.fc1_x = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(fused_ops.silu_mul(self.fc1_g(x), self.fc1_x(x), self.fused))


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

    def forward(self, x: Tensor, mask: str | Mask = "full", prefix_len: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        # [B, T, 3C] -> [B, T, 3, H, D] (timm's qkv layout: q, k, v then heads), read as it is by the kernel
        qkv = self.qkv(x).view(B, T, 3, self.heads, C // self.heads)
        y = attention_qkv(qkv, mask=mask, prefix_len=prefix_len, backend=self.backend)
        return self.proj(y.reshape(B, T, C))  # [B, T, H, D] -> [B, T, C], a view for the Triton backend


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1 x), then x + mlp(norm2 x).

    The first residual add and norm2 are one call (``RMSNorm.add``), a single kernel with liger. The block's last
    add stays separate: fusing it with the next block's norm1 would need blocks that take and return the pair
    (residual, pending branch output), which encoder, decoder, ``forward_intermediates`` and per-block compile and
    recompute would all have to thread through; left until ``aimpre bench ops`` shows the fused add pays on a GPU.

    ``recompute = True`` (activation checkpointing) keeps only the block's input for backward and recomputes the
    rest; it is a flag rather than a wrapper module so parameter names stay the same.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_hidden: int,
        eps: float,
        backend: str = "auto",
        fused: str = "torch",
        mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, eps, fused)
        self.attn = Attention(dim, heads, backend)
        self.norm2 = RMSNorm(dim, eps, fused)
        # the feed-forward: dense SwiGLU, or one given (a MoEFeedForward in AIMv2-MoE's encoder blocks)
        self.mlp = SwiGLU(dim, mlp_hidden, fused) if mlp is None else mlp
        self.recompute = False

    def _forward(
        self, x: Tensor, mask: str | Mask, prefix_len: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        h, x = self.norm2.add(x, self.attn(self.norm1(x), mask, prefix_len))  # x += attn(...); h = norm2(x)
        if isinstance(self.mlp, MoEFeedForward):  # its routing statistics come out as values (no side effect)
            y, stats = self.mlp.routed(h)
            return x + y, stats
        return x + self.mlp(h), None

    def forward(self, x: Tensor, mask: str | Mask = "full", prefix_len: Tensor | None = None) -> Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            out, stats = checkpoint(self._forward, x, mask, prefix_len, use_reentrant=False)
        else:
            out, stats = self._forward(x, mask, prefix_len)
        if isinstance(self.mlp, MoEFeedForward):
            # stored outside the checkpointed region: compiled, a store inside it breaks the graph (Dynamo will not
            # replay a side effect when backward recomputes the block)
            self.mlp.stats = stats if self.training else None
        return out


def blocks_mask(blocks: nn.ModuleList, kind: str, prefix_len: Tensor | None, x: Tensor) -> Mask:
    """The attention mask of one forward through ``blocks`` over ``x`` [B, T, d], built once for all of them
    (``aimpre.kernels.prepare_mask``) for the backends their attention runs."""
    names = {b.attn.backend for b in blocks if isinstance(b, Block)}
    return prepare_mask(kind, prefix_len, x.shape[0], x.shape[1], x.device, names)


def init_linear_xavier(module: nn.Module) -> None:
    """ml-l3m's trunk init: xavier-uniform weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            m.reset_parameters()
