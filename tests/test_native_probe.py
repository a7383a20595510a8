"""``aimpre probe --native N`` (issue 20 point 3): a sincos2d encoder probed at native resolution, each image whole
with its aspect kept on a 2^N-patch canvas (wide, or its transpose for a tall image), the padding masked in the
heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from aimpre.cli import main
from aimpre.export import preprocessing_info, write_export
from aimpre.model import AIMv2Encoder, model_config
from aimpre.model.pooling import AttentionPoolingClassifier, MeanPoolingClassifier
from aimpre.probe import native_features, read_native
from helpers import png, write_tar

PRE = {"preprocessing": preprocessing_info((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 28)}
WIDE, TALL = (60, 40), (40, 60)  # PIL sizes (width, height): aspect 3:2 and 2:3


def _encoder(pos_embed: str = "sincos2d") -> AIMv2Encoder:
    torch.manual_seed(0)
    shape = {"depth": 1, "width": 64, "heads": 2, "mlp_hidden": 128, "img_size": 28}
    return AIMv2Encoder(model_config("tiny", pos_embed=pos_embed, vocab_size=258, **shape)).eval()  # type: ignore[arg-type]


def _shard(path: Path, n: int) -> Path:
    """Labelled images alternating wide and tall; the class is the colour (left half red or green), so it shows at
    both orientations. PNG: exact pixels, no JPEG fast path."""
    samples = []
    for i in range(n):
        size = WIDE if i % 2 == 0 else TALL
        img = Image.new("RGB", size, (20, 20, 200))
        img.paste((220, 30, 30) if (i // 2) % 2 == 0 else (30, 220, 30), (0, 0, size[0] // 2, size[1]))
        samples.append({"__key__": f"s{i:03d}", "png": png(img), "cls": str((i // 2) % 2).encode()})
    return write_tar(path, samples)


def test_native_images_keep_their_aspect_on_their_canvas(tmp_path: Path) -> None:
    """2^3 patches at patch 14: a 3:2 image fills 2 x 3 of the 2 x 4 canvas, a 2:3 one 3 x 2 of the 4 x 2 one;
    the masks are those grids in each canvas's raster order, and the cached tokens are the encoder's on each
    image's own canvas, in the shards' order."""
    urls = [str(_shard(tmp_path / "s.tar", 4))]
    images, valid, labels, skipped = read_native(urls, 3, 14)
    assert [tuple(im.shape) for im in images] == [(3, 28, 56), (3, 56, 28)] * 2 and not skipped
    assert labels.tolist() == [0, 0, 1, 1]
    wide = [1, 1, 1, 0, 1, 1, 1, 0]  # raster of 2 x 4, columns >= 3 padding
    tall = [1, 1, 1, 1, 1, 1, 0, 0]  # raster of 4 x 2, rows >= 3 padding
    assert valid.int().tolist() == [wide, tall] * 2
    assert int(images[0][:, :, 42:].max()) == 0 and int(images[1][:, 42:].max()) == 0  # zero padding
    assert int(images[0][:, :, :42].max()) > 0 and int(images[1][:, :42].max()) > 0
    enc = _encoder()
    pre = {**PRE["preprocessing"], "native": 3}
    tokens, labels2, valid2 = native_features(enc, pre, urls, None)
    assert tokens.shape == (4, 8, 64) and torch.equal(valid2, valid) and torch.equal(labels2, labels)
    mean, std = (torch.tensor(pre[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    for im, tok in zip(images, tokens, strict=True):
        with torch.no_grad():
            own = enc((im[None].float() / 255 - mean) / std)[0].half()
        torch.testing.assert_close(tok, own, rtol=0, atol=1e-3)


@pytest.mark.parametrize("head", ["attentive", "linear"])
def test_padded_tokens_do_not_change_the_logits(head: str) -> None:
    """Whatever the padded tokens hold (noise, huge values, inf), the logits are the same: in training mode (the
    BatchNorm's batch statistics) and in eval mode, and the gradients too."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(6, 8, 64, generator=g)
    valid = torch.ones(6, 8, dtype=torch.bool)
    valid[::2, 3::4] = False  # the wide canvas's padding
    valid[1::2, 6:] = False  # the tall one's
    other = tokens.clone()
    other[~valid] = torch.randn(int((~valid).sum()), 64, generator=g) * 1e3
    other[0, 3, 0] = float("inf")
    torch.manual_seed(0)
    model = AttentionPoolingClassifier(64, 5, 2) if head == "attentive" else MeanPoolingClassifier(64, 5)
    for train in (True, False):
        model.train(train)
        model.zero_grad()
        a = model(tokens, valid)
        a.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        b = model(other, valid)
        b.square().sum().backward()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        for ga, p in zip(grads, (p for p in model.parameters() if p.grad is not None), strict=True):
            torch.testing.assert_close(ga, p.grad, rtol=0, atol=1e-5)
    # and the mask matters: without it the padding moves the logits
    assert not torch.allclose(model(tokens), model(other.nan_to_num(posinf=0.0)), atol=1e-3)


def test_probe_native_cli_prints_the_table_and_caches_masks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``aimpre probe --native 3``: the table, probe.json's canvas, one cache file holding tokens, labels and masks
    (a second run reads it), keyed apart from the square probe's; a learned encoder, or --native with --img-size,
    is one line and exit 2."""
    monkeypatch.setenv("AIMPRE_CACHE", str(tmp_path / "cache"))
    train, test = _shard(tmp_path / "train.tar", 8), _shard(tmp_path / "test.tar", 4)
    native = write_export(_encoder(), "safetensors", tmp_path / "native", info=PRE)
    args = ["--train", str(train), "--test", str(test), "--epochs", "2", "--out", str(tmp_path / "p.json")]
    assert main(["probe", str(native), *args, "--native", "3"]) == 0
    out = capsys.readouterr().out
    assert "canvas 2 x 4 patches or its transpose" in out and "encoder" in out and "attentive" in out
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["native"] == {"log2_area": 3, "canvas": [2, 4]} and res["n_train"] == 8 and res["n_test"] == 4
    assert all(0 <= res["results"]["encoder"][k]["top1"] <= 1 for k in ("attentive", "linear"))
    cached = sorted((tmp_path / "cache" / "features").glob("*.pt"))
    assert len(cached) == 2  # train and test
    saved = torch.load(cached[0], weights_only=True)
    assert set(saved) == {"tokens", "labels", "valid"} and saved["valid"].shape == saved["tokens"].shape[:2]
    assert main(["probe", str(native), *args, "--native", "3"]) == 0  # from the cache
    assert json.loads((tmp_path / "p.json").read_text())["results"] == res["results"]
    assert main(["probe", str(native), *args, "--kind", "linear"]) == 0  # the square probe: its own keys
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 4
    learned = write_export(_encoder("learned"), "safetensors", tmp_path / "learned", info=PRE)
    for path, extra, words in ((learned, [], "model.pos_embed=learned"), (native, ["--img-size", "28"], "--img-size"),
                               (native, ["--raw-pixels"], "--raw-pixels")):  # fmt: skip
        capsys.readouterr()
        assert main(["probe", str(path), *args, "--native", "3", *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and words in err[0] and "--native 3" in err[0], err
