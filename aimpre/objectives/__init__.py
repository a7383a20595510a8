"""Pretraining objectives beside AIMv2's, one file each (see DESIGN.md, "Objectives beside AIMv2").

Every objective trains the same ``AIMv2Encoder`` on the same data pipeline; only its heads, towers and loss differ.
``needs`` says which sample fields an objective reads (the data pipeline yields only those, and skips samples
lacking them), ``uses_prefix`` whether its encoder trains with prefix attention (the autoregressive ones) or full.
"""

from collections.abc import Callable

from aimpre.model.sizes import OBJECTIVES, ModelConfig
from aimpre.objectives.aimv1 import AIMv1
from aimpre.objectives.aimv2 import AIMv2Objective
from aimpre.objectives.base import Objective
from aimpre.objectives.classification import Classifier
from aimpre.objectives.clip import CLIP
from aimpre.objectives.contrastive import ClipLoss, SigLipLoss, gather_with_grad
from aimpre.objectives.distill import AIMv2Distill, Distill
from aimpre.objectives.siglip import SigLIP

_NEEDS = {
    "aimv2": frozenset({"text"}),
    "aimv1": frozenset(),
    "siglip": frozenset({"text"}),
    "clip": frozenset({"text"}),
    "classification": frozenset({"label"}),
    "distill": frozenset(),
    "aimv2_distill": frozenset({"text"}),
}


def _known(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    return objective


def needs(objective: str) -> frozenset[str]:
    """The sample fields ``objective`` reads besides the image: a subset of {"text", "label"}."""
    return _NEEDS[_known(objective)]


def uses_prefix(objective: str) -> bool:
    """Whether the encoder trains with prefix attention (autoregressive objectives) rather than full attention."""
    return _known(objective) in ("aimv2", "aimv1", "aimv2_distill")


_BUILDERS: dict[str, Callable[[ModelConfig], Objective]] = {
    "aimv2": AIMv2Objective,
    "aimv1": AIMv1,
    "siglip": SigLIP,
    "clip": CLIP,
    "classification": Classifier,
    "distill": Distill,
    "aimv2_distill": AIMv2Distill,
}


def build(cfg: ModelConfig) -> Objective:
    """The whole pretraining model of ``cfg.objective``: ``.encoder`` plus its heads, towers and loss.

    Objectives reading text need ``cfg.vocab_size`` resolved (the training set-up takes the tokenizer's).
    """
    return _BUILDERS[_known(cfg.objective)](cfg)


__all__ = [
    "OBJECTIVES",
    "ClipLoss",
    "Objective",
    "SigLipLoss",
    "build",
    "gather_with_grad",
    "needs",
    "uses_prefix",
]
