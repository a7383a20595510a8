"""FLOP and parameter counting against torch's own counters and the real modules."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from aimpre.kernels import dense_mask
from aimpre.model import SIZES, AIMv2, model_config
from aimpre.scaling import forward_flops, param_count, param_counts, training_flops
from aimpre.scaling.flops import mean_prefix_pairs

SMALL = {
    "one-block": dict(width=32, depth=1, heads=2, mlp_hidden=40, dec_width=24, dec_depth=1, dec_heads=2,
                      dec_mlp_hidden=16, img_size=56, text_len=7),
    "deeper": dict(width=48, depth=3, heads=3, mlp_hidden=64, dec_width=32, dec_depth=2, dec_heads=4,
                   dec_mlp_hidden=72, img_size=42, text_len=5, prefix_min=3, prefix_max=6),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SMALL))
def test_flops_match_flop_counter_mode(name: str) -> None:
    """Dense-attention counts equal FlopCounterMode's exactly, forward and forward + backward (the image
    input needs no gradient: the counter sees only the weight gradient of the patch convolution)."""
    cfg = model_config("tiny", vocab_size=50, attn_backend="reference", **SMALL[name])
    model = AIMv2(cfg)
    B = 3
    images = torch.randn(B, 3, cfg.img_size, cfg.img_size)
    text = torch.randint(0, 50, (B, cfg.text_len))
    mask = torch.ones(B, cfg.text_len, dtype=torch.bool)
    prefix = torch.tensor([cfg.prefix_min, cfg.prefix_min + 1, cfg.prefix_range[1]])
    with FlopCounterMode(display=False) as fwd:
        model(images, text, mask, prefix)
    with FlopCounterMode(display=False) as both:
        model(images, text, mask, prefix)["loss"].backward()
    assert fwd.get_total_flops() == B * forward_flops(cfg, attention="dense").total
    assert both.get_total_flops() == B * training_flops(cfg, attention="dense").total
    # and the convolution's share: forward + weight gradient only
    conv = sum(v for k, v in both.get_flop_counts()["Global"].items() if "convolution" in str(k))
    assert conv == B * 2 * 2 * cfg.num_patches * cfg.patch_dim * cfg.width


def test_masked_counts_only_allowed_pairs() -> None:
    """The masked count's pairs are the mask's allowed entries, averaged over the uniform prefix draw."""
    cfg = model_config("tiny", vocab_size=50, **SMALL["deeper"])
    N, (lo, hi) = cfg.num_patches, cfg.prefix_range
    prefixes = torch.arange(lo, hi + 1)
    allowed = dense_mask("prefix", prefixes, N, torch.device("cpu")).sum() / len(prefixes)
    assert mean_prefix_pairs(N, lo, hi) == pytest.approx(float(allowed))
    T = cfg.dec_seq_len
    causal = int(dense_mask("causal", None, T, torch.device("cpu")).sum())
    dense, masked = training_flops(cfg, attention="dense"), training_flops(cfg)
    saved_enc = 6 * 2 * cfg.depth * cfg.width * (N * N - float(allowed))
    saved_dec = 6 * 2 * cfg.dec_depth * cfg.dec_width * (T * T - causal)
    assert dense.encoder - masked.encoder == pytest.approx(saved_enc)
    assert dense.decoder - masked.decoder == pytest.approx(saved_dec)
    assert training_flops(cfg, prefix=False).encoder == dense.encoder  # full attention: every pair


@pytest.mark.parametrize("size", list(SIZES))
def test_param_counts_match_the_model(size: str) -> None:
    cfg = model_config(size)
    cfg = replace(cfg, vocab_size=cfg.vocab_size or 1000)  # tiny takes its vocabulary from the tokenizer
    with torch.device("meta"):
        model = AIMv2(cfg)
    assert param_counts(cfg) == model.param_counts()
    tables = ("encoder.pos_embed", "decoder.text_embed.weight", "decoder.start_token", "decoder.text_pos")
    named = dict(model.named_parameters())
    emb = sum(named[k].numel() for k in tables)
    bare = param_counts(cfg, embeddings=False)
    assert bare["total"] == model.param_counts()["total"] - emb
    assert bare["encoder"] == model.param_counts()["encoder"] - named["encoder.pos_embed"].numel()
    assert param_count(cfg, "encoder") == model.param_counts()["encoder"]
    assert param_count(cfg, "total", embeddings=False) == bare["total"]
    with pytest.raises(ValueError, match="scope"):
        param_count(cfg, "decoder")
