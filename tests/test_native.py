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


def test_patchify_and_valid_patches_follow_raster_order_of_a_non_square_grid() -> None:
    from aimpre.model.losses import patchify, valid_patches

    images = torch.arange(2 * 3 * 14 * 2 * 14 * 5, dtype=torch.float32).reshape(2, 3, 28, 70)  # a 2 x 5 grid
    patches = patchify(images, 14)
    assert patches.shape == (2, 10, 588)
    r, c = 1, 3  # patch 1 * 5 + 3 is the block at row 1, column 3, laid out (row, column, channel)
    block = images[:, :, 14 * r : 14 * r + 14, 14 * c : 14 * c + 14].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(patches[:, r * 5 + c], block)
    valid = valid_patches(torch.tensor([[2, 3], [1, 5]]), 2, 5)
    assert valid.tolist() == [[1, 1, 1, 0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]]


def test_pixel_loss_ignores_zero_padded_patches() -> None:
    from aimpre.model.losses import normalize_patches, pixel_loss, valid_patches

    g = torch.Generator().manual_seed(0)
    pred, patches = torch.randn(2, 11, 12, generator=g), torch.randn(2, 12, 12, generator=g)  # a 3 x 4 canvas
    grid = torch.tensor([[3, 2], [2, 4]])
    valid, prefix = valid_patches(grid, 3, 4), torch.tensor([1, 3])
    loss = pixel_loss(pred, patches, prefix, valid)
    other = patches.clone()
    other[~valid] = 1e3 * torch.randn(int((~valid).sum()), 12, generator=g)  # what sits in the padding: no matter
    assert torch.equal(pixel_loss(pred, other, prefix, valid), loss)
    # by hand: targets j >= M on image patches only
    err = (pred - normalize_patches(patches)[:, 1:]).pow(2).mean(-1)
    keep = [(b, j) for b in range(2) for j in range(1, 12) if j >= prefix[b] and valid[b, j]]
    torch.testing.assert_close(loss, sum(err[b, j - 1] for b, j in keep) / len(keep))


def test_aimv2_trains_on_a_non_square_native_grid() -> None:
    from aimpre.model.aimv2 import AIMv2

    cfg = model_config("tiny", pos_embed="sincos2d", depth=2, dec_depth=1, vocab_size=300, text_len=8)
    model = AIMv2(cfg)
    images, text = torch.randn(2, 3, 14 * 3, 14 * 6), torch.randint(0, 300, (2, 8))  # a 3 x 6 canvas
    grid = torch.tensor([[3, 4], [2, 6]])  # each image's part of it
    out = model(images, text, torch.ones(2, 8, dtype=torch.bool), torch.tensor([2, 5]), grid)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.encoder.patch_embed.proj.weight.grad is not None
    pred, _ = model.predict(images, text, torch.tensor([2, 5]))
    assert pred.shape == (2, 17, cfg.patch_dim)  # T - 1 next-patch predictions over the 18-patch canvas


def test_areas_follow_the_paper_and_are_deterministic_per_worker_and_index() -> None:
    from aimpre.data.native import batch_size_for, draw_area

    draws = [draw_area(3, 0, i, 7, 12) for i in range(2000)]
    assert draws == [draw_area(3, 0, i, 7, 12) for i in range(2000)]  # a resumed reader draws the same
    assert draws != [draw_area(3, 1, i, 7, 12) for i in range(2000)]
    ns = np.array([a.n for a in draws])
    assert set(ns) == set(range(7, 13)) and all(a.patches == 2**a.n for a in draws)
    # a normal truncated to [-1, 1] onto 7..12: the middle exponents are the common ones, the ends the rarest
    counts = np.bincount(ns, minlength=13)[7:]
    assert counts[2] + counts[3] > counts[0] + counts[5] and counts[0] < counts[2] and counts[5] < counts[3]
    assert {(a.rows, a.cols) for a in draws if a.n == 7} == {(8, 16), (16, 8)}
    # tokens per step constant: A x B the same at every area
    assert {a.patches * batch_size_for(a, 4096 * 8, 2) * 2 for a in draws} == {4096 * 8}


def test_native_batch_keeps_aspect_and_pads_with_zeros() -> None:
    from aimpre.data.native import Area, native_batch

    wide = torch.full((3, 30, 90), 200, dtype=torch.uint8)  # 1:3
    tall = torch.full((3, 80, 40), 100, dtype=torch.uint8)  # 2:1
    batch = native_batch([wide, tall], Area(5, 4, 8), 14)  # a 4 x 8 canvas: 56 x 112 px
    assert batch["image"].shape == (2, 3, 56, 112)
    assert batch["grid"].tolist() == [[3, 8], [4, 2]]  # wide: 37 x 112 px; tall: 56 x 28 px
    assert (batch["image"][0, :, :37] == 200).all() and (batch["image"][0, :, 37:] == 0).all()
    assert (batch["image"][1, :, :, :28] == 100).all() and (batch["image"][1, :, :, 28:] == 0).all()


def test_a_complete_native_config_is_refused_until_the_loader_batches_by_area(capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    args = ["data.native=true", "model.pos_embed=sincos2d", "data.tokens_per_batch=256", "data.native_log2_area=[4,6]"]
    assert main(["train", "--config", "configs/tiny.yaml", "trainer.max_steps=1", *args]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("aimpre")]
    assert len(ours) == 1 and "data.native" in ours[0] and "not wired" in ours[0], ours
