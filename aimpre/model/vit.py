"""The AIMv2 vision encoder: a ViT with prefix attention during pretraining and full attention after.

Structure (Fini et al. 2024; apple/ml-l3m ``ViTPreprocessor`` + ``Transformer``; timm ``aimv2_*_patch14_224``;
transformers ``Aimv2VisionModel``): 14x14 patch convolution with bias -> RMSNorm -> + learned position
embedding [1, N, d] -> pre-norm blocks -> final RMSNorm. No CLS token. Parameter names are timm's, so the
encoder's state dict *is* a timm state dict.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from aimpre.model.layers import Block, RMSNorm, blocks_mask, init_linear_xavier
from aimpre.model.moe import MoEFeedForward, moe_blocks
from aimpre.model.posemb import sincos_2d
from aimpre.model.sizes import ModelConfig


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self.norm = RMSNorm(dim, eps)

    def forward(self, images: Tensor) -> Tensor:
        x = self.proj(images)  # [B, 3, H, W] -> [B, d, H/p, W/p]
        return self.norm(x.flatten(2).transpose(1, 2))  # -> [B, N, d], patches in raster order


class AIMv2Encoder(nn.Module):
    """ViT encoder; ``forward(images, prefix_len)`` returns final-norm tokens [B, N, width].

    With ``prefix_len`` ([B] ints) attention is prefix-causal: bidirectional among the first ``prefix_len[b]``
    patches, causal after. Without it (features, export) attention is full.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width, cfg.norm_eps)
        # sincos2d: no table; each forward computes the embedding of its images' grid (native resolution)
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.width)) if cfg.pos_embed == "learned" else None
        )
        sparse = moe_blocks(cfg.depth, cfg.moe_blocks) if cfg.moe_experts else set()
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_hidden, cfg.norm_eps, cfg.attn_backend, cfg.fused, self._moe(cfg))
            if i in sparse
            else Block(cfg.width, cfg.heads, cfg.mlp_hidden, cfg.norm_eps, cfg.attn_backend, cfg.fused)
            for i in range(cfg.depth)
        )
        self.norm = RMSNorm(cfg.width, cfg.norm_eps, cfg.fused)
        self.init_weights()

    def init_weights(self) -> None:
        """ml-l3m init: xavier-uniform linears, the patch conv initialised like a linear (as MAE), pos std .02."""
        init_linear_xavier(self)
        for m in self.modules():
            if isinstance(m, MoEFeedForward):
                m.reset_parameters()
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        assert self.patch_embed.proj.bias is not None
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)

    @staticmethod
    def _moe(cfg: ModelConfig) -> MoEFeedForward:
        hidden = cfg.mlp_hidden if cfg.moe_hidden is None else cfg.moe_hidden
        return MoEFeedForward(cfg.width, hidden, cfg.moe_experts, cfg.moe_top_k, cfg.fused)

    def moe_stats(self) -> list[tuple[Tensor, Tensor]]:
        """The routing statistics of the last training forward, per MoE block in order, and clears them.

        Each is (f [E] the share of routed tokens per expert, P [E] the mean router probability); empty for a
        dense encoder or after an eval-mode forward.
        """
        out = []
        for block in self.blocks:
            mlp = block.mlp
            if isinstance(mlp, MoEFeedForward) and mlp.stats is not None:
                out.append(mlp.stats)
                mlp.stats = None
        return out

    def embed(self, images: Tensor) -> Tensor:
        """Patch tokens plus positions [B, N, d]; the grid (N = H/p x W/p, in raster order) is the images'."""
        x = self.patch_embed(images)  # [B, N, d]
        if self.pos_embed is None:
            p = self.cfg.patch_size
            return x + sincos_2d(images.shape[-2] // p, images.shape[-1] // p, x.shape[-1], x.device).to(x.dtype)
        return x + self.pos_embed

    def forward(self, images: Tensor, prefix_len: Tensor | None = None) -> Tensor:
        x = self.embed(images)  # [B, N, d]
        # built once here and handed to every block: nothing inside a (compiled) block builds or caches a mask
        mask = blocks_mask(self.blocks, "full" if prefix_len is None else "prefix", prefix_len, x)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def forward_intermediates(
        self,
        images: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = True,
        prefix_len: Tensor | None = None,
    ) -> list[Tensor]:
        """Outputs [B, N, d] of chosen blocks, in the order asked (as timm's ``forward_intermediates``).

        AIM v1 found its best probe features in the middle blocks, not the last one.

        Args:
            images: [B, 3, H, W], normalised.
            indices: an int n (the last n blocks), block indices (negative ones count from the end), or None (all).
            norm: apply the final RMSNorm to each output, so every block's features are on the last one's scale.
            prefix_len: as ``forward``.
        """
        wanted = block_indices(indices, len(self.blocks))
        x = self.embed(images)  # [B, N, d]
        mask = blocks_mask(self.blocks, "full" if prefix_len is None else "prefix", prefix_len, x)
        outs: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):  # the blocks after the last one asked: not run
            x = block(x, mask)
            if i in wanted:
                outs[i] = self.norm(x) if norm else x
        return [outs[i] for i in wanted]


def block_indices(indices: int | Sequence[int] | None, depth: int) -> list[int]:
    """Block indices in 0..depth-1 from ``forward_intermediates``' ``indices``; out of range is a ValueError."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 1 <= indices <= depth:
            raise ValueError(f"the last {indices} blocks: the encoder has {depth}")
        return list(range(depth - indices, depth))
    if not indices:
        raise ValueError("no block indices given")
    bad = [i for i in indices if not -depth <= i < depth]
    if bad:
        raise ValueError(f"block indices {bad} out of range: the encoder has {depth} blocks (0..{depth - 1}, or -1 ..)")
    return [i % depth for i in indices]
