from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from aimpre.model import SIZES, AIMv2, AIMv2Encoder, model_config
from aimpre.model.losses import patchify

# Encoder parameters of the released AIMv2 encoders (paper Table 1, timm aimv2_*_patch14_224).
PAPER_ENCODER_PARAMS = {"large": 309.2e6, "huge": 680.9e6, "1b": 1235.0e6, "3b": 2720.7e6}


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_size_builds_on_meta(size: str) -> None:
    cfg = model_config(size, vocab_size=1000)
    with torch.device("meta"):
        model = AIMv2(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert model.encoder.pos_embed.shape == (1, cfg.num_patches, cfg.width)


@pytest.mark.parametrize("size", sorted(PAPER_ENCODER_PARAMS))
def test_paper_encoder_parameter_counts(size: str) -> None:
    with torch.device("meta"):
        enc = AIMv2Encoder(model_config(size))
    n = sum(p.numel() for p in enc.parameters())
    assert round(n / 1e6, 1) == pytest.approx(PAPER_ENCODER_PARAMS[size] / 1e6)


def test_encoder_uses_timm_parameter_names() -> None:
    with torch.device("meta"):
        enc = AIMv2Encoder(model_config("large"))
    names = set(dict(enc.named_parameters()))
    block = {f"blocks.0.{k}.weight" for k in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1_g", "mlp.fc1_x")}
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "pos_embed",
                "norm.weight", "blocks.0.mlp.fc2.weight", *block}  # fmt: skip
    assert expected <= names
    assert not any(n.endswith("bias") for n in names if n.startswith("blocks."))  # bias-free attention and MLP
    assert enc.blocks[0].mlp.fc1_g.weight.shape == (2816, 1024)


def small(**kw) -> AIMv2:
    torch.manual_seed(0)
    cfg = model_config("tiny", vocab_size=50, img_size=56, depth=2, dec_depth=2, text_len=8, **kw)
    return AIMv2(cfg).double().eval()


def test_prefix_attention_in_the_encoder() -> None:
    """Changing a patch t >= prefix leaves every output before t unchanged; inside the prefix all see all."""
    model = small()
    enc, p = model.encoder, model.cfg.patch_size
    N = model.cfg.num_patches  # 16
    torch.manual_seed(1)
    images = torch.randn(3, 3, 56, 56, dtype=torch.float64)
    prefix = torch.tensor([1, 5, 9])  # a different prefix per sample
    base = enc(images, prefix)
    for t in (9, 12, 15):  # t >= every prefix
        changed = images.clone()
        gy, gx = divmod(t, model.cfg.grid)
        changed[:, :, gy * p : (gy + 1) * p, gx * p : (gx + 1) * p] += 1.0  # only patch t changes
        out = enc(changed, prefix)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert (out[:, t:] - base[:, t:]).abs().amax(-1).min() > 1e-6  # everything at and after t moved
    # patch 4 sits inside sample 1's prefix (5) and sample 2's (9), outside sample 0's (1)
    changed = images.clone()
    gy, gx = divmod(4, model.cfg.grid)
    changed[:, :, gy * p : (gy + 1) * p, gx * p : (gx + 1) * p] += 1.0
    out = enc(changed, prefix)
    moved = (out[:, 0] - base[:, 0]).abs().amax(-1)
    assert moved[0] < 1e-12 and moved[1] > 1e-6 and moved[2] > 1e-6
    assert (out[:, : N - 1] - base[:, : N - 1]).abs().amax() > 0


def test_full_attention_without_prefix() -> None:
    model = small()
    images = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    changed = images.clone()
    changed[:, :, -14:, -14:] += 1.0  # the last patch
    moved = (model.encoder(changed) - model.encoder(images))[:, 0].abs().amax()
    assert moved > 1e-6  # position 0 sees the last patch


def test_forward_intermediates_are_the_blocks_outputs() -> None:
    """Block i's output, by hand from the encoder's own layers, through the final norm or not; the last block with the
    norm is forward(), with or without a prefix; an int n means the last n blocks; bad indices name the depth."""
    enc = small().encoder  # depth 2
    torch.manual_seed(2)
    images = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    prefix = torch.tensor([3, 7])
    x = enc.patch_embed(images) + enc.pos_embed
    by_hand = []
    for block in enc.blocks:
        x = block(x, "full", None)
        by_hand.append(x)
    first, last = enc.forward_intermediates(images, [0, -1], norm=False)
    torch.testing.assert_close(first, by_hand[0], rtol=0, atol=0)
    torch.testing.assert_close(last, by_hand[1], rtol=0, atol=0)
    (normed,) = enc.forward_intermediates(images, [0])
    torch.testing.assert_close(normed, enc.norm(by_hand[0]), rtol=0, atol=0)
    assert not torch.allclose(normed, first)
    torch.testing.assert_close(enc.forward_intermediates(images, 1)[0], enc(images), rtol=0, atol=0)
    torch.testing.assert_close(enc.forward_intermediates(images, [-1], prefix_len=prefix)[0], enc(images, prefix))
    assert len(enc.forward_intermediates(images)) == 2
    for bad in ([2], [-3], 3, 0, []):
        with pytest.raises(ValueError, match="block"):
            enc.forward_intermediates(images, bad)


def test_decoder_is_causal_over_the_caption() -> None:
    model = small()
    torch.manual_seed(2)
    images = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    text = torch.randint(2, 50, (2, 8))
    prefix = torch.tensor([3, 7])
    pixels, logits = model.predict(images, text, prefix)
    for j in range(7):  # the last token is never an input
        changed = text.clone()
        changed[:, j] = (changed[:, j] + 1) % 50
        p2, l2 = model.predict(images, changed, prefix)
        torch.testing.assert_close(l2[:, : j + 1], logits[:, : j + 1], rtol=0, atol=1e-12)  # logit k predicts token k
        assert (l2[:, j + 1] - logits[:, j + 1]).abs().amax() > 1e-6
        torch.testing.assert_close(p2, pixels, rtol=0, atol=1e-12)  # the image comes first: text never leaks back


def test_forward_losses_and_backward() -> None:
    model = small().float().train()
    images = torch.randn(2, 3, 56, 56)
    text = torch.randint(0, 50, (2, 8))
    out = model(images, text, text != 0, torch.tensor([1, 15]))
    assert set(out) == {"loss", "loss_image", "loss_text"}
    torch.testing.assert_close(out["loss"], out["loss_text"] + 0.4 * out["loss_image"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_pixel_predictions_cover_patches_1_to_n() -> None:
    model = small()
    images = torch.randn(1, 3, 56, 56, dtype=torch.float64)
    pixels, logits = model.predict(images, torch.zeros(1, 8, dtype=torch.long), torch.tensor([4]))
    assert pixels.shape == (1, 15, 588) and logits.shape == (1, 8, 50)
    assert patchify(images, 14).shape == (1, 16, 588)


@pytest.mark.parametrize("size", ["large", "3b"])
def test_model_info_cli(size: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "aimpre", "model-info", size, "--json"], capture_output=True, text=True, check=True
    )
    info = json.loads(out.stdout)
    assert set(info) == {"encoder", "decoder", "heads", "total", "img_size", "flops_per_sample"}
    assert info["img_size"] == 224
    assert round(info["encoder"] / 1e6, 1) == PAPER_ENCODER_PARAMS[size] / 1e6
    assert info["total"] == info["encoder"] + info["decoder"] + info["heads"]
    assert info["heads"] == 1024 * 588 + 1024 * 32000  # pixel head + text head (paper vocabulary), no bias
