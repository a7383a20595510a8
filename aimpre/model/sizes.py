"""Model configuration and the registry of named sizes.

The AIMv2 sizes follow Fini et al. 2024 (Table 1) and the released encoders (timm
``aimv2_{large,huge,1b,3b}_patch14_224``): 24 pre-norm blocks of head dim 128, SwiGLU hidden widths
2816/4096/5632/8192. Encoder parameter counts come out at 309.2M, 680.9M, 1235.0M and 2720.7M
(``tests/test_model.py`` checks them on the meta device). Every size shares one decoder: 12 causal blocks,
1024 wide, 8 heads, as in apple/ml-l3m ``configs/aimv2/001_aimv2_hfdata.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """The whole pretraining model: encoder, decoder, heads and loss weights.

    Defaults are AIMv2-L at 224 px; a named size (``SIZES``) overrides some of them.
    """

    size: str = "large"  # a named size (SIZES: tiny, large, huge, 1b, 3b); the other model.* keys override it
    img_size: int = 224  # input resolution in pixels (square)
    patch_size: int = 14  # patch side in pixels; img_size must be a multiple
    width: int = 1024  # encoder width (embedding dimension)
    depth: int = 24  # encoder blocks
    heads: int = 8  # encoder attention heads (width / heads = head dim)
    mlp_hidden: int = 2816  # encoder SwiGLU hidden width
    dec_width: int = 1024  # decoder width (one decoder for all encoder sizes)
    dec_depth: int = 12  # decoder blocks
    dec_heads: int = 8  # decoder attention heads
    dec_mlp_hidden: int = 2816  # decoder SwiGLU hidden width
    vocab_size: int | None = 32000  # text vocabulary; null: the tokenizer's, resolved by the training set-up
    text_len: int = 77  # caption tokens per sample (padded or cut)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    w_text: float = 1.0  # loss = w_text * CE(text) + w_image * MSE(pixels); AIMv2: 1.0
    w_image: float = 0.4  # weight of the pixel loss; AIMv2: 0.4
    prefix_min: int = 1  # prefix length M ~ U{prefix_min..prefix_max} patches (bidirectional attention inside)
    prefix_max: int | None = None  # null: num_patches - 1
    # position embedding: learned (a [1, N, width] table for the img_size grid, AIMv2) | sincos2d (fixed 2D sin-cos
    # computed for each batch's grid, as ml-aim's aimv2_large_native; what data.native needs)
    pos_embed: str = "learned"
    attn_backend: str = "auto"  # attention kernel: auto | triton | flex | sdpa | xformers | reference
    # fused memory-bound ops: torch | liger (liger-kernel's RMSNorm, residual-add + RMSNorm, SwiGLU and chunked text
    # head + cross-entropy, on GPUs) | auto (liger's cross-entropy on CUDA when installed, torch otherwise)
    fused: str = "auto"
    # the pretraining objective (aimpre.objectives): aimv2 | aimv1 | siglip | clip | classification | distill |
    # aimv2_distill
    objective: str = "aimv2"
    pool: str = "map"  # image and text embeddings (contrastive, classification): map (attention pooling) | mean
    embed_dim: int = 768  # contrastive: the shared image-text embedding width
    text_width: int = 768  # contrastive: text tower width (a causal transformer, as CLIP's)
    text_depth: int = 12  # contrastive: text tower blocks
    text_heads: int = 12  # contrastive: text tower attention heads
    text_mlp_hidden: int = 2048  # contrastive: text tower SwiGLU hidden width
    head_depth: int = 12  # aimv1: residual MLP blocks of the per-patch pixel head (AIM v1: 12)
    head_width: int = 2048  # aimv1: width of the pixel head's MLP blocks
    num_classes: int | None = None  # classification: labels 0..num_classes-1 (the sample's "cls")
    # Distillation (aimpre.objectives.distill; objective distill or aimv2_distill): the frozen teacher encoder, any
    # source aimpre.export.load_encoder reads (a run, checkpoint, export, released timm/HF AIMv2)
    distill_teacher: str | None = None
    distill_loss: str = "cosine"  # student-teacher patch feature loss: cosine | smooth_l1 (on normalised features)
    distill_weight: float = 1.0  # weight of the distillation loss (aimv2_distill: added to the AIMv2 loss)
    # Mixture-of-experts encoder feed-forwards (aimpre.model.moe; AIMv2-MoE is apple/ml-l3m
    # configs/aimv2/002_aimv2_moe_hfdata.yaml, whose lines are quoted): 0 = dense SwiGLU (AIMv2); that config
    # has `num_experts: 4`
    moe_experts: int = 0
    moe_top_k: int = 1  # experts per token (`top_k: 1`)
    moe_balance_weight: float = 0.01  # weight of the load-balancing loss (`load_balancing_loss_weight: 0.01`)
    # the encoder blocks that are MoE, negatives from the end; null: all (`ffn_target: ...MoE` in every block)
    moe_blocks: list[int] | None = None
    # each expert's SwiGLU hidden width; null: mlp_hidden (ml-l3m: `mlp_ratio: 4`, 2/3 of it rounded up to
    # `multiple_of: 256`, which is what mlp_hidden is for every named size)
    moe_hidden: int | None = None

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def patch_dim(self) -> int:
        """Values in one patch target, laid out (row, column, channel)."""
        return self.patch_size * self.patch_size * 3

    @property
    def dec_seq_len(self) -> int:
        """Decoder length: all image tokens, then the start token and text_len - 1 caption tokens."""
        return self.num_patches + self.text_len

    @property
    def prefix_range(self) -> tuple[int, int]:
        hi = self.num_patches - 1 if self.prefix_max is None else self.prefix_max
        return self.prefix_min, hi


# A size is a set of overrides of ModelConfig's defaults.
SIZES: dict[str, dict[str, Any]] = {
    # CPU demo and tests: 112 px, 64 patches, a 6-block encoder and 4-block decoder; vocab from the tokenizer.
    "tiny": dict(
        img_size=112, width=192, depth=6, heads=3, mlp_hidden=512,
        dec_width=192, dec_depth=4, dec_heads=3, dec_mlp_hidden=512,
        vocab_size=None, text_len=96,
        embed_dim=128, text_width=128, text_depth=2, text_heads=2, text_mlp_hidden=384, head_depth=2, head_width=256,
    ),
    "large": dict(width=1024, heads=8, mlp_hidden=2816),
    "huge": dict(width=1536, heads=12, mlp_hidden=4096),
    "1b": dict(width=2048, heads=16, mlp_hidden=5632),
    "3b": dict(width=3072, heads=24, mlp_hidden=8192),
}  # fmt: skip

# what model.objective may name; each is a module of aimpre.objectives
OBJECTIVES = ("aimv2", "aimv1", "siglip", "clip", "classification", "distill", "aimv2_distill")

MODEL_KEYS = frozenset(f.name for f in fields(ModelConfig))


def model_config(size: str = "tiny", **overrides: Any) -> ModelConfig:
    """Builds the config of a named size, with field overrides.

    Args:
        size: a key of ``SIZES``.
        **overrides: ModelConfig fields to change.
    """
    if size not in SIZES:
        raise KeyError(f"unknown model size {size!r}; known sizes: {', '.join(SIZES)}")
    return replace(ModelConfig(), size=size, **{**SIZES[size], **overrides})
