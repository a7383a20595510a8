"""Pretraining objectives beside AIMv2's, one file each (see DESIGN.md, "Objectives beside AIMv2").

Every objective trains the same ``AIMv2Encoder`` on the same data pipeline; only its heads, towers and loss differ.
``needs`` says which sample fields an objective reads (the data pipeline yields only those, and skips samples
lacking them), ``uses_prefix`` whether its encoder trains with prefix attention (the autoregressive ones) or full.
"""

from aimpre.model.sizes import OBJECTIVES
from aimpre.objectives.contrastive import ClipLoss, SigLipLoss, gather_with_grad

_NEEDS = {
    "aimv2": frozenset({"text"}),
    "aimv1": frozenset(),
    "siglip": frozenset({"text"}),
    "clip": frozenset({"text"}),
    "classification": frozenset({"label"}),
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
    return _known(objective) in ("aimv2", "aimv1")


__all__ = ["OBJECTIVES", "ClipLoss", "SigLipLoss", "gather_with_grad", "needs", "uses_prefix"]
