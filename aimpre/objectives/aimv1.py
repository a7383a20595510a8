"""AIM v1 (El-Nouby et al. 2024, "Scalable Pre-training of Large Autoregressive Image Models"): image only.

The prefix-causal encoder's token i goes through a per-patch MLP head (no attention: each token on its own) that
regresses patch i+1, normalised-pixel MSE on the patches after the prefix (``aimpre.model.losses.pixel_loss``).

The head follows apple/ml-l3m ``configs/aimv1/001_aim_v1_600M.yaml`` (``SimpleDecoder`` with a ``GenericIdentity``
attention): a linear with bias from the encoder width to ``head_width``, ``head_depth`` pre-norm residual MLP
blocks (LayerNorm eps 1e-5, bias-free linears, GELU, hidden = 4 x width), a final LayerNorm and a linear with bias
to p*p*3; xavier-uniform linears with zero biases (ml-l3m sets the output layer's ``fan_in_depth_scaled`` init and
then overwrites it with its xavier ``apply``: we keep what it ends up with). Two departures, both saying so here:
ml-l3m's identity "attention" still adds ``norm_1(x)`` to each block's residual (an artefact of reusing its
transformer block; the paper describes MLP blocks), which we leave out, and its fixed sin-cos position table in
the head, which we leave out too: the encoder's tokens already carry their positions.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from aimpre.model.losses import patchify, pixel_loss
from aimpre.model.sizes import ModelConfig
from aimpre.model.vit import AIMv2Encoder
from aimpre.objectives.base import EncoderHead

MLP_RATIO = 4  # the head blocks' hidden width over head_width (ml-l3m's mlp_ratio)


class MLPBlock(nn.Module):
    """x + fc2(gelu(fc1(norm x))): a transformer block without its attention."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, MLP_RATIO * dim, bias=False)
        self.fc2 = nn.Linear(MLP_RATIO * dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class PixelHead(nn.Module):
    """Encoder tokens [B, T, width] -> patch predictions [B, T, p*p*3], each token independently."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.head_width
        self.proj = nn.Linear(cfg.width, h)
        self.blocks = nn.ModuleList(MLPBlock(h, 1e-5) for _ in range(cfg.head_depth))
        self.norm = nn.LayerNorm(h, eps=1e-5)
        self.pred = nn.Linear(h, cfg.patch_dim)
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.proj(tokens)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))


class AIMv1(EncoderHead):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = AIMv2Encoder(cfg)
        self.head = PixelHead(cfg)

    def forward(self, images: Tensor, batch: dict[str, Any], prefix_len: Tensor | None) -> dict[str, Tensor]:
        """``loss`` = ``loss_image``: the MSE of next-patch predictions on the patches after the prefix."""
        if prefix_len is None:
            raise ValueError("aimv1 trains with prefix attention: prefix_len is required")
        tokens = self.encoder(images, prefix_len)  # [B, N, width]
        pred = self.head(tokens[:, :-1])  # token i predicts patch i+1: the last token predicts nothing
        loss = pixel_loss(pred, patchify(images, self.cfg.patch_size), prefix_len)
        return {"loss": loss, "loss_image": loss}
