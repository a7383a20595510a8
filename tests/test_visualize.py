"""``aimpre visualize``: the pictures exist, look like pictures, and predictions are de-normalised correctly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aimpre.cli import main
from aimpre.export import load_encoder
from aimpre.model import normalize_patches, patchify
from aimpre.visualize import attention_maps, denormalize_predictions


def test_perfect_predictions_redraw_the_image() -> None:
    """Predictions equal to the standardised next patches, de-normalised with their targets' stats, give the image."""
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    perfect = normalize_patches(patchify(images, 14))[:, 1:]  # what the pixel head is trained to output
    out = denormalize_predictions(perfect, images, 14, prefix=5)
    assert torch.allclose(out, images, atol=1e-5)
    shifted = denormalize_predictions(normalize_patches(patchify(images, 14))[:, :-1], images, 14, prefix=5)
    assert not torch.allclose(shifted, images, atol=1e-2)  # an off-by-one patch shows


def test_visualize_writes_pictures(tiny_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["visualize", str(tiny_run), "--out", str(tmp_path), "-n", "3"]) == 0
    written = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in written) == ["attention.png", "losses.png", "predictions.png"]
    for p in written:
        img = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 10, p  # a real, non-blank picture
    encoder = load_encoder(tiny_run)
    attn = attention_maps(encoder, torch.randn(2, 3, 112, 112))
    assert attn.shape == (2, 64, 64) and torch.allclose(attn.sum(-1), torch.ones(2, 64), atol=1e-5)
