"""Encoder fusion (aimpre.eval.fusion, and in the scene probes) and encoders at a resolution they were not trained
at (aimpre.model.posemb)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from aimpre.cli import main
from aimpre.eval.attributes import attribute_rows
from aimpre.eval.fusion import Fuse, align, fused_name, resample_tokens
from aimpre.export import preprocessing_info, write_export
from aimpre.model import AIMv2Encoder, model_config
from aimpre.model.posemb import at_resolution, resample_pos_embed
from aimpre.probe import ProbeSettings


@pytest.mark.parametrize("new, old", [(16, 8), ((12, 10), 8), (5, 8), ((6, 9), (4, 6))])
def test_resample_pos_embed_equals_timm(new: int | tuple[int, int], old: int | tuple[int, int]) -> None:
    from timm.layers import resample_abs_pos_embed

    oh, ow = (old, old) if isinstance(old, int) else old
    nh, nw = (new, new) if isinstance(new, int) else new
    pos = torch.randn(1, oh * ow, 24, generator=torch.Generator().manual_seed(0))
    ours = resample_pos_embed(pos, new, old)
    theirs = resample_abs_pos_embed(pos, [nh, nw], [oh, ow], num_prefix_tokens=0)
    assert ours.shape == (1, nh * nw, 24)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_resample_pos_embed_refuses_a_wrong_grid() -> None:
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(torch.zeros(1, 12, 4), 4)
    with pytest.raises(ValueError, match="old grid 3x3"):
        resample_pos_embed(torch.zeros(1, 12, 4), 4, 3)


def test_encoder_at_twice_its_trained_grid() -> None:
    """A tiny encoder (112 px, 8x8 patches) runs at 224 px (16x16): features of every patch, the original untouched;
    at its own size the copy is the encoder itself."""
    torch.manual_seed(0)
    enc = AIMv2Encoder(model_config("tiny", depth=1)).eval()
    before = enc.pos_embed.detach().clone()
    big = at_resolution(enc, 224)
    with torch.no_grad():
        out = big(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 256, 192) and torch.isfinite(out).all()
    assert big.cfg.img_size == 224 and enc.cfg.img_size == 112
    torch.testing.assert_close(enc.pos_embed.detach(), before, rtol=0, atol=0)
    assert at_resolution(enc, 112) is enc
    with pytest.raises(ValueError, match="multiple of the patch size"):
        at_resolution(enc, 200)


def test_fusion_of_encoders_of_different_widths_and_grids() -> None:
    """Two real encoders, 192 wide on 8x8 patches and 96 wide on 4x4: concatenated (288) or projected and summed."""
    torch.manual_seed(0)
    a = AIMv2Encoder(model_config("tiny", depth=1)).eval()
    b = AIMv2Encoder(model_config("tiny", depth=1, width=96, heads=2, mlp_hidden=256, patch_size=28)).eval()
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        ta, tb = a(x), b(x)
    assert ta.shape == (3, 64, 192) and tb.shape == (3, 16, 96)
    fa, fb = align([ta, tb])  # onto the first's 8x8 grid
    assert fa.shape == (3, 64, 192) and fb.shape == (3, 64, 96)
    assert Fuse([192, 96], "concat")([fa, fb]).shape == (3, 64, 288)
    summed = Fuse([192, 96], "sum")
    assert summed([fa, fb]).shape == (3, 64, 192)
    assert sum(p.numel() for p in summed.parameters()) == 192 * 192 + 192 + 96 * 192 + 192
    with pytest.raises(ValueError, match="different grids"):
        Fuse([192, 96])([ta, tb])
    with pytest.raises(ValueError, match="unknown fusion"):
        Fuse([192], "max")


def test_resample_tokens_pools_exactly_and_keeps_a_constant_map() -> None:
    t = torch.arange(16.0).view(1, 16, 1)  # a 4x4 map
    torch.testing.assert_close(resample_tokens(t, 2).flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))
    ones = torch.ones(2, 16, 3)
    torch.testing.assert_close(resample_tokens(ones, 8), torch.ones(2, 64, 3))


def _export(tmp: Path, name: str, blind: bool = False, **sizes: Any) -> Path:
    torch.manual_seed(0)
    enc = AIMv2Encoder(model_config("tiny", depth=1, **sizes))
    if blind:  # every weight zero: the same tokens (zeros) whatever the picture
        with torch.no_grad():
            for p in enc.parameters():
                p.zero_()
    pre = preprocessing_info((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 112)
    return write_export(enc, "safetensors", tmp / name, info={"preprocessing": pre})


def test_attribute_probe_fuses_a_blind_encoder_with_what_sees(tmp_path: Path) -> None:
    """Three sources of different widths and grids: a blind encoder (96 wide, 4x4 patches, all weights zero), a
    192-wide one on 8x8 patches and the raw pixels. Each is probed alone and fused, in one table; the fused probe
    reads the background as well as the best of them (the pixels' mean colour says it) and far better than the
    blind one, so the fusion carries every source's tokens, aligned with the right pictures. Projected and summed
    (the mode with parameters of its own); the CLI test below concatenates."""
    fusion = "sum"
    blind = _export(tmp_path, "blind", blind=True, width=96, heads=2, mlp_hidden=256, patch_size=28)
    tiny = _export(tmp_path, "tiny")
    rows = attribute_rows(blind, n_train=120, n_test=80, readouts=("linear",), attributes=("background",),
                          settings=ProbeSettings(epochs=15), baselines=False, fuse=(str(tiny), "pixels"),
                          fusion=fusion)  # fmt: skip
    top1 = {r["encoder"]: r["top1"] for r in rows}
    fused = fused_name(["encoder", str(tiny), "pixels"], fusion)
    assert set(top1) == {"encoder", str(tiny), "pixels", fused}
    assert top1["encoder"] < 0.5 < top1["pixels"]  # 4 backgrounds: the blind one guesses
    assert top1[fused] >= max(top1[n] for n in top1 if n != fused) - 0.05, top1
    assert top1[fused] > top1["encoder"] + 0.3, top1


def test_cli_probes_fuse_several_encoders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`aimpre localize A B` (B narrower, on another grid) and `aimpre probe-attributes A pixels --fuse sum`: one
    row per encoder alone and one fused, each a finished record; a missing second encoder is one line and exit 2."""
    a = _export(tmp_path, "a")
    b = _export(tmp_path, "b", width=96, heads=2, mlp_hidden=256, patch_size=28)
    small = ["--train-scenes", "12", "--test-scenes", "6", "--epochs", "1"]
    assert main(["localize", str(a), str(b), *small, "--no-baselines", "--out", str(tmp_path / "l.json")]) == 0
    res = json.loads((tmp_path / "l.json").read_text())
    assert [r["encoder"] for r in res["rows"]] == ["encoder", str(b), f"encoder + {b}"]
    assert res["fusion"] == "concat" and res["fuse"] == [str(b)] and "machine" in res
    assert f"encoder + {b}" in capsys.readouterr().out
    argv = ["probe-attributes", str(a), "pixels", *small, "--attribute", "count", "--readout", "attentive"]
    assert main([*argv, "--fuse", "sum", "--no-baselines"]) == 0
    assert "encoder (+) pixels attentive" in capsys.readouterr().out
    assert main(["localize", str(a), str(tmp_path / "nothing"), *small]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing" in err


def test_digits_probe_fuses_a_blind_encoder_with_one_that_sees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`aimpre probe BLIND TINY pixels`: the first encoder is blind (96 wide on a 4x4 grid, every weight zero),
    the second 192 wide on 8x8 (pooled onto 4x4), the third the raw pixels. Each is probed alone and fused, in one
    table and JSON; the fused probe is as good as the best single source and far better than the blind one, so it
    carries the other sources' tokens paired with the right samples. Each partner's features are cached under its
    own key; a missing partner is one line and exit 2."""
    from helpers import jpeg, write_tar

    monkeypatch.setenv("AIMPRE_CACHE", str(tmp_path / "cache"))
    blind = _export(tmp_path, "blind", blind=True, width=96, heads=2, mlp_hidden=256, patch_size=28)
    tiny = _export(tmp_path, "tiny")
    rng = torch.Generator().manual_seed(0)

    def shard(name: str, n: int) -> str:  # three classes: a reddish, greenish or bluish picture, brightness varies
        samples = []
        for i in range(n):  # classes drawn at random: a source shifted by a sample would not predict them
            label, colour = int(torch.randint(0, 3, (), generator=rng)), torch.randint(0, 90, (3,), generator=rng)
            colour[label] += 120
            samples.append({"__key__": f"k{i:03d}", "jpg": jpeg(tuple(colour.tolist())), "cls": str(label)})
        return str(write_tar(tmp_path / name, samples))

    train, test = shard("train.tar", 60), shard("test.tar", 60)
    args = ["probe", str(blind), str(tiny), "--train", train, "--test", test, "--epochs", "10"]
    assert main([*args, "--fuse", "sum", "--out", str(tmp_path / "p.json")]) == 0
    res = json.loads((tmp_path / "p.json").read_text())
    fused = fused_name(["encoder", str(tiny)], "sum")
    assert list(res["results"]) == ["encoder", str(tiny), fused]
    assert res["fuse"] == [str(tiny)] and res["fusion"] == "sum" and res["n_test"] == 60
    assert fused in capsys.readouterr().out
    for kind in ("attentive", "linear"):
        top1 = {name: r[kind]["top1"] for name, r in res["results"].items()}
        assert top1["encoder"] < 0.5, top1  # blind: it guesses among 3
        assert top1[fused] >= top1[str(tiny)] - 0.1, (kind, top1)
        assert top1[fused] > top1["encoder"] + 0.3, (kind, top1)
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 4  # two encoders x two shard sets
    out = tmp_path / "c.json"  # concatenated, with the pixels, on a held-out 20%
    assert main(["probe", str(blind), str(tiny), "pixels", "--train", train, "--test", "none", "--kind", "linear",
                 "--epochs", "10", "--out", str(out)]) == 0  # fmt: skip
    top1 = {name: r["linear"]["top1"] for name, r in json.loads(out.read_text())["results"].items()}
    assert list(top1) == ["encoder", str(tiny), "pixels", f"encoder + {tiny} + pixels"]
    assert top1[f"encoder + {tiny} + pixels"] >= max(top1[str(tiny)], top1["pixels"]) - 0.1, top1
    capsys.readouterr()
    assert main(["probe", str(blind), str(tmp_path / "nothing"), "--train", train]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing" in err
