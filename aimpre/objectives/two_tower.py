"""The contrastive objectives' model (SigLIP, CLIP): the encoder with full attention -> ``ImageHead``, a
``TextTower`` for the caption, and the loss (which holds the learnable temperature, and SigLIP's bias)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from aimpre.model.sizes import ModelConfig
from aimpre.model.vit import AIMv2Encoder
from aimpre.objectives.base import Objective, count
from aimpre.objectives.contrastive import ClipLoss, SigLipLoss
from aimpre.objectives.towers import ImageHead, TextTower


class TwoTower(Objective):
    """Attribute names are part of the checkpoint format: ``encoder``, ``image_head``, ``text_tower``, ``loss``."""

    def __init__(self, cfg: ModelConfig, loss: type[ClipLoss] | type[SigLipLoss]) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is unresolved (None): set it or let the training set-up take it")
        self.cfg = cfg
        self.encoder = AIMv2Encoder(cfg)
        self.image_head = ImageHead(cfg)
        self.text_tower = TextTower(cfg, cfg.vocab_size)
        self.loss = loss()

    def init_weights(self) -> None:
        self.encoder.init_weights()
        self.image_head.init_weights()
        self.text_tower.init_weights()
        fresh = type(self.loss)()  # the initial temperature (and bias) are the loss's defaults
        with torch.no_grad():
            for k, v in fresh.named_parameters():
                self.loss.get_parameter(k).copy_(v)

    def param_counts(self) -> dict[str, int]:
        """encoder; heads: the image head and the loss's temperature (and bias); text: the text tower."""
        parts = {
            "encoder": count(self.encoder),
            "heads": count(self.image_head) + count(self.loss),
            "text": count(self.text_tower),
        }
        return {**parts, "total": sum(parts.values())}

    def embed(self, images: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Unnormalised image and text embeddings [B, embed_dim] (full attention in the encoder)."""
        return self.image_head(self.encoder(images)), self.text_tower(batch["text"], batch["text_mask"])

    def forward(self, images: Tensor, batch: dict[str, Any], prefix_len: Tensor | None = None) -> dict[str, Tensor]:
        """``loss``: this rank's slice of the contrastive loss over every rank's pairs (``prefix_len`` unused)."""
        return {"loss": self.loss(*self.embed(images, batch))}
