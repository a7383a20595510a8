"""AIMv2 (the default objective): ``aimpre.model.AIMv2`` behind the objectives' calling convention."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from aimpre.model.aimv2 import AIMv2
from aimpre.objectives.base import Objective


class AIMv2Objective(AIMv2, Objective):
    """``AIMv2`` itself (the same parameters and checkpoint keys), called with the batch."""

    def forward(  # type: ignore[override]  # the batch instead of text and mask, as every objective
        self, images: Tensor, batch: dict[str, Any], prefix_len: Tensor | None
    ) -> dict[str, Tensor]:
        if prefix_len is None:
            raise ValueError("aimv2 trains with prefix attention: prefix_len is required")
        return super().forward(images, batch["text"], batch["text_mask"], prefix_len, batch.get("grid"))
