"""Pretraining objectives beside AIMv2's, one file each (see DESIGN.md, "Objectives beside AIMv2").

So far: the contrastive losses (CLIP, SigLIP) with their distributed exchange. The objectives themselves (text
tower, pooling, ``model.objective``) are not wired into training yet.
"""

from aimpre.objectives.contrastive import ClipLoss, SigLipLoss, gather_with_grad

__all__ = ["ClipLoss", "SigLipLoss", "gather_with_grad"]
