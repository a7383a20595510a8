"""Exports load in the real timm and transformers and compute the same features as our encoder, both ways.

Nothing downloads: every model here is random or local, and conftest sets HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aimpre.export import ExportError, export_encoder, load, load_encoder, preprocessing_info, write_export
from aimpre.formats import (
    TIMM_MLP_RATIO,
    config_from_hf,
    config_from_timm,
    hf_config,
    hf_mean_head,
    timm_config,
    to_hf,
)
from aimpre.model import AIMv2Encoder, model_config
from helpers import perturbed

PRE = preprocessing_info((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 112)
SIZES = {"large": 309.2e6, "huge": 680.9e6, "1b": 1235.0e6, "3b": 2720.7e6}


@pytest.fixture(scope="module")
def encoder() -> AIMv2Encoder:
    torch.manual_seed(0)
    return perturbed(AIMv2Encoder(model_config("tiny", depth=2, vocab_size=258)))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


@torch.no_grad()
def test_timm_export_loads_in_timm(encoder: AIMv2Encoder, images: torch.Tensor, tmp_path: Path) -> None:
    out = write_export(encoder, "timm", tmp_path / "timm", info={"preprocessing": PRE, "run": "r", "step": 7})
    ours = encoder(images)
    hub = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # timm's own hub loader, offline
    assert _max_diff(hub.forward_features(images), ours) < 1e-5
    assert list(hub.pretrained_cfg["mean"]) == PRE["mean"] and hub.pretrained_cfg["input_size"][1:] == (112, 112)
    conf = json.loads((out / "config.json").read_text())
    built = timm.create_model(conf["architecture"], pretrained=False, **conf["model_args"]).eval()
    built.load_state_dict(load_file(out / "model.safetensors"))  # strict: every name and shape matches
    assert _max_diff(built.forward_features(images), ours) < 1e-5
    info = json.loads((out / "aimpre.json").read_text())
    assert info["run"] == "r" and info["step"] == 7 and info["preprocessing"]["std"] == PRE["std"]


@torch.no_grad()
def test_hf_export_loads_in_transformers(encoder: AIMv2Encoder, images: torch.Tensor, tmp_path: Path) -> None:
    out = write_export(encoder, "hf", tmp_path / "hf", info={"preprocessing": PRE})
    model = transformers.Aimv2VisionModel.from_pretrained(out).eval()
    assert model.config.use_head and model.dtype == torch.float32
    got = model(pixel_values=images)
    assert _max_diff(got.last_hidden_state, encoder(images)) < 1e-5
    assert _max_diff(got.pooler_output, encoder(images).mean(1)) < 1e-5  # the mean-pooled features, as timm's avg
    proc = transformers.AutoImageProcessor.from_pretrained(out)
    assert list(proc.image_mean) == PRE["mean"] and list(proc.image_std) == PRE["std"]


@torch.no_grad()
def test_every_format_loads_back(encoder: AIMv2Encoder, images: torch.Tensor, tmp_path: Path) -> None:
    ours = encoder(images)
    for fmt in ("timm", "hf", "safetensors"):
        out = write_export(encoder, fmt, tmp_path / fmt, info={"preprocessing": PRE})
        for path in (out, out / "model.safetensors"):
            loaded = load(path)
            assert _max_diff(loaded.encoder(images), ours) == 0.0, (fmt, path)
            assert loaded.info["preprocessing"]["mean"] == PRE["mean"]
        again = export_encoder(out, "timm", tmp_path / f"{fmt}-again")  # an export of an export
        assert _max_diff(load_encoder(again)(images), ours) == 0.0
    half = write_export(encoder, "hf", tmp_path / "bf16", "bf16", info={"preprocessing": PRE})
    with safe_open(str(half / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())  # noqa: SIM118
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert _max_diff(load_encoder(half)(images), ours) < 0.1  # bf16 weights: close, not equal


@torch.no_grad()
def test_timm_model_initialises_our_encoder(images: torch.Tensor, tmp_path: Path) -> None:
    from timm.models import save_for_hf

    model = perturbed(
        timm.create_model("aimv2_large_patch14_224", embed_dim=96, depth=2, num_heads=2, mlp_ratio=2.75, img_size=112)
    )
    save_for_hf(model, str(tmp_path / "t"), safe_serialization=True)  # timm's hub layout, written by timm
    enc = load_encoder(tmp_path / "t")
    assert (enc.cfg.width, enc.cfg.depth, enc.cfg.heads, enc.cfg.mlp_hidden) == (96, 2, 2, 264)
    assert _max_diff(enc(images), model.forward_features(images)) < 1e-5


@torch.no_grad()
def test_hf_model_initialises_our_encoder(images: torch.Tensor, tmp_path: Path) -> None:
    cfg = transformers.Aimv2VisionConfig(
        hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=2, image_size=112, use_head=True
    )
    model = perturbed(transformers.Aimv2VisionModel(cfg))
    model.save_pretrained(tmp_path / "h")
    loaded = load(tmp_path / "h")  # the pooling head is dropped: it is not part of the trunk
    assert loaded.info["preprocessing"]["mean"] is None  # save_pretrained writes no image processor
    assert _max_diff(loaded.encoder(images), model(pixel_values=images).last_hidden_state) < 1e-5
    with pytest.raises(ExportError, match="mean/std"):
        export_encoder(tmp_path / "h", "timm", tmp_path / "x")


@pytest.mark.parametrize("size", list(SIZES))
def test_paper_sizes_match_timm_and_hf_names_and_shapes(size: str) -> None:
    cfg = model_config(size)
    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}
    hf_fields = {k: v for k, v in hf_config(cfg, "fp32").items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        ours = AIMv2Encoder(cfg).state_dict()
        t = timm.create_model(f"aimv2_{size}_patch14_224", pretrained=False)
        h = transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(**hf_fields))
    assert shapes(ours) == shapes(t.state_dict())  # the timm export is our state dict as it is
    assert shapes({**to_hf(ours), **hf_mean_head(cfg.width, torch.float32)}) == shapes(h.state_dict())
    assert sum(v.numel() for v in t.state_dict().values()) == pytest.approx(SIZES[size], rel=5e-4)
    assert timm_config(cfg, PRE)["architecture"] == f"aimv2_{size}_patch14_224"
    for back in (config_from_timm(timm_config(cfg, PRE), "t"), config_from_hf(hf_config(cfg, "fp32"), "h")):
        assert (back.size, back.width, back.depth, back.heads, back.mlp_hidden) == (
            size, cfg.width, cfg.depth, cfg.heads, cfg.mlp_hidden
        )  # fmt: skip
    assert int(cfg.width * TIMM_MLP_RATIO[size]) == cfg.mlp_hidden


def test_bad_inputs_name_the_file_and_key(encoder: AIMv2Encoder, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"no config\.yaml"):
        load(tmp_path / "empty")
    out = write_export(encoder, "timm", tmp_path / "t", info={"preprocessing": PRE})
    with pytest.raises(FileExistsError, match="exists"):
        write_export(encoder, "timm", out, info={"preprocessing": PRE})
    with pytest.raises(ExportError, match="mean/std"):
        write_export(encoder, "hf", tmp_path / "no-mean")
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind
    with pytest.raises(ExportError, match="unknown export format"):
        write_export(encoder, "onnx", tmp_path / "o")

    conf = json.loads((out / "config.json").read_text())
    (out / "aimpre.json").unlink()  # now read as a plain timm directory
    conf["model_args"]["qkv_bias"] = True
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ExportError, match=r"model_args\.qkv_bias"):
        load(out)
    del conf["model_args"]["qkv_bias"]
    conf["model_args"]["num_heads"] = 4  # 192 wide: fine for the config, and shapes still match ...
    conf["model_args"]["depth"] = 3  # ... but a third block is missing from the weights
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ExportError, match=r"config\.json says depth 3, but .*model\.safetensors holds 2 blocks"):
        load(out)
    conf["model_args"]["depth"] = 2
    conf["model_args"]["embed_dim"] = 96
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ExportError, match=r"tensor '\w+' has shape \(1, 64, 192\), the config implies \(1, 64, 96\)"):
        load(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match=r"config\.json is not valid JSON"):
        load(out)
    broken = write_export(encoder, "safetensors", tmp_path / "broken", info={"preprocessing": PRE})
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{trunc")
    with pytest.raises(ExportError, match=r"model\.safetensors: not a readable safetensors file"):
        load(broken)
    state = {k: v for k, v in to_hf(encoder.state_dict()).items() if "q_proj" not in k}
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(state, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(hf_config(encoder.cfg, "fp32")))
    with pytest.raises(ExportError, match=r"layer 0 has \['k', 'v'\]"):
        load(hf)


@torch.no_grad()
def test_run_exports_encoder_only_with_provenance(tiny_run: Path, images: torch.Tensor, tmp_path: Path, capsys) -> None:
    from aimpre.cli import main
    from aimpre.config import config_hash
    from aimpre.export import read_run

    run = read_run(tiny_run)
    enc = AIMv2Encoder(run.cfg.model).eval()
    enc.load_state_dict({k.removeprefix("encoder."): v for k, v in run.state.items() if k.startswith("encoder.")})
    assert main(["export", str(tiny_run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "step 6" in capsys.readouterr().out
    info = json.loads((tmp_path / "hf" / "aimpre.json").read_text())
    assert (info["run"], info["step"], info["config_hash"]) == ("tiny2", 6, config_hash(run.cfg))
    assert info["preprocessing"]["mean"] == list(run.cfg.data.mean) and info["preprocessing"]["img_size"] == 112
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    trunk = [n for n in names if not n.startswith("head.")]  # head.*: the mean-pooling head of pooler_output
    assert len(trunk) == 5 + 2 * 9 and all(n.startswith(("embeddings.", "encoder.layers.", "rms_norm.")) for n in trunk)
    assert sorted(set(names) - set(trunk)) == sorted(hf_mean_head(192, torch.float32))
    model = transformers.Aimv2VisionModel.from_pretrained(tmp_path / "hf").eval()
    assert _max_diff(model(pixel_values=images).last_hidden_state, enc(images)) < 1e-5
    step3 = load(tiny_run / "checkpoints" / "step-3.ckpt")
    assert step3.info["step"] == 3 and _max_diff(step3.encoder(images), enc(images)) > 1e-4

    assert main(["export", str(tiny_run), "--format", "timm", "--out", str(tmp_path / "hf")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "timm", "--out", str(tmp_path / "t")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_load_gives_the_matching_transform(encoder: AIMv2Encoder, tmp_path: Path) -> None:
    """``load(...).transform`` turns an image into exactly what the evaluation pipeline feeds the encoder."""
    import io

    import numpy as np
    from PIL import Image

    from aimpre.data.decode import Augment, decode_image

    out = write_export(encoder, "safetensors", tmp_path / "st", info={"preprocessing": PRE})
    loaded = load(out)
    assert loaded.transform is not None
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (131, 157, 3), dtype=np.uint8)  # not square: the centre crop matters
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    image = Image.open(io.BytesIO(buf.getvalue()))
    u8 = decode_image(buf.getvalue(), Augment(112, train=False), rng)
    assert isinstance(u8, torch.Tensor)
    mean, std = (torch.tensor(PRE[k]).view(3, 1, 1) for k in ("mean", "std"))
    x = loaded.transform(image)
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32
    assert _max_diff(x, (u8.float() / 255 - mean) / std) == 0.0
    assert _max_diff(loaded.transform(image.convert("RGBA")), x) == 0.0
    with torch.no_grad():
        assert loaded.encoder(x[None]).shape == (1, 64, encoder.cfg.width)
    bare = write_export(encoder, "safetensors", tmp_path / "bare")  # no recorded mean/std: no transform
    assert load(bare).transform is None
