"""aimpre: pretraining vision encoders the AIMv2 way."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from aimpre.pretrained import ImageEncoder, create_model_from_pretrained

# Loaded on first use, so that `import aimpre` (the CLI's start-up) does not import torch.
_LAZY = {"create_model_from_pretrained": "aimpre.pretrained", "ImageEncoder": "aimpre.pretrained"}
__all__ = ["ImageEncoder", "__version__", "create_model_from_pretrained"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aimpre' has no attribute {name!r}")
