"""``aimpre visualize``: the pictures exist, look like pictures, and predictions are de-normalised correctly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aimpre.cli import main
from aimpre.export import load_encoder
from aimpre.model import AIMv2, model_config, normalize_patches, patchify
from aimpre.visualize import attention_maps, denormalize_predictions, plot_losses, plot_predictions


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
        with Image.open(p) as png:
            assert min(png.info["dpi"]) >= 149.9, p  # 150 dpi: legible when printed or zoomed
        img = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 10, p  # a real, non-blank picture
    encoder = load_encoder(tiny_run)
    attn = attention_maps(encoder, torch.randn(2, 3, 112, 112))
    assert attn.shape == (2, 64, 64) and torch.allclose(attn.sum(-1), torch.ones(2, 64), atol=1e-5)


def test_prediction_figure_says_colour_is_not_predicted() -> None:
    torch.manual_seed(0)
    model = AIMv2(model_config("tiny", vocab_size=258, img_size=56, depth=1, dec_depth=1, text_len=8)).eval()
    batch = {"image": torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8), "text": torch.zeros(2, 8).long()}
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    title = plot_predictions(model, batch, mean, std, prefix=4).get_suptitle()
    assert "per-patch normalisation drops colour" in title and "borrowed from the original" in title


def test_loss_figure_labels_every_line(tmp_path: Path) -> None:
    rows = ["step,loss,loss_image,loss_text,val_loss,val_loss_image,val_loss_text"]
    rows += [f"{s},{5 - s / 10},{1 - s / 50},{4 - s / 20},{'' if s % 3 else 4.5 - s / 10},,{'' if s % 3 else 3.9}"
             for s in range(1, 10)]  # fmt: skip
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "summary.json").write_text('{"baselines": {"loss_image_mean_patch": 1.0, "loss_text_bigram": 3.5}}')
    fig = plot_losses(tmp_path / "metrics.csv", tmp_path / "summary.json")
    for ax in fig.axes:
        assert ax.lines and not [ln for ln in ax.lines if ln.get_label().startswith("_")], ax.get_title()
        assert all(t.get_fontsize() >= 8 for t in ax.get_legend().get_texts())
