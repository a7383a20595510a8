"""Starting a run from weights (``--init`` / ``run.init``, issue 20 points 1 and 2): released timm and Hugging Face
AIMv2 files built here at a tiny size (random weights, saved to disk, nothing downloaded), runs of our own, the
position embedding resampled as timm resamples it, and a two-stage 112 -> 168 px run whose loss carries on."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
import transformers
from timm.layers import resample_abs_pos_embed

from aimpre.cli import main
from aimpre.config import load_config
from aimpre.model.posemb import resample_pos_embed
from aimpre.train import train
from helpers import perturbed

# a tiny AIMv2 (2 blocks of 96, SwiGLU 264: timm's int(96 * 2.75)) and a 1-block decoder; patch 14
SHAPE = ["model.width=96", "model.depth=2", "model.heads=2", "model.mlp_hidden=264", "model.dec_depth=1"]


def _images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


class _FirstForward(pl.Callback):
    """The run's encoder features on ``images`` before its first step: what ``--init`` loaded."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.features = images, None

    @torch.no_grad()
    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.features = module.model.encoder(self.images.to(module.device)).cpu()


def _cfg(tmp: Path, spec: str, name: str, *extra: str) -> list[str]:
    return [f"run.out_dir={tmp}", f"run.name={name}", f"data.train_shards={spec}", "data.val_shards=null",
            "data.batch_size=4", "data.num_workers=0", "trainer.log_every=1", "trainer.ckpt_every=1000",
            "optim.warmup_steps=2", *extra]  # fmt: skip


def _first_forward(tmp: Path, spec: str, source: Path, img: int, *extra: str) -> tuple[torch.Tensor, Path]:
    cb = _FirstForward(_images(img))
    cfg = load_config(None, _cfg(tmp, spec, f"init-{img}", f"run.init={source}", f"model.img_size={img}",
                                 "trainer.max_steps=1", *SHAPE, *extra))  # fmt: skip
    run = train(cfg, callbacks=(cb,))
    assert cb.features is not None
    return cb.features, run


def test_resample_pos_embed_is_timms() -> None:
    pos = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(0))  # an 8 x 8 grid
    for new in (12, 16, 5, 8):  # up, up, down (antialiasing matters there), same
        want = resample_abs_pos_embed(pos, [new, new], [8, 8], num_prefix_tokens=0)
        assert torch.equal(resample_pos_embed(pos, new, 8), want), new
    assert torch.equal(resample_pos_embed(pos, (6, 10)), resample_abs_pos_embed(pos, [6, 10], num_prefix_tokens=0))
    half = pos.bfloat16()
    assert resample_pos_embed(half, 12).dtype == torch.bfloat16
    assert torch.equal(resample_pos_embed(half, 12), resample_abs_pos_embed(half, [12, 12], num_prefix_tokens=0))


def test_init_from_released_timm_files(tmp_path: Path, pretrain_spec: str) -> None:
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = perturbed(
        timm.create_model("aimv2_large_patch14_224", embed_dim=96, depth=2, num_heads=2, mlp_ratio=2.75, img_size=112)
    )
    save_for_hf(model, str(tmp_path / "timm"), safe_serialization=True)  # timm's hub layout, written by timm
    got, run = _first_forward(tmp_path, pretrain_spec, tmp_path / "timm", 112)
    with torch.no_grad():
        assert float((got - model.forward_features(_images(112))).abs().max()) <= 1e-5
    record = json.loads((run / "init.json").read_text())
    assert record["encoder"]["pos_embed"] == "as is" and record["loaded"] == [] and record["step"] == 0
    assert "decoder.img_proj.weight" in record["fresh"] and not record["dropped"]  # a timm file has no decoder
    files = sorted(p.name for p in (tmp_path / "timm").iterdir() if p.suffix in (".json", ".safetensors"))
    lines = "".join(f"{hashlib.sha256((tmp_path / 'timm' / n).read_bytes()).hexdigest()}  {n}\n" for n in files)
    assert record["sha256"] == hashlib.sha256(lines.encode()).hexdigest()  # `sha256sum * | sha256sum`

    # at 168 px: the same weights that timm itself loads at img_size=168 (its loader resamples pos_embed too)
    got, run = _first_forward(tmp_path, pretrain_spec, tmp_path / "timm", 168)
    big = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True, img_size=168).eval()
    with torch.no_grad():
        assert float((got - big.forward_features(_images(168))).abs().max()) <= 1e-5
    assert json.loads((run / "init.json").read_text())["encoder"]["pos_embed"].startswith("resampled 8x8 -> 12x12")


def test_init_from_released_hf_files(tmp_path: Path, pretrain_spec: str) -> None:
    cfg = transformers.Aimv2VisionConfig(
        hidden_size=96, intermediate_size=264, num_hidden_layers=2, num_attention_heads=2, image_size=112, use_head=True
    )
    model = perturbed(transformers.Aimv2VisionModel(cfg))
    model.save_pretrained(tmp_path / "hf")
    got, _ = _first_forward(tmp_path, pretrain_spec, tmp_path / "hf", 112)
    with torch.no_grad():
        assert float((got - model(pixel_values=_images(112)).last_hidden_state).abs().max()) <= 1e-5


def _losses(run: Path) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


@pytest.mark.slow  # two real runs (36 steps): ~30 s alone, minutes on a shared CPU
def test_two_stages_loss_carries_on(tmp_path: Path, pretrain_spec: str, capsys: pytest.CaptureFixture) -> None:
    """112 px for 30 steps, then --init at 168 px (the tiny model's 224 -> 336): the second stage starts where the
    first ended, not where a fresh model starts; its decoder and heads come along, and the record says so."""
    one = train(load_config(None, _cfg(tmp_path, pretrain_spec, "s1", "trainer.max_steps=30", *SHAPE)))
    argv = ["train", "--init", str(one), *_cfg(tmp_path, pretrain_spec, "s2", "model.img_size=168",
            "trainer.max_steps=6", "optim.weight_decay=0", *SHAPE)]  # fmt: skip
    assert main(argv) == 0
    assert "aimpre: init from" in capsys.readouterr().out
    two = tmp_path / "s2"
    first, second = _losses(one), _losses(two)
    assert len(first) == 30 and len(second) == 6
    final = sum(first[-5:]) / 5
    # a fresh model starts near first[0]; the second stage starts next to where the first ended
    assert abs(second[0] - final) < 0.25 * (first[0] - final), (first[0], final, second[0])
    record = json.loads((two / "init.json").read_text())
    assert record["encoder"]["pos_embed"].startswith("resampled 8x8 -> 12x12")
    assert "decoder.blocks.0.attn.qkv.weight" in record["loaded"] and not record["dropped"]
    assert record["sha256"] == hashlib.sha256((one / "checkpoints" / "last.ckpt").read_bytes()).hexdigest()
    assert record["source_info"]["run"] == "s1"


def test_bad_init_is_one_line_exit_2(tmp_path: Path, pretrain_spec: str, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("not an encoder")
    base = _cfg(tmp_path, pretrain_spec, "bad", "trainer.max_steps=1", *SHAPE)
    hf = transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(
        hidden_size=96, intermediate_size=264, num_hidden_layers=2, num_attention_heads=2, image_size=128,
        patch_size=16))  # fmt: skip
    hf.save_pretrained(tmp_path / "p16")
    cases = {
        str(tmp_path / "notes.txt"): "expected a run or model directory",
        str(tmp_path / "missing"): "no such file",
        str(tmp_path / "p16"): "patch_size 16",
    }
    capsys.readouterr()

    def error_line() -> str:  # ours, apart from library warnings printed on first import (torch, transformers)
        ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("aimpre")]
        assert len(ours) == 1 and ours[0].startswith("aimpre: error:"), ours
        return ours[0]

    for source, words in cases.items():
        assert main(["train", "--init", source, *base]) == 2, source
        assert words in error_line(), source
    assert main(["train", "--init", str(tmp_path / "p16"), *base, "model.img_size=120"]) == 2
    err = error_line()
    assert "model.img_size" in err and "multiple of model.patch_size" in err
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.parametrize("img", [336, 448])
@torch.no_grad()
def test_high_resolution_exports_load_in_timm_and_hf(img: int, tmp_path: Path) -> None:
    from aimpre.export import preprocessing_info, write_export
    from aimpre.formats import timm_architecture
    from aimpre.model import AIMv2Encoder, model_config

    torch.manual_seed(0)
    cfg = model_config("tiny", depth=1, width=64, heads=1, mlp_hidden=128, img_size=img, vocab_size=258)
    enc = perturbed(AIMv2Encoder(cfg))
    pre = {"preprocessing": preprocessing_info((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), img)}
    x = torch.randn(1, 3, img, img, generator=torch.Generator().manual_seed(2))
    ours = enc(x)
    hub = timm.create_model(f"local-dir:{write_export(enc, 'timm', tmp_path / 't', info=pre)}", pretrained=True)
    assert hub.pretrained_cfg["input_size"][1:] == (img, img)
    assert float((hub.eval().forward_features(x) - ours).abs().max()) <= 1e-5
    hf = transformers.Aimv2VisionModel.from_pretrained(write_export(enc, "hf", tmp_path / "h", info=pre)).eval()
    assert hf.config.image_size == img
    assert float((hf(pixel_values=x).last_hidden_state - ours).abs().max()) <= 1e-5
    # the released shape gets timm's own name at this resolution (a tiny one gets the local-dir: route above)
    arch, tag = timm_architecture(model_config("large", img_size=img))
    assert arch == f"aimv2_large_patch14_{img}" and tag is None and timm.is_model(arch)


def test_resolution_in_flops_collect_and_compare(tmp_path: Path, tiny_run: Path, capsys) -> None:
    from aimpre.compare import format_table, plan
    from aimpre.scaling.collect import COLUMNS, run_row

    fps = {}
    for img in (224, 336, 448):
        assert main(["model-info", "large", "--img-size", str(img), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["img_size"] == img
        fps[img] = info["flops_per_sample"]
    # 2.25x the patches (the caption part of the decoder is fixed), attention growing faster than T
    assert fps[224] < fps[336] < fps[448] and fps[336] / fps[224] > 2
    row = run_row(tiny_run)
    assert {"img_size", "patch_size", "num_patches"} <= set(COLUMNS)
    assert (row["img_size"], row["patch_size"], row["num_patches"]) == (112, 14, 64)
    low, high = (plan(("aimv2",), None, (f"model.img_size={s}",), out=tmp_path) for s in (112, 168))
    assert high[0].cfg.model.img_size == 168 and high[0].flops_per_sample > low[0].flops_per_sample
    table = format_table({"rows": [], "seeds": [0], "probe": {"train": "a", "test": "b"}, "machine": "m",
                          "date": "d", "seconds": 1.0, "img_size": 168})  # fmt: skip
    assert "at 168 px" in table
    assert main(["compare", "--img-size", "100", "--out", str(tmp_path / "c")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("aimpre")]
    assert len(err) == 1 and "model.img_size" in err[0]
