"""AIMv2: prefix-attention ViT encoder + causal multimodal decoder + pixel and text heads.

Fini et al. 2024, "Multimodal Autoregressive Pre-training of Large Vision Encoders", checked against
apple/ml-l3m ``configs/aimv2/001_aimv2_hfdata.yaml``. The decoder reads the whole multimodal sequence causally;
its output at image position i predicts patch i+1 (normalised pixels, MSE, only patches after the prefix) and its
output at text position j predicts caption token j (cross-entropy, pads ignored).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from aimpre.model.decoder import MultimodalDecoder
from aimpre.model.losses import head_text_loss, patchify, pixel_loss, valid_patches
from aimpre.model.moe import balance_loss
from aimpre.model.sizes import ModelConfig
from aimpre.model.vit import AIMv2Encoder


def _init_head(linear: nn.Linear, depth: int) -> None:
    """ml-l3m's ``fan_in_depth_scaled`` head init: truncated normal, variance 1 / (fan_in * (1 + depth))."""
    std = math.sqrt(1.0 / (linear.in_features * (1 + depth))) / 0.87962566103423978  # truncation correction
    nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)


class AIMv2(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is unresolved (None): set it or let the training set-up take it")
        self.cfg = cfg
        self.encoder = AIMv2Encoder(cfg)
        self.decoder = MultimodalDecoder(cfg, cfg.vocab_size)
        self.pixel_head = nn.Linear(cfg.dec_width, cfg.patch_dim, bias=False)
        self.text_head = nn.Linear(cfg.dec_width, cfg.vocab_size, bias=False)
        self.init_heads()

    def init_heads(self) -> None:
        _init_head(self.pixel_head, self.cfg.dec_depth)
        _init_head(self.text_head, self.cfg.dec_depth)

    def init_weights(self) -> None:
        """Re-initialises every parameter (used after building on the meta device and ``to_empty``)."""
        self.encoder.init_weights()
        self.decoder.init_weights()
        self.init_heads()

    def param_counts(self) -> dict[str, int]:
        """Parameters by part: encoder, decoder (with its input projection and text embeddings), heads, total."""
        count = lambda m: sum(p.numel() for p in m.parameters())
        parts = {"encoder": count(self.encoder), "decoder": count(self.decoder)}
        parts["heads"] = count(self.pixel_head) + count(self.text_head)
        return {**parts, "total": sum(parts.values())}

    def predict(self, images: Tensor, text: Tensor, prefix_len: Tensor) -> tuple[Tensor, Tensor]:
        """Returns next-patch predictions [B, N-1, p*p*3] and next-token logits [B, L, V]."""
        tokens = self.encoder(images, prefix_len)  # [B, N, width]
        h = self.decoder(tokens, text)  # [B, N + L, dec_width]
        N = tokens.shape[1]
        return self.pixel_head(h[:, : N - 1]), self.text_head(h[:, N:])

    def forward(
        self, images: Tensor, text: Tensor, text_mask: Tensor, prefix_len: Tensor, grid: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Args:
            images: normalised float images [B, 3, H, W]; the patch grid is (H/p, W/p), any shape with a
                sincos2d position embedding, patches in raster order (the decoder predicts the next one of that
                order, across row ends).
            text: caption ids [B, text_len] (EOS included, pad after).
            text_mask: [B, text_len] True on real tokens (EOS included), False on pads.
            prefix_len: [B] prefix lengths in 1..N-1.
            grid: native batches: [B, 2] each image's own (rows, columns) at the top-left of the zero-padded
                canvas; padded patches are never pixel targets. None: every patch is image.

        Returns:
            ``loss`` (the weighted sum), ``loss_image`` and ``loss_text``; with MoE encoder blocks in training also
            ``loss_balance`` (the unweighted load-balancing loss, added with ``model.moe_balance_weight``, as
            ml-l3m's third criterion) and ``expert_share`` ([MoE blocks, experts] token shares, detached).
        """
        return self.losses(self.encoder(images, prefix_len), images, text, text_mask, prefix_len, grid)

    def losses(
        self,
        tokens: Tensor,
        images: Tensor,
        text: Tensor,
        text_mask: Tensor,
        prefix_len: Tensor,
        grid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``forward``'s losses from the encoder's ``tokens`` [B, N, width] (the other arguments as ``forward``'s):
        the distilled objective (``aimpre.objectives.distill``) reuses the encoder's output for its own term."""
        h = self.decoder(tokens, text)  # [B, N + L, dec_width]
        N = tokens.shape[1]
        p = self.cfg.patch_size
        valid = None if grid is None else valid_patches(grid, images.shape[-2] // p, images.shape[-1] // p)
        loss_image = pixel_loss(self.pixel_head(h[:, : N - 1]), patchify(images, p), prefix_len, valid)
        # the text head inside the loss: with model.fused=liger (or auto on CUDA) the logits are never built whole
        loss_text = head_text_loss(h[:, N:], self.text_head.weight, text, text_mask, self.cfg.fused)
        loss = self.cfg.w_text * loss_text + self.cfg.w_image * loss_image
        out = {"loss": loss, "loss_image": loss_image, "loss_text": loss_text}
        stats = self.encoder.moe_stats()
        if stats and self.training:
            out["loss_balance"] = balance_loss(stats)
            out["loss"] = loss + self.cfg.moe_balance_weight * out["loss_balance"]
            out["expert_share"] = torch.stack([f for f, _ in stats]).detach()
        return out
