"""``aimpre.create_model_from_pretrained`` against the real transformers and timm, and the checkout's ``kernels/``
not shadowing Hugging Face's ``kernels`` distribution. Nothing downloads (conftest sets HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import transformers
from PIL import Image

import aimpre
from aimpre.export import ExportError, preprocessing_info, write_export
from aimpre.model import AIMv2Encoder, model_config

ROOT = Path(__file__).resolve().parents[1]
PRE = preprocessing_info((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 112)


@pytest.fixture(scope="module")
def encoder() -> AIMv2Encoder:
    torch.manual_seed(0)
    enc = AIMv2Encoder(model_config("tiny", depth=2, vocab_size=258))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in enc.parameters():  # off its init, so that a wrong mapping or pooling shows
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return enc.eval()


def _images() -> list[Image.Image]:
    """Square images (the processors agree on those; see the README on non-square ones), at the encoder's
    resolution and larger, noise and a smooth ramp."""
    rng = np.random.default_rng(0)
    out = []
    for s in (112, 160, 224):
        out.append(Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)))
        yy, xx = np.mgrid[0:s, 0:s]
        ramp = np.stack([xx * 255 // s, yy * 255 // s, (xx + yy) * 127 // s], -1).astype(np.uint8)
        out.append(Image.fromarray(ramp))
    return out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def test_transform_and_pooled_output_equal_transformers(encoder: AIMv2Encoder, tmp_path: Path) -> None:
    out = write_export(encoder, "hf", tmp_path / "hf", info={"preprocessing": PRE})
    model, preprocess = aimpre.create_model_from_pretrained(out)
    images = _images()
    x = torch.stack([preprocess(im) for im in images])  # [6, 3, 112, 112]
    proc = transformers.AutoImageProcessor.from_pretrained(out)
    assert _max_diff(x, proc(images=images, return_tensors="pt")["pixel_values"]) < 1e-5
    pooled = model(x)
    assert pooled.shape == (len(images), encoder.cfg.width) and not model.training
    pipe = transformers.pipeline("image-feature-extraction", model=str(out), pool=True)
    got = torch.tensor(np.array(pipe(images)), dtype=torch.float32).reshape(len(images), -1)
    assert _max_diff(pooled, got) < 1e-5  # the pipeline: its own processor, the model's pooler_output
    hf = transformers.Aimv2VisionModel.from_pretrained(out).eval()
    assert _max_diff(model.forward_features(x), hf(pixel_values=x).last_hidden_state) < 1e-5
    unit = model.encode_image(x, normalize=True)
    assert _max_diff(unit.norm(dim=-1), torch.ones(len(images))) < 1e-5
    assert _max_diff(unit * pooled.norm(dim=-1, keepdim=True), pooled) < 1e-5


@torch.no_grad()
def test_timm_export_pools_as_timm(encoder: AIMv2Encoder, tmp_path: Path) -> None:
    out = write_export(encoder, "timm", tmp_path / "timm", info={"preprocessing": PRE})
    model, preprocess = aimpre.create_model_from_pretrained(out)
    x = torch.stack([preprocess(im) for im in _images()[:2]])
    ref = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # num_classes=0, global_pool="avg"
    assert _max_diff(model(x), ref(x)) < 1e-5
    tokens, _ = aimpre.create_model_from_pretrained(out, pool="none")
    assert _max_diff(tokens(x), ref.forward_features(x)) < 1e-5
    maxed, _ = aimpre.create_model_from_pretrained(out, pool="max")
    assert _max_diff(maxed(x), ref.forward_features(x).amax(1)) == 0.0


@torch.no_grad()
def test_run_and_checkpoint_sources(tiny_run: Path) -> None:
    """A run directory (its last checkpoint) and one of its checkpoints, with the run's data.mean/std."""
    from aimpre.export import read_run, run_encoder

    run = read_run(tiny_run)
    model, preprocess = aimpre.create_model_from_pretrained(tiny_run)
    assert (preprocess.mean, preprocess.std) == (tuple(run.cfg.data.mean), tuple(run.cfg.data.std))
    assert model.info["run"] == "tiny2" and model.info["step"] == 6
    x = preprocess(_images()[1])[None]
    assert _max_diff(model(x), run_encoder(run)(x).mean(1)) == 0.0
    step3, _ = aimpre.create_model_from_pretrained(tiny_run / "checkpoints" / "step-3.ckpt")
    assert step3.info["step"] == 3 and _max_diff(step3(x), model(x)) > 1e-4


@torch.no_grad()
def test_dtype_device_and_missing_normalisation(encoder: AIMv2Encoder, tmp_path: Path) -> None:
    bare = write_export(encoder, "safetensors", tmp_path / "bare")  # records no mean/std
    with pytest.raises(ExportError, match=r"bare: records no normalisation.*image_mean"):
        aimpre.create_model_from_pretrained(bare)
    model, preprocess = aimpre.create_model_from_pretrained(
        bare, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3), dtype=torch.bfloat16, device="cpu"
    )
    assert preprocess.mean == (0.5, 0.4, 0.3) and preprocess.img_size == 112
    x = preprocess(_images()[0])[None]  # float32 in, cast to the weights' dtype
    y = model(x)
    assert y.dtype == torch.bfloat16 and y.shape == (1, encoder.cfg.width)
    assert _max_diff(y, encoder(x).mean(1)) < 0.1  # bf16 weights: close, not equal
    with pytest.raises(ExportError, match="image_mean/image_std: std"):
        aimpre.create_model_from_pretrained(bare, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.0, 0.3))
    with pytest.raises(TypeError, match=r"normalised floats \(preprocess\(image\) makes them\), got torch.uint8"):
        model(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pool='cls'"):
        aimpre.create_model_from_pretrained(bare, pool="cls")


def _python(code: str, cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False
    )


def test_import_aimpre_stays_light() -> None:
    r = _python("import sys, aimpre; print('torch' in sys.modules)", ROOT)  # the lazy attribute is used above
    assert (r.returncode, r.stdout.strip()) == (0, "False"), r.stderr


def test_checkout_does_not_shadow_installed_kernels() -> None:
    """A user's `python -c` (or notebook) in the checkout root: `kernels` is Hugging Face's, transformers loads;
    also where aimpre is not installed (site-packages without its .pth: the checkout's own aimpre/ is found, which
    has no aimpre.kernels, as when a regular install is shadowed by the checkout)."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` distribution is not installed")
    code = (
        "import kernels, aimpre.kernels; from transformers import Aimv2VisionModel; "
        "print(kernels.__file__, callable(kernels.get_kernel), callable(aimpre.kernels.attention))"
    )
    r = _python(code, ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    hf_file, hub_api, ours = r.stdout.split()[-3:]
    assert Path(hf_file).resolve() != ROOT / "kernels" / "__init__.py" and (hub_api, ours) == ("True", "True")
    site = sysconfig.get_paths()["purelib"]
    code = f"import sys; sys.path.append({site!r}); import kernels; from transformers import Aimv2VisionModel"
    r = _python(code, ROOT, "-S")
    assert r.returncode == 0, r.stderr[-2000:]


def test_top_level_kernels_without_the_distribution_names_aimpre_kernels() -> None:
    r = _python("import sys; sys.path[:] = ['']; import kernels", ROOT)  # the checkout alone on the path
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("ModuleNotFoundError: ")
    assert "imported as `aimpre.kernels`" in r.stderr
