"""Native-resolution (2D sin-cos) encoders outside training (issue 20 point 3): export to Hugging Face ``is_native``
and back, timm's refusal, ``--init`` between sin-cos and learned positions, probes and ``visualize`` on non-square
images, and the attention backends and ``torch.compile`` over the native canvases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from aimpre.cli import main
from aimpre.export import load, load_encoder, preprocessing_info, write_export
from aimpre.formats import ExportError
from aimpre.model import AIMv2Encoder, model_config
from helpers import perturbed

# three aspect ratios, (H, W) in pixels at patch 14: square, wide, tall
ASPECTS = [(56, 56), (56, 84), (84, 42)]
PRE = {"preprocessing": preprocessing_info((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 56)}


def _native(**over: object) -> AIMv2Encoder:
    torch.manual_seed(0)
    shape: dict[str, object] = {"depth": 2, "width": 64, "heads": 2, "mlp_hidden": 128, "img_size": 56}
    cfg = model_config("tiny", pos_embed="sincos2d", vocab_size=258, **{**shape, **over})  # type: ignore[arg-type]
    return perturbed(AIMv2Encoder(cfg))


def _image(h: int, w: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_hf_is_native_export_gives_our_features_at_three_aspects(tmp_path: Path) -> None:
    enc = _native()
    out = write_export(enc, "hf", tmp_path / "hf", info=PRE)
    conf = json.loads((out / "config.json").read_text())
    assert conf["is_native"] is True
    hf = transformers.Aimv2VisionModel.from_pretrained(out).eval()
    assert not hasattr(hf.embeddings, "position_embedding")  # transformers computes the positions per grid
    back = load_encoder(out)  # and our loader reads the native export back as sincos2d
    assert back.cfg.pos_embed == "sincos2d" and back.pos_embed is None
    for h, w in ASPECTS:
        x = _image(h, w)
        ours = enc(x)
        assert ours.shape == (2, (h // 14) * (w // 14), 64)
        assert float((hf(pixel_values=x).last_hidden_state - ours).abs().max()) <= 1e-5, (h, w)
        assert float((back(x) - ours).abs().max()) == 0.0, (h, w)
    # a safetensors export records pos_embed too, and loads as the same native encoder
    st = load(write_export(enc, "safetensors", tmp_path / "st", info=PRE))
    assert st.encoder.cfg.pos_embed == "sincos2d"
    assert float((st.encoder(_image(84, 42)) - enc(_image(84, 42))).abs().max()) == 0.0


@torch.no_grad()
def test_a_released_format_native_hf_model_loads(tmp_path: Path) -> None:
    """A transformers-written ``is_native`` checkpoint (apple/aimv2-large-patch14-native's layout) at a tiny size."""
    conf = transformers.Aimv2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=56, is_native=True)  # fmt: skip
    hf = perturbed(transformers.Aimv2VisionModel(conf))
    hf.save_pretrained(tmp_path / "hf")
    enc = load_encoder(tmp_path / "hf")
    assert enc.cfg.pos_embed == "sincos2d"
    for h, w in ASPECTS:
        x = _image(h, w)
        assert float((enc(x) - hf(pixel_values=x).last_hidden_state).abs().max()) <= 1e-5, (h, w)


def test_timm_export_of_a_native_encoder_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="timm has no native-resolution AIMv2") as e:
        write_export(_native(), "timm", tmp_path / "t", info=PRE)
    assert "\n" not in str(e.value) and "--format hf" in str(e.value)
    assert not (tmp_path / "t").exists()


def test_learned_exports_still_say_not_native(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = AIMv2Encoder(model_config("tiny", depth=1, width=64, heads=1, mlp_hidden=128, img_size=56, vocab_size=258))
    out = write_export(enc.eval(), "hf", tmp_path / "hf", info=PRE)
    assert json.loads((out / "config.json").read_text())["is_native"] is False
    assert "pos_embed" not in json.loads((out / "aimpre.json").read_text())["encoder"]  # old records unchanged
    assert load_encoder(out).cfg.pos_embed == "learned"


# ---- --init from a native encoder ------------------------------------------------------------------------------

SHAPE = ["model.width=96", "model.depth=2", "model.heads=2", "model.mlp_hidden=264", "model.dec_depth=1"]


def _first_features(source: Path, *extra: str) -> tuple[torch.Tensor, dict]:
    """A fresh 112 px run model's encoder features after ``--init`` loaded ``source`` into it, and the record
    (``init_from`` as the trainer calls it before step 0; tests/test_init.py runs it through a Trainer)."""
    from aimpre.config import load_config
    from aimpre.objectives import build
    from aimpre.train.init import init_from

    cfg = load_config(None, [f"run.init={source}", "model.img_size=112", "model.vocab_size=258", *SHAPE, *extra])
    model = build(cfg.model)
    record = init_from(model, cfg, digest=False)
    return model.encoder.eval()(_image(112, 112)), record


@torch.no_grad()
def test_init_from_a_native_export(tmp_path: Path, pretrain_spec: str, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    cfg = model_config("tiny", width=96, depth=2, heads=2, mlp_hidden=264, img_size=56, pos_embed="sincos2d",
                       vocab_size=258)  # fmt: skip
    src = perturbed(AIMv2Encoder(cfg))
    out = write_export(src, "safetensors", tmp_path / "native", info=PRE)
    want = src(_image(112, 112))  # sin-cos: the source runs at the new grid as it is
    # into a sincos2d run: the same function, no table
    got, record = _first_features(out, "model.pos_embed=sincos2d")
    assert float((got - want).abs().max()) <= 1e-5
    assert record["encoder"]["pos_embed"].startswith("2D sin-cos")
    # into a learned run: the table starts as the sin-cos values of the run's 8 x 8 grid, so step 0 is the same
    got, record = _first_features(out, "model.pos_embed=learned")
    assert float((got - want).abs().max()) <= 1e-5
    assert record["encoder"]["pos_embed"].startswith("a learned table initialised")
    # a learned table into a sincos2d run would be dropped: refused in one line naming model.pos_embed
    learned = write_export(perturbed(AIMv2Encoder(model_config("tiny", width=96, depth=2, heads=2, mlp_hidden=264,
                                                                img_size=112, vocab_size=258))),
                           "safetensors", tmp_path / "learned", info=PRE)  # fmt: skip
    capsys.readouterr()
    rc = main(["train", f"run.out_dir={tmp_path}", "run.name=bad", f"data.train_shards={pretrain_spec}",
               "data.num_workers=0", "trainer.max_steps=1", f"run.init={learned}", "model.img_size=112", *SHAPE,
               "model.pos_embed=sincos2d"])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "model.pos_embed=learned" in err[0], err


# ---- attention backends and torch.compile over the native canvases -------------------------------------------

GRIDS = [(4, 8), (8, 4), (4, 4), (2, 8)]  # native canvases (rows x cols in patches) and a 2 x 8 strip


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("backend", ["sdpa", "triton"])  # flex: through the encoder below (no CPU backward)
def test_backends_run_the_variable_length_of_native_canvases(backend: str, grid: tuple[int, int]) -> None:
    """Each backend against the float64 reference at a canvas's length, with per-sample prefix masks, output and
    gradients within twice torch's own float32 error (tests/test_triton_attention.py's bound)."""
    from aimpre.kernels import HAS_TRITON, attention
    from test_triton_attention import _assert_within_bound, _out_and_grads, _torch_in_dtype

    if backend == "triton" and not HAS_TRITON:
        pytest.skip("no triton in this torch build")
    T = grid[0] * grid[1]
    torch.manual_seed(T)
    q, k, v, g = (torch.randn(3, 2, T, 16, dtype=torch.float64) for _ in range(4))
    P = torch.tensor([1, T - 1, T // 3])
    ref = _out_and_grads(lambda *a: attention(*a, mask="prefix", prefix_len=P, backend="reference"), q, k, v, g)
    low = [x.float() for x in (q, k, v, g)]
    yardstick = _out_and_grads(lambda *a: _torch_in_dtype(*a, "prefix", P), *low)
    ours = _out_and_grads(lambda *a: attention(*a, mask="prefix", prefix_len=P, backend=backend), *low)
    _assert_within_bound(("out", "dq", "dk", "dv"), ours, yardstick, ref, torch.float32)


@torch.no_grad()
@pytest.mark.parametrize("backend", ["sdpa", "flex", "triton"])
def test_native_encoder_runs_every_canvas_on_each_backend(backend: str) -> None:
    """The whole sincos2d encoder (mask built once per forward for its grid) on each backend equals the reference
    backend's at every canvas, prefix-causal as in training and full as exported."""
    from aimpre.kernels import HAS_TRITON

    if backend == "triton" and not HAS_TRITON:
        pytest.skip("no triton in this torch build")
    ref = _native(attn_backend="reference", depth=1)
    enc = _native(attn_backend=backend, depth=1)
    enc.load_state_dict(ref.state_dict())
    for rows, cols in GRIDS[:2] + GRIDS[3:]:  # two lengths, both orientations
        x = _image(rows * 14, cols * 14)
        P = torch.tensor([1, rows * cols - 1])
        for prefix in (P, None):
            torch.testing.assert_close(enc(x, prefix), ref(x, prefix), atol=1e-5, rtol=1e-5)


def native_canvases(lo: int, hi: int) -> set[tuple[int, int]]:
    """Every canvas ``aimpre.data.native.draw_area`` can draw for n in lo..hi, from the sampler itself."""
    from aimpre.data.native import draw_area

    return {(a.rows, a.cols) for i in range(400) for a in [draw_area(0, 0, i, lo, hi)]}


def test_the_paper_range_has_nine_canvases_of_six_lengths() -> None:
    canvases = native_canvases(7, 12)
    assert len(canvases) == 9 and len({r * c for r, c in canvases}) == 6  # <= 12 shapes; 6 block input lengths
    assert all(max(r, c) == 2 * min(r, c) or r == c for r, c in canvases)


def test_compiled_blocks_make_one_graph_per_area_and_kind(request: pytest.FixtureRequest) -> None:
    """Compiling the native AIMv2 over every canvas of n in 2..4 (3 areas, 4 canvases; encoder and decoder blocks:
    6 graphs, past a recompile limit of 4 set here as dynamo's 8 is below the paper's 12) makes exactly one static
    graph per area and kind of block, training forward and backward, and none on a second pass."""
    import torch._dynamo
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.testing import CompileCounter

    from aimpre.model import AIMv2
    from aimpre.train.parallel import compile_blocks

    # torch's own patcher, undone at the end: monkeypatch's undo deletes the key from dynamo's config module
    limit = dynamo_config.patch(recompile_limit=4)
    limit.__enter__()
    request.addfinalizer(lambda: limit.__exit__(None, None, None))
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = model_config("tiny", depth=2, width=32, heads=2, mlp_hidden=64, img_size=16, patch_size=2,
                       pos_embed="sincos2d", dec_depth=1, dec_width=32, dec_heads=2, dec_mlp_hidden=64,
                       vocab_size=50, text_len=4)  # fmt: skip
    model = AIMv2(cfg)
    lo, hi = 2, 4
    counter = CompileCounter()
    compile_blocks(model, hi - lo + 1, backend=counter)
    canvases = sorted(native_canvases(lo, hi))
    counts = []
    try:
        for _ in range(2):
            for rows, cols in canvases:
                B = 32 // (rows * cols)  # constant tokens per step
                images = torch.randn(B, 3, rows * 2, cols * 2)
                text = torch.randint(0, 50, (B, 4))
                out = model(images, text, torch.ones(B, 4, dtype=torch.bool), torch.randint(1, rows * cols, (B,)))
                out["loss"].backward()
            counts.append(counter.frame_count)
    finally:
        torch._dynamo.reset()
    assert counts == [2 * (hi - lo + 1)] * 2, counts


# ---- probes at native resolution ------------------------------------------------------------------------------


def test_probe_runs_a_native_encoder_on_non_square_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``aimpre probe --img-size 28x56`` on a sincos2d export: 2 x 4 patches per image; a learned encoder at a
    non-square size, or a size not in patches, is one line and exit 2."""
    from helpers import jpeg, write_tar

    colours = [(200, 30, 30), (30, 200, 30)]
    for split, n in (("train", 8), ("test", 4)):
        write_tar(tmp_path / f"{split}.tar", [{"__key__": f"{split}{i}", "jpg": jpeg(colours[i % 2], (70, 50)),
                                              "cls": str(i % 2).encode()} for i in range(n)])  # fmt: skip
    enc = _native(img_size=28, depth=1)
    native = write_export(enc, "safetensors", tmp_path / "native", info=PRE)
    args = ["--train", str(tmp_path / "train.tar"), "--test", str(tmp_path / "test.tar"), "--kind", "linear",
            "--epochs", "1", "--no-cache"]  # fmt: skip
    assert main(["probe", str(native), *args, "--img-size", "28x56", "--out", str(tmp_path / "p.json")]) == 0
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["img_size"] == [28, 56] and 0 <= res["results"]["encoder"]["linear"]["top1"] <= 1
    learned = write_export(
        AIMv2Encoder(model_config("tiny", depth=1, width=64, heads=2, mlp_hidden=128, img_size=28, vocab_size=258)),
        "safetensors", tmp_path / "learned", info=PRE)  # fmt: skip
    for path, size, words in ((learned, "28x56", "model.pos_embed=learned"), (native, "28x50", "patch size 14"),
                              (native, "28y5", "give S or HxW")):  # fmt: skip
        capsys.readouterr()
        assert main(["probe", str(path), *args, "--img-size", size]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("aimpre")]
        assert len(err) == 1 and words in err[0], err


def test_read_labelled_crops_the_centre_without_stretching(tmp_path: Path) -> None:
    from aimpre.probe import read_labelled
    from helpers import jpeg, write_tar

    tar = write_tar(tmp_path / "s.tar", [{"__key__": "a", "jpg": jpeg((10, 200, 30), (80, 60)), "cls": b"1"}])
    images, labels, _ = read_labelled([str(tar)], (28, 56))
    assert images.shape == (1, 3, 28, 56) and labels.tolist() == [1]


# ---- Preprocess: non-square and aspect kept ----------------------------------------------------------------------


@torch.no_grad()
def test_preprocess_fits_a_non_square_image_with_its_aspect_kept() -> None:
    """``Preprocess.fit`` = ``fit_to_canvas`` then the normalisation (padding included, as training feeds it);
    the grid it returns marks the padding; the encoder's tokens of the image part are what callers keep."""
    from aimpre.data.native import fit_to_canvas
    from aimpre.export import Preprocess, canvas

    pre = Preprocess(56, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    g = torch.Generator().manual_seed(0)
    wide = torch.randint(0, 256, (3, 30, 90), generator=g, dtype=torch.uint8)  # 1 : 3
    area = canvas(5)  # 4 x 8 patches
    assert area.rows == 4 and area.cols == 8
    x, grid = pre.fit(wide, area, 14)
    assert x.shape == (3, 56, 112) and grid == (3, 8)  # 112 px wide -> 37.3 px high: 3 patch rows of 4
    u8, _ = fit_to_canvas(wide, area, 14)
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    assert torch.equal(x, (u8.float() / 255 - mean) / std)
    assert torch.equal(x[:, 38:], ((0 - mean) / std).expand(3, 18, 112))  # zero-padded below the image
    tall, grid = pre.fit(Image.fromarray(wide.permute(2, 1, 0).numpy()), area, 14)  # 90 x 30, a PIL image
    assert tall.shape == (3, 56, 112) and grid == (4, 2)
    enc = _native()
    tokens = enc(x[None])  # [1, 32, C]
    assert tokens.shape == (1, 32, 64)
    # a non-square img_size is the centre H x W of the centre square, resized to max(H, W): not stretched
    sq = Preprocess(84, pre.mean, pre.std)(wide)
    assert torch.equal(Preprocess((56, 84), pre.mean, pre.std)(wide), sq[:, 14:70])


# ---- visualize at a non-square grid ------------------------------------------------------------------------------


def test_visualize_draws_a_sincos2d_run_on_a_non_square_grid(
    tmp_path: Path, pretrain_spec: str, val_spec: str, tiny_run: Path, capsys: pytest.CaptureFixture
) -> None:
    """A real 2-step sincos2d run drawn at 56x84 (4 x 6 patches): predictions and attention on that grid; a learned
    run at a non-square size is one line, exit 2."""
    import numpy as np

    from aimpre.config import load_config
    from aimpre.export import read_run, run_model
    from aimpre.train import train
    from aimpre.visualize import plot_attention, predicted_images

    over = [f"run.out_dir={tmp_path}", f"data.train_shards={pretrain_spec}", f"data.val_shards={val_spec}",
            "data.batch_size=2", "data.num_workers=0", "model.img_size=56", "model.depth=1", "model.dec_depth=1",
            "trainer.max_steps=2", "trainer.ckpt_every=2", "trainer.val_every=100"]  # fmt: skip
    run = train(load_config(None, ["run.name=sc", "model.pos_embed=sincos2d", *over]))
    capsys.readouterr()
    assert main(["visualize", str(run), "--out", str(tmp_path / "fig"), "-n", "2", "--img-size", "56x84"]) == 0
    written = [p for p in capsys.readouterr().out.split() if p.endswith(".png")]
    assert sorted(Path(p).name for p in written) == ["attention.png", "losses.png", "predictions.png"]
    for p in written:
        img = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
        assert img.std() > 10, p  # a real, non-blank picture
    model = run_model(read_run(run)).eval()
    images = _image(56, 84)
    pred = predicted_images(model, images, torch.zeros(2, model.cfg.text_len, dtype=torch.long), 5)
    assert pred.shape == (2, 3, 56, 84) and torch.equal(pred[..., :14, :70], images[..., :14, :70])  # the prefix
    fig = plot_attention(model.encoder, torch.zeros(1, 3, 84, 42, dtype=torch.uint8), torch.zeros(1, 3, 1, 1),
                         torch.ones(1, 3, 1, 1))  # fmt: skip
    assert fig.axes[1].images[1].get_array().shape == (84, 42)  # the heat map covers the tall 6 x 3 grid
    capsys.readouterr()
    assert main(["visualize", str(tiny_run), "--out", str(tmp_path / "f2"), "--img-size", "56x84"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("aimpre")]
    assert len(err) == 1 and "model.pos_embed=learned" in err[0], err
