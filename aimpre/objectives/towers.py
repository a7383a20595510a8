"""Embedding heads shared by the contrastive objectives and LiT: token pooling and the text tower.

Pooling (``model.pool``): ``map`` is big_vision's multihead attention pooling (MAPHead, used by SigLIP): a learned
query attends over the tokens, then a residual MLP; ``mean`` averages the tokens. Masked positions (text pads) are
left out of both.

The text tower is CLIP's shape with our blocks: token embedding + learned positions -> causal pre-norm blocks ->
final RMSNorm -> pooling over the real tokens -> a bias-free projection to ``model.embed_dim``. Causal attention
means the pads after EOS never reach a real token, so the tower needs no padding mask inside its blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aimpre.model.layers import Block, RMSNorm, SwiGLU, init_linear_xavier
from aimpre.model.sizes import ModelConfig

POOLS = ("map", "mean")


class Pool(nn.Module):
    """[B, T, D] tokens (and an optional [B, T] bool mask, True on kept tokens) -> [B, D]."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, kind: str = "map", eps: float = 1e-5) -> None:
        super().__init__()
        if kind not in POOLS:
            raise ValueError(f"pooling must be one of {', '.join(POOLS)}, got {kind!r}")
        if dim % heads:
            raise ValueError(f"pooling width {dim} is not divisible by {heads} heads")
        self.kind, self.heads = kind, heads
        if kind == "map":
            self.query = nn.Parameter(torch.zeros(1, 1, dim))
            self.q = nn.Linear(dim, dim, bias=False)
            self.kv = nn.Linear(dim, 2 * dim, bias=False)
            self.proj = nn.Linear(dim, dim, bias=False)
            self.norm = RMSNorm(dim, eps)
            self.mlp = SwiGLU(dim, mlp_hidden)
            self.init_weights()

    def init_weights(self) -> None:
        if self.kind == "map":
            init_linear_xavier(self)
            nn.init.normal_(self.query, std=0.02)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.kind == "mean":
            if mask is None:
                return tokens.mean(dim=1)
            m = mask.to(tokens.dtype).unsqueeze(-1)  # [B, T, 1]
            return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
        B, T, C = tokens.shape
        H, D = self.heads, C // self.heads
        q = self.q(self.query).view(1, H, 1, D).expand(B, -1, -1, -1)  # [B, H, 1, D]
        k, v = self.kv(tokens).view(B, T, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x [B, H, T, D]
        keep = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, T], True = attend
        x = self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=keep).reshape(B, 1, C))  # [B, 1, C]
        return (x + self.mlp(self.norm(x)))[:, 0]


class ImageHead(nn.Module):
    """Encoder tokens [B, N, width] -> image embedding [B, embed_dim] (pooling, then a bias-free projection)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pool = Pool(cfg.width, cfg.heads, cfg.mlp_hidden, cfg.pool, cfg.norm_eps)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        self.pool.init_weights()
        nn.init.normal_(self.proj.weight, std=self.proj.in_features**-0.5)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(self.pool(tokens))


class TextTower(nn.Module):
    """Caption ids [B, L] and their mask [B, L] (True on real tokens, EOS included) -> [B, embed_dim]."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        w = cfg.text_width
        self.embed = nn.Embedding(vocab_size, w)
        self.pos = nn.Parameter(torch.zeros(1, cfg.text_len, w))
        self.blocks = nn.ModuleList(
            Block(w, cfg.text_heads, cfg.text_mlp_hidden, cfg.norm_eps, cfg.attn_backend, cfg.fused)
            for _ in range(cfg.text_depth)
        )
        self.norm = RMSNorm(w, cfg.norm_eps, cfg.fused)
        self.pool = Pool(w, cfg.text_heads, cfg.text_mlp_hidden, cfg.pool, cfg.norm_eps)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        init_linear_xavier(self.blocks)
        self.norm.reset_parameters()
        self.pool.init_weights()
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.01)
        nn.init.normal_(self.proj.weight, std=self.proj.in_features**-0.5)

    def forward(self, text: Tensor, text_mask: Tensor) -> Tensor:
        L = text.shape[1]
        x = self.embed(text) + self.pos[:, :L]  # [B, L, w]
        for block in self.blocks:
            x = block(x, "causal")
        return self.proj(self.pool(self.norm(x), text_mask))
