"""The AIMv2 model: nn.Modules only (no files, no Lightning)."""

from aimpre.model.aimv2 import AIMv2
from aimpre.model.decoder import MultimodalDecoder
from aimpre.model.losses import normalize_patches, patchify, pixel_loss, text_loss, unpatchify
from aimpre.model.sizes import SIZES, ModelConfig, model_config
from aimpre.model.vit import AIMv2Encoder

__all__ = [
    "SIZES",
    "AIMv2",
    "AIMv2Encoder",
    "ModelConfig",
    "MultimodalDecoder",
    "model_config",
    "normalize_patches",
    "patchify",
    "pixel_loss",
    "text_loss",
    "unpatchify",
]
