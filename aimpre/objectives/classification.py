"""Supervised classification, the classic baseline: pooled encoder tokens -> linear -> cross-entropy on the label.

The encoder runs with full attention. Pooling is ``model.pool`` (MAP attention pooling or the mean, as the
contrastive image head); the linear layer starts at zero (big_vision's ``head_zeroinit``), so the first loss is
log(num_classes) whatever the encoder.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from aimpre.model.sizes import ModelConfig
from aimpre.model.vit import AIMv2Encoder
from aimpre.objectives.base import EncoderHead
from aimpre.objectives.towers import Pool


class ClassHead(nn.Module):
    """Encoder tokens [B, N, width] -> logits [B, num_classes]."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.pool = Pool(cfg.width, cfg.heads, cfg.mlp_hidden, cfg.pool, cfg.norm_eps)
        self.linear = nn.Linear(cfg.width, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        self.pool.init_weights()
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.linear(self.pool(tokens))


class Classifier(EncoderHead):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.num_classes is None or cfg.num_classes < 2:
            raise ValueError(
                f"model.num_classes must be at least 2 for objective=classification, got {cfg.num_classes}"
            )
        self.cfg = cfg
        self.encoder = AIMv2Encoder(cfg)
        self.head = ClassHead(cfg, cfg.num_classes)

    def forward(self, images: Tensor, batch: dict[str, Any], prefix_len: Tensor | None = None) -> dict[str, Tensor]:
        """``loss``: cross-entropy of the logits against ``batch["label"]`` (int64 [B]); ``prefix_len`` unused."""
        logits = self.head(self.encoder(images))
        return {"loss": F.cross_entropy(logits.float(), batch["label"])}
