"""Native resolution (issue 20 point 3): 2D sin-cos positions for any grid, the grid carried by the batch,
padded patches out of the pixel loss, native batches of constant tokens that resume exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from aimpre.cli import main
from aimpre.model import model_config
from aimpre.model.posemb import sincos_2d
from aimpre.model.vit import AIMv2Encoder
from helpers import metric_rows


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


NATIVE = ("data.native=true", "model.pos_embed=sincos2d", "data.tokens_per_batch=256", "data.native_log2_area=[4,6]")


def test_native_with_a_learned_table_is_one_line_exit_2(capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    bad = {
        ("data.native=true", "data.tokens_per_batch=256", "data.native_log2_area=[4,6]"): "model.pos_embed",
        ("data.native=true", "model.pos_embed=sincos2d", "data.tokens_per_batch=100"): "data.tokens_per_batch",
        ("model.pos_embed=rope",): "model.pos_embed",
        (*NATIVE, "trainer.global_batch_size=64"): "trainer.global_batch_size",
        (*NATIVE, "model.objective=clip"): "data.native",
        ("data.native=true", "model.pos_embed=sincos2d", "data.native_log2_area=[4,6]"): "data.tokens_per_batch",
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


# -- the loader ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Two real shards of 50 and 30 JPEGs of four aspect ratios (wide, tall, square, very wide), one colour each."""
    from aimpre.data import shard_set
    from helpers import jpeg, write_tar

    d = tmp_path_factory.mktemp("native")
    sizes = [(96, 48), (40, 80), (64, 64), (120, 30)]
    for s, n in enumerate((50, 30)):
        samples = [{"__key__": f"s{s}-{i:03d}", "jpg": jpeg((200, 40 + i, 90), sizes[i % 4]), "txt": f"shape {i}"}
                   for i in range(n)]  # fmt: skip
        write_tar(d / f"n-{s}.tar", samples)
    return shard_set(f"{d}/n-{{0..1}}.tar")


def _stream(sources: list, **kw):
    from aimpre.data import Augment, ByteTokenizer, ImageTextStream
    from aimpre.data.native import Native

    args = dict(tokenizer=ByteTokenizer(), text_len=16, batch_size=999, aug=Augment(64), seed=0, shuffle=8,
                native=Native(4, 6, 256, 8))  # fmt: skip
    return ImageTextStream(sources, **{**args, **kw})


def _take(ds, n: int, workers: int = 0) -> list[dict]:
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    return [b for b, _ in zip(loader, range(n), strict=False)]


def test_native_stream_draws_areas_keeps_aspect_and_tokens_per_step(shapes: list) -> None:
    """Real shards through the stream: each batch's canvas is draw_area(seed, worker, index) at 2^4..2^6 patches,
    tokens per step constant, every image whole with its aspect kept (within a patch) at the top left of the
    canvas, zeros outside its grid; both ranks of a 2-rank run get the same canvas at every step."""
    from aimpre.data.native import draw_area

    batches = _take(_stream([shapes], world=2, rank=0), 12, workers=2)
    other = _take(_stream([shapes], world=2, rank=1), 12, workers=2)
    assert [b["image"].shape for b in batches] == [b["image"].shape for b in other]  # DDP: same step, same shape
    assert not {k for b in batches for k in b["key"]} & {k for b in other for k in b["key"]}
    seen = set()
    for step, b in enumerate(batches):
        area = draw_area(0, step % 2, step // 2, 4, 6)  # worker step % 2, its (step // 2)-th batch
        B, _, H, W = b["image"].shape
        assert (area.rows, area.cols) == (H // 8, W // 8) and B * area.patches * 2 == 256
        assert b["state"]["index"] == step // 2 + 1 and b["grid"].shape == (B, 2)
        seen.add(area.n)
        for img, (r, c) in zip(b["image"], b["grid"].tolist(), strict=True):
            rows = img.abs_().sum(dim=(0, 2)).nonzero().max().item() + 1  # pixel rows and columns with content
            cols = img.sum(dim=(0, 1)).nonzero().max().item() + 1
            assert (-(-rows // 8), -(-cols // 8)) == (r, c) and (rows == H or cols == W)  # fits, touches an edge
    assert len(seen) > 1
    aspects = {round(c / r, 1) for b in batches for r, c in b["grid"].tolist() if r == 8 or c == 8}
    assert {0.5, 1.0, 2.0} <= aspects  # tall, square and wide images on a canvas 8 patches across


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resampled", [False, True])
def test_native_stream_resumes_exactly_across_epochs(shapes: list, workers: int, resampled: bool) -> None:
    """Restarted from the states of its last batches, the stream continues bit for bit (areas, keys, pixels),
    across epoch ends; an epoch reads no sample twice and drops less than one batch per reader."""
    full = _take(_stream([shapes], resampled=resampled), 30, workers)
    cut = 17
    last = {b["worker"]: b["state"] for b in full[:cut]}
    states = [last.get(k) for k in range(max(1, workers))]
    resumed = _take(_stream([shapes], resampled=resampled, resume=states, first_worker=cut % max(1, workers)),
                    30 - cut, workers)  # fmt: skip
    for a, b in zip(full[cut:], resumed, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["grid"], b["grid"])
    if not resampled:
        epochs: dict[tuple[int, int], list[str]] = {}
        for b in full:
            epochs.setdefault((b["worker"], b["state"]["epoch"]), []).extend(b["key"])
        readers = max(1, workers)
        done = [keys for (w, e), keys in epochs.items() if (w, e + 1) in epochs]
        assert done and all(len(k) == len(set(k)) and 80 // readers - len(k) < 16 for k in done)


def _native_cfg(tmp_path, spec: str, val: str, name: str, *extra: str):
    from aimpre.config import load_config

    return load_config(
        "configs/native_tiny.yaml",
        [
            f"run.out_dir={tmp_path}", f"run.name={name}", f"data.train_shards={spec}", f"data.val_shards={val}",
            "data.batch_size=8", "trainer.val_batches=1", "trainer.val_every=4",
            "data.num_workers=2", "data.native_log2_area=[4,5]", "data.tokens_per_batch=128", "model.depth=2",
            "model.dec_depth=1", "trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.log_every=1",
            "trainer.deterministic=true", "optim.warmup_steps=2", *extra,
        ],
    )  # fmt: skip


@pytest.mark.slow  # three short Lightning runs with 2 data workers each: ~45 s on a busy 2-core machine
def test_native_lightning_run_resumes_bit_exactly_and_counts_its_own_batches(
    tmp_path, pretrain_spec: str, val_spec: str
) -> None:
    """A real Lightning run of configs/native_tiny.yaml (shrunk): stopped at step 2 and resumed, steps 3-4 have the
    uninterrupted run's losses bit for bit; samples and FLOPs add each step's own batch at its own T."""
    import json

    from aimpre.config import load_config
    from aimpre.data.native import draw_area
    from aimpre.scaling import flops_per_sample
    from aimpre.train import train
    from test_train import StopAt

    cfg = _native_cfg(tmp_path, pretrain_spec, val_spec, "full")
    full = train(cfg)
    part = train(_native_cfg(tmp_path, pretrain_spec, val_spec, "part"), callbacks=(StopAt(2),))
    assert max(metric_rows(part)) == 2
    train(_native_cfg(tmp_path, pretrain_spec, val_spec, "part"), resume=True)
    a, b = metric_rows(full), metric_rows(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for k in ("loss", "loss_image", "loss_text", "samples", "flops"):
            assert float(a[step][k]) == float(b[step][k]), (step, k)
    # step s takes worker (s - 1) % 2's ((s - 1) // 2)-th batch: 128 tokens over 2^n-patch images
    areas = [draw_area(cfg.run.seed, s % 2, s // 2, 4, 5).patches for s in range(4)]
    model = load_config(full / "config.yaml", []).model  # its vocab_size resolved from the tokenizer
    assert len(set(areas)) == 2, areas  # both sizes occur, so a fixed count would be wrong
    samples = list(itertools.accumulate(128 // t for t in areas))
    flops = list(itertools.accumulate(128 // t * flops_per_sample(model, tokens=t) for t in areas))
    assert [int(a[s]["samples"]) for s in range(1, 5)] == samples
    assert [float(a[s]["flops"]) for s in range(1, 5)] == pytest.approx(flops, rel=1e-12)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["samples"] == samples[-1] and summary["tokens"] == 4 * 128
    assert json.loads((part / "summary.json").read_text())["samples"] == samples[-1]
    # validation (square, at model.img_size) and its baselines, fitted on square training crops
    assert summary["val"]["loss"] > 0 and summary["baselines"]["loss_image_mean_patch"] > 0


def test_model_info_counts_flops_per_native_area(capsys: pytest.CaptureFixture) -> None:
    """FLOPs per sample grow with the area (not the fixed img_size); at the config's own grid they equal the fixed
    count; a native config lists each area of its range; --area asks for one."""
    import json

    from aimpre.config import load_config
    from aimpre.scaling import flops_per_sample

    capsys.readouterr()
    assert main(["model-info", "configs/native_tiny.yaml", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    by_area = {int(a): f for a, f in info["flops_per_sample_by_area"].items()}
    assert sorted(by_area) == [16, 32, 64] and by_area[16] < by_area[32] < by_area[64]
    assert by_area[64] == pytest.approx(info["flops_per_sample"], rel=1e-12)  # 64 patches = 112 px at patch 14
    assert main(["model-info", "configs/native_tiny.yaml", "--json", "--area", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["flops_per_sample_by_area"] == {"32": by_area[32]}
    cfg = load_config("configs/native_tiny.yaml", ["model.vocab_size=300"]).model
    assert flops_per_sample(cfg, tokens=cfg.num_patches) == flops_per_sample(cfg)
