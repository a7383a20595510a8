"""CLIP (Radford et al. 2021): the two-tower model with the symmetric softmax InfoNCE (``contrastive.ClipLoss``)."""

from __future__ import annotations

from aimpre.model.sizes import ModelConfig
from aimpre.objectives.contrastive import ClipLoss
from aimpre.objectives.two_tower import TwoTower


def CLIP(cfg: ModelConfig) -> TwoTower:
    return TwoTower(cfg, ClipLoss)
