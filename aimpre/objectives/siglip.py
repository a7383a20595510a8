"""SigLIP (Zhai et al. 2023): the two-tower model with the pairwise sigmoid loss (``contrastive.SigLipLoss``)."""

from __future__ import annotations

from aimpre.model.sizes import ModelConfig
from aimpre.objectives.contrastive import SigLipLoss
from aimpre.objectives.two_tower import TwoTower


def SigLIP(cfg: ModelConfig) -> TwoTower:
    return TwoTower(cfg, SigLipLoss)
