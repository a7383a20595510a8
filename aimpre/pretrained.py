"""One call from any export or run to an encoder and its preprocessing, the way open_clip and timm users load one.

``create_model_from_pretrained(source)`` is open_clip's function of that name for aimpre's sources: it returns
``(model, preprocess)``. ``preprocess`` turns a PIL image into the normalised tensor the encoder was trained with
(``aimpre.export.Preprocess``); ``model(images)`` gives the pooled features (timm's ``model(x)`` with
``num_classes=0``; the mean of the tokens is what an hf export's ``pooler_output`` and timm's ``global_pool="avg"``
give), ``model.forward_features(images)`` the tokens and ``model.encode_image(images, normalize=True)`` open_clip's
unit-length embedding. ``tests/test_entry.py`` checks both against transformers' own image processor and
``image-feature-extraction`` pipeline on an hf export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aimpre.export import ExportError, Preprocess, _check_preprocessing, load
from aimpre.model import AIMv2Encoder

POOLS = ("avg", "max", "none")


class ImageEncoder(nn.Module):
    """A loaded encoder with pooling: ``forward`` is pooled features, ``forward_features`` the tokens.

    Images may be on any device and in any float dtype: they are moved to the encoder's.
    """

    def __init__(self, encoder: AIMv2Encoder, pool: str = "avg", info: dict[str, Any] | None = None) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}: expected one of {', '.join(POOLS)}")
        self.encoder = encoder
        self.pool = pool
        self.info = info or {}  # preprocessing and provenance, as ``aimpre.export.load`` reports them
        self.num_features = encoder.cfg.width  # timm's name for the width of the pooled features

    def forward_features(self, images: Tensor) -> Tensor:
        """Normalised images [B, 3, H, W] -> the final-norm tokens [B, N, width] (full attention)."""
        if not images.is_floating_point():  # raw uint8 pixels would be cast and silently mis-scaled
            raise TypeError(f"images must be normalised floats (preprocess(image) makes them), got {images.dtype}")
        p = next(self.encoder.parameters())
        return self.encoder(images.to(p.device, p.dtype))

    def forward_head(self, tokens: Tensor) -> Tensor:
        """Tokens [B, N, width] -> pooled [B, width] (``pool="none"``: the tokens unchanged)."""
        if self.pool == "avg":
            return tokens.mean(1)
        if self.pool == "max":
            return tokens.amax(1)
        return tokens

    def forward(self, images: Tensor) -> Tensor:
        """Normalised images [B, 3, H, W] -> pooled features [B, width] (tokens with ``pool="none"``)."""
        return self.forward_head(self.forward_features(images))

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """open_clip's name: the pooled features, L2-normalised with ``normalize=True``."""
        x = self(images)
        return F.normalize(x, dim=-1) if normalize else x


def create_model_from_pretrained(
    source: str | Path,
    *,
    pool: str = "avg",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
) -> tuple[ImageEncoder, Preprocess]:
    """An encoder with pooling, in eval mode, and the image preprocessing it was trained with.

    Example::

        model, preprocess = aimpre.create_model_from_pretrained("exports/l14-hf")
        with torch.no_grad():
            features = model(preprocess(Image.open("cat.jpg"))[None])  # [1, width], mean of the tokens

    Args:
        source: anything ``aimpre.export.load`` reads: a run directory, a ``.ckpt``, an aimpre export (timm, hf,
            safetensors; the directory or its ``model.safetensors``), or a timm / transformers AIMv2 directory.
        pool: "avg" (mean of the tokens, as an hf export's ``pooler_output`` and timm's ``global_pool="avg"``),
            "max", or "none" (``model(images)`` then gives the tokens [B, N, width]).
        device: where to put the encoder (default: CPU).
        dtype: the encoder's weights dtype (default: float32); ``model(images)`` casts the images to it.
        image_mean: per-channel mean of 0..1 pixels, for sources that record none (a bare safetensors export, a
            transformers directory without ``preprocessor_config.json``); overrides the recorded one.
        image_std: per-channel std, likewise.

    Returns:
        ``(model, preprocess)``: an ``ImageEncoder`` and a callable from a PIL image (or uint8 [3, H, W] tensor)
        to float32 [3, img_size, img_size]: centre square crop, antialiased bicubic resize, (x / 255 - mean) / std.
    """
    if pool not in POOLS:  # before the (possibly long) load
        raise ValueError(f"pool={pool!r}: expected one of {', '.join(POOLS)}")
    loaded = load(source)
    mean, std = image_mean, image_std
    if loaded.transform is not None:
        mean = loaded.transform.mean if mean is None else mean
        std = loaded.transform.std if std is None else std
    if mean is None or std is None:
        raise ExportError(f"{source}: records no normalisation (mean/std); pass image_mean= and image_std=")
    _check_preprocessing(list(mean), list(std), "image_mean/image_std")
    preprocess = Preprocess(loaded.encoder.cfg.img_size, tuple(mean), tuple(std))  # type: ignore[arg-type]
    model = ImageEncoder(loaded.encoder, pool, loaded.info).to(device=device, dtype=dtype).eval()
    return model, preprocess
