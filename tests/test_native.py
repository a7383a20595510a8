"""Native resolution (issue 20 point 3): 2D sin-cos positions for any grid, the grid carried by the batch,
padded patches out of the pixel loss, native batches of constant tokens that resume exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aimpre.cli import main
from aimpre.model import model_config
from aimpre.model.posemb import sincos_2d
from aimpre.model.vit import AIMv2Encoder


def _ml_aim_layout(h: int, w: int, dim: int) -> np.ndarray:
    """apple/ml-aim ``SinCosPosEmbed`` written out in numpy: a grid from meshgrid(w, h) in "xy" order, the first
    half of the channels from its first plane (the column index), each half [sin | cos] of D/4 frequencies."""
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64), indexing="xy"))

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("grid", [(4, 4), (3, 7), (8, 2), (1, 5)])
def test_sincos_2d_is_ml_aims_layout_for_any_grid(grid: tuple[int, int]) -> None:
    h, w = grid
    ours = sincos_2d(h, w, 32)
    assert ours.shape == (1, h * w, 32) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours[0].double().numpy(), _ml_aim_layout(h, w, 32), atol=1e-6)
    # [sin_w | cos_w | sin_h | cos_h]: patch (row 1, col 0) differs from (0, 0) only in the h half
    if h > 1:
        assert torch.equal(ours[0, w, :16], ours[0, 0, :16]) and not torch.equal(ours[0, w, 16:], ours[0, 0, 16:])


def test_sincos_encoder_has_no_table_and_runs_any_grid() -> None:
    cfg = model_config("tiny", img_size=56, pos_embed="sincos2d", depth=1, vocab_size=300)
    enc = AIMv2Encoder(cfg).eval()
    assert enc.pos_embed is None and "pos_embed" not in enc.state_dict()
    for h, w in [(4, 4), (2, 6), (6, 3)]:
        images = torch.randn(2, 3, 14 * h, 14 * w)
        assert enc(images).shape == (2, h * w, cfg.width)
        # the positions added are the grid's own table
        torch.testing.assert_close(enc.embed(images), enc.patch_embed(images) + sincos_2d(h, w, cfg.width))


def test_native_with_a_learned_table_is_one_line_exit_2(capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    bad = {
        ("data.native=true", "data.tokens_per_batch=256", "data.native_log2_area=[4,6]"): "model.pos_embed",
        ("data.native=true", "model.pos_embed=sincos2d", "data.tokens_per_batch=100"): "data.tokens_per_batch",
        ("model.pos_embed=rope",): "model.pos_embed",
    }
    for overrides, key in bad.items():
        assert main(["train", "--config", "configs/tiny.yaml", "trainer.max_steps=1", *overrides]) == 2
        ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("aimpre")]
        assert len(ours) == 1 and key in ours[0], ours
