"""FLOP and parameter counting against torch's own counters and the real modules."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from aimpre.kernels import dense_mask
from aimpre.model import SIZES, AIMv2, ModelConfig, model_config
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


OBJECTIVE_KEYS = dict(embed_dim=16, text_width=16, text_depth=2, text_heads=2, text_mlp_hidden=24, head_depth=2,
                      head_width=24, num_classes=5)  # fmt: skip
LOSS_MATMULS = {"clip": 2, "siglip": 1}  # [B, E] x [E, B] similarity products per step (not counted per sample)


def _objective_step(cfg: ModelConfig, B: int, backward: bool) -> int:
    from aimpre.objectives import build, uses_prefix

    torch.manual_seed(0)
    model = build(cfg)
    images = torch.randn(B, 3, cfg.img_size, cfg.img_size)
    L = cfg.text_len
    batch = {"text": torch.randint(0, 50, (B, L)), "text_mask": torch.ones(B, L, dtype=torch.bool),
             "label": torch.randint(0, 5, (B,))}  # fmt: skip
    prefix = torch.full((B,), cfg.prefix_min) if uses_prefix(cfg.objective) else None
    with FlopCounterMode(display=False) as counter:
        loss = model(images, batch, prefix)["loss"]
        if backward:
            loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("objective", ["aimv2", "aimv1", "siglip", "clip", "classification"])
def test_every_objective_counts_match_flop_counter_mode(objective: str) -> None:
    """Forward and training FLOPs of every objective's built model equal FlopCounterMode's exactly (mean pooling),
    once the batch-dependent similarity products of the contrastive losses are added back."""
    cfg = model_config("tiny", vocab_size=50, attn_backend="reference", objective=objective, pool="mean",
                       **SMALL["one-block"], **OBJECTIVE_KEYS)  # fmt: skip
    B = 3
    sims = LOSS_MATMULS.get(objective, 0) * B * B * cfg.embed_dim  # multiply-adds
    assert _objective_step(cfg, B, False) == B * forward_flops(cfg, attention="dense").total + 2 * sims
    assert _objective_step(cfg, B, True) == B * training_flops(cfg, attention="dense").total + 6 * sims
    if objective in ("siglip", "clip"):
        assert training_flops(cfg).text > 0 and training_flops(cfg, attention="dense").text > training_flops(cfg).text


@pytest.mark.parametrize("objective", ["siglip", "classification"])
def test_map_pooling_forward_counts_per_sample(objective: str) -> None:
    """With attention pooling the per-sample forward count is exact too: one more sample costs forward_flops (the
    learned query's projection is per batch, and so are the similarity products' B x B growth, subtracted here)."""
    cfg = model_config("tiny", vocab_size=50, attn_backend="reference", objective=objective, pool="map",
                       **SMALL["one-block"], **OBJECTIVE_KEYS)  # fmt: skip
    sims = lambda B: 2 * LOSS_MATMULS.get(objective, 0) * B * B * cfg.embed_dim
    extra = _objective_step(cfg, 3, False) - sims(3) - (_objective_step(cfg, 2, False) - sims(2))
    # FlopCounterMode does not see CPU's fused SDPA kernel, where the one pooling query attends: added by hand
    attends = [(cfg.num_patches, cfg.width)] + ([(cfg.text_len, cfg.text_width)] if objective == "siglip" else [])
    assert extra + sum(2 * 2 * T * C for T, C in attends) == forward_flops(cfg, attention="dense").total


@pytest.mark.parametrize("objective", ["aimv2", "aimv1", "siglip", "clip", "classification"])
@pytest.mark.parametrize("pool", ["map", "mean"])
def test_every_objective_param_counts_match_the_model(objective: str, pool: str) -> None:
    from aimpre.objectives import build

    cfg = model_config("tiny", vocab_size=300, objective=objective, pool=pool, num_classes=7)
    with torch.device("meta"):
        model = build(cfg)
    assert param_counts(cfg) == model.param_counts()
    named = dict(model.named_parameters())
    tables = [k for k in ("encoder.pos_embed", "decoder.text_embed.weight", "decoder.start_token", "decoder.text_pos",
                          "text_tower.embed.weight", "text_tower.pos") if k in named]  # fmt: skip
    bare = param_counts(cfg, embeddings=False)
    assert bare["total"] == model.param_counts()["total"] - sum(named[k].numel() for k in tables)
    assert param_count(cfg, "encoder") == model.param_counts()["encoder"]
