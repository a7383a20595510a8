"""What the trainer, export and FLOP counting rely on in every objective's model."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from aimpre.model.vit import AIMv2Encoder


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Objective(nn.Module):
    """An objective's whole pretraining model: ``encoder`` (what is kept, exported and probed) plus its heads.

    ``forward(images, batch, prefix_len)`` returns ``loss`` and the named parts it is made of; ``prefix_len`` is
    None for the objectives that train with full attention (``aimpre.objectives.uses_prefix``).
    """

    encoder: AIMv2Encoder

    def init_weights(self) -> None:
        """Re-initialises every parameter (after building on the meta device and ``to_empty``)."""
        raise NotImplementedError

    def param_counts(self) -> dict[str, int]:
        """Parameters by part, and ``total``; ``aimpre.scaling.param_counts`` reproduces it from the config."""
        raise NotImplementedError

    def forward(self, images: Tensor, batch: dict[str, Any], prefix_len: Tensor | None) -> dict[str, Tensor]:
        raise NotImplementedError


class EncoderHead(Objective):
    """An objective that is the encoder and one ``head`` (aimv1, classification): both re-initialise themselves,
    and the parameters split into ``encoder`` and ``heads``."""

    head: Any  # an nn.Module with init_weights()

    def init_weights(self) -> None:
        self.encoder.init_weights()
        self.head.init_weights()

    def param_counts(self) -> dict[str, int]:
        parts = {"encoder": count(self.encoder), "heads": count(self.head)}
        return {**parts, "total": sum(parts.values())}
