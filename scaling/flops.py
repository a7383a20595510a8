"""Parameters and FLOPs of one training sample of any objective (``model.objective``), counted from the config.

FLOPs: a multiply-add is 2 FLOPs; the backward costs twice the forward (input and weight gradients), except
the patch-embedding convolution, whose input (the image) needs no gradient: its backward is the weight gradient
alone. That is the accounting of ``torch.utils.flop_counter.FlopCounterMode``, against which
``tests/test_scaling_flops.py`` checks these counts exactly. Attention either counts only the (query, key)
pairs the mask allows (``attention="masked"``, the default: the useful work, which the Triton and Flex kernels
limit themselves to; the encoder's prefix length is averaged over its uniform distribution), or every pair
(``"dense"``: what dense-mask SDPA computes and what FlopCounterMode reports). Norms, activations, softmax and
the losses (the contrastive B x B similarities included: they depend on the batch) are not counted (< 1% at L
size); neither are embedding look-ups. The MAP pooling's one-query attention (fused SDPA, which FlopCounterMode
misses on CPU) is counted as 2 x tokens x width multiply-adds, its backward at 2 x as everything else.

MoE encoder blocks (``model.moe_experts``) count the router and the top-k experts each token is routed to: the
FLOPs of the tokens actually routed, so MFU and the compute axis of the scaling laws are active FLOPs.

Distillation (``distill``, ``aimv2_distill``) counts the frozen teacher's forward (full attention, at its own
resolution, no backward: it has no gradients) as its own part, ``teacher``, so a distilled student pays for its
teacher at equal compute; the projection to the teacher's width is a head. The teacher's parameters are not
counted: nothing of it is trained or kept.

Parameters: ``param_counts`` reproduces the built model's ``param_counts()`` from the config alone (no model
built). The convention is explicit: ``scope`` is the encoder (what every objective keeps and reports) or
everything trained, and ``embeddings=False`` drops the parameters that are looked up or added rather than
multiplied: the encoder's position embedding, the decoder's token embedding, start token and text positions, and
the text tower's token and position embeddings. The patch-embedding convolution and the output heads are matrix
products and always count (Kaplan et al. 2020 likewise drop only the vocabulary and position embeddings from
their non-embedding N).
"""

from __future__ import annotations

from dataclasses import dataclass

from aimpre.model.moe import moe_blocks
from aimpre.model.sizes import ModelConfig
from aimpre.objectives import uses_prefix
from aimpre.objectives.aimv1 import MLP_RATIO

ATTENTION = ("masked", "dense")
SCOPES = ("encoder", "total")


def causal_pairs(T: int) -> int:
    """Allowed (query, key) pairs of a causal mask over T positions."""
    return T * (T + 1) // 2


def prefix_pairs(T: int, M: int) -> int:
    """Pairs under a prefix mask: the first M queries see the M prefix keys, query i >= M sees i + 1 keys."""
    return M * M + causal_pairs(T) - causal_pairs(M)


def mean_prefix_pairs(T: int, lo: int, hi: int) -> float:
    """Expected pairs for a prefix length drawn uniformly from lo..hi."""
    return sum(prefix_pairs(T, m) for m in range(lo, hi + 1)) / (hi - lo + 1)


@dataclass(frozen=True)
class Flops:
    """FLOPs of one sample, by part: ``heads`` are the objective's heads (aimv2's pixel and text heads, aimv1's
    pixel MLP, the contrastive image head, the classifier), ``text`` the contrastive objectives' text tower."""

    encoder: float
    decoder: float
    heads: float
    text: float = 0.0
    teacher: float = 0.0  # distillation: the frozen teacher's forward, in forward and training FLOPs alike

    @property
    def total(self) -> float:
        return self.encoder + self.decoder + self.heads + self.text + self.teacher


def _vocab(cfg: ModelConfig, vocab_size: int | None) -> int:
    V = vocab_size if vocab_size is not None else cfg.vocab_size
    if V is None:
        raise ValueError("vocab_size is unresolved: pass vocab_size= or set model.vocab_size")
    return V


def _reads_text(cfg: ModelConfig) -> bool:
    return cfg.objective in ("aimv2", "siglip", "clip", "aimv2_distill")


def _block_macs(tokens: int, width: int, mlp_hidden: int, pairs: float) -> float:
    dense = tokens * (4 * width * width + 3 * width * mlp_hidden)  # qkv + proj + SwiGLU (3 matrices)
    return dense + 2 * pairs * width  # q k^T and p v, over all heads


def _moe_count(cfg: ModelConfig) -> int:
    """How many encoder blocks are MoE (``model.moe_experts`` > 0; ``model.moe_blocks`` null: all)."""
    if not cfg.moe_experts:
        return 0
    return len(moe_blocks(cfg.depth, cfg.moe_blocks))


def _moe_hidden(cfg: ModelConfig) -> int:
    return cfg.mlp_hidden if cfg.moe_hidden is None else cfg.moe_hidden


def _encoder_blocks_macs(cfg: ModelConfig, pairs: float, tokens: int | None = None) -> float:
    """The encoder blocks' forward multiply-adds (over ``tokens`` patches; None: ``cfg.num_patches``). A MoE block:
    the router (width x experts) and the top-k experts each token is routed to (dropless: exactly k SwiGLUs per
    token), not every expert."""
    N, d = tokens or cfg.num_patches, cfg.width
    sparse = _moe_count(cfg)
    dense = (cfg.depth - sparse) * _block_macs(N, d, cfg.mlp_hidden, pairs)
    moe = N * (4 * d * d + d * cfg.moe_experts + 3 * d * _moe_hidden(cfg) * cfg.moe_top_k) + 2 * pairs * d
    return dense + sparse * moe


def _pool_macs(cfg: ModelConfig, tokens: int, width: int, mlp_hidden: int) -> int:
    """``towers.Pool`` per sample: MAP's key/value projections, its one query's attention over every token (a
    text mask is data, so all are counted), output projection and MLP on one token; the mean pools for free. The
    learned query's own projection is done once per batch, not per sample, and is left out."""
    if cfg.pool == "mean":
        return 0
    return tokens * 2 * width * width + 2 * tokens * width + width * width + 3 * width * mlp_hidden


def _teacher_macs(cfg: ModelConfig) -> tuple[float, int]:
    """The distillation teacher's forward multiply-adds per sample (full attention, its own resolution) and its
    width; (0, 0) for the other objectives."""
    if cfg.objective not in ("distill", "aimv2_distill"):
        return 0.0, 0
    from aimpre.objectives.distill import teacher_config  # here: it reads the teacher's config from its file

    t = teacher_config(cfg)
    N = t.num_patches
    return N * t.patch_dim * t.width + _encoder_blocks_macs(t, float(N * N)), t.width


def _macs(
    cfg: ModelConfig, V: int, prefix: bool, attention: str, tokens: int | None = None
) -> tuple[float, float, float, float, float, float]:
    """Forward multiply-adds: (patch embedding, rest of the encoder, decoder, heads, text tower, teacher).

    ``tokens``: the image's patches when they are not ``cfg.num_patches`` (a native batch's canvas, zero padding
    included: the model processes it); the prefix is then drawn from min(prefix_min, N - 1)..N - 1, as training does.
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    N, L, d, D = tokens or cfg.num_patches, cfg.text_len, cfg.width, cfg.dec_width
    T = cfg.dec_seq_len - cfg.num_patches + N
    lo, hi = cfg.prefix_range
    if tokens is not None:
        lo, hi = min(lo, N - 1), N - 1
    if attention == "dense":
        enc_pairs, dec_pairs, text_pairs = float(N * N), float(T * T), float(L * L)
    else:
        enc_pairs = mean_prefix_pairs(N, lo, hi) if prefix else N * N
        dec_pairs, text_pairs = causal_pairs(T), causal_pairs(L)
    patch = N * cfg.patch_dim * d
    enc = _encoder_blocks_macs(cfg, enc_pairs, N)
    dec, text = 0.0, 0.0
    teacher, teacher_width = _teacher_macs(cfg)
    if cfg.objective in ("aimv2", "aimv2_distill"):
        dec = N * d * D + cfg.dec_depth * _block_macs(T, D, cfg.dec_mlp_hidden, dec_pairs)
        heads = (N - 1) * D * cfg.patch_dim + L * D * V + N * d * teacher_width  # (aimv2_distill: the projection)
    elif cfg.objective == "distill":  # the projection of every student token to the teacher's width
        heads = N * d * teacher_width
    elif cfg.objective == "aimv1":  # the per-patch MLP on the N - 1 tokens that predict a patch
        h = cfg.head_width
        heads = (N - 1) * (d * h + cfg.head_depth * 2 * h * MLP_RATIO * h + h * cfg.patch_dim)
    elif cfg.objective == "classification":
        heads = _pool_macs(cfg, N, d, cfg.mlp_hidden) + d * (cfg.num_classes or 0)
    else:  # siglip, clip: the image head, the text tower; the B x B similarities depend on the batch: not counted
        w = cfg.text_width
        heads = _pool_macs(cfg, N, d, cfg.mlp_hidden) + d * cfg.embed_dim
        text = cfg.text_depth * _block_macs(L, w, cfg.text_mlp_hidden, text_pairs)
        text += _pool_macs(cfg, L, w, cfg.text_mlp_hidden) + w * cfg.embed_dim
    return patch, enc, dec, heads, text, teacher


def _args(cfg: ModelConfig, vocab_size: int | None, prefix: bool | None) -> tuple[int, bool]:
    V = _vocab(cfg, vocab_size) if _reads_text(cfg) else 0
    return V, uses_prefix(cfg.objective) if prefix is None else prefix


def forward_flops(
    cfg: ModelConfig, vocab_size: int | None = None, prefix: bool | None = None, attention: str = "masked"
) -> Flops:
    """Forward FLOPs per sample of ``cfg.objective``'s model.

    Args:
        cfg: the model config.
        vocab_size: overrides ``cfg.vocab_size`` (needed when that is None, i.e. taken from the tokenizer, for the
            objectives reading text).
        prefix: count the encoder with the pretraining prefix mask (True) or full attention (False); None: as the
            objective trains (``aimpre.objectives.uses_prefix``).
        attention: "masked" counts the pairs the mask allows, "dense" every (query, key) pair.
    """
    patch, enc, dec, heads, text, teacher = _macs(cfg, *_args(cfg, vocab_size, prefix), attention)
    return Flops(
        encoder=2.0 * (patch + enc), decoder=2.0 * dec, heads=2.0 * heads, text=2.0 * text, teacher=2.0 * teacher
    )


def training_flops(
    cfg: ModelConfig,
    vocab_size: int | None = None,
    prefix: bool | None = None,
    attention: str = "masked",
    tokens: int | None = None,
) -> Flops:
    """Forward + backward FLOPs per sample (arguments as ``forward_flops``; ``tokens``: the image's patches, e.g.
    a native batch's rows x cols, when not ``cfg.num_patches``)."""
    patch, enc, dec, heads, text, teacher = _macs(cfg, *_args(cfg, vocab_size, prefix), attention, tokens)
    # backward = 2 x forward (input + weight gradients); the patch conv has no input gradient to compute; the frozen
    # teacher runs forward only
    return Flops(
        encoder=4.0 * patch + 6.0 * enc, decoder=6.0 * dec, heads=6.0 * heads, text=6.0 * text, teacher=2.0 * teacher
    )


def flops_per_sample(cfg: ModelConfig, vocab_size: int | None = None, tokens: int | None = None) -> float:
    """Training FLOPs of one sample (forward + backward), the number MFU and the scaling laws use.

    Args:
        cfg: the model config.
        vocab_size: as ``forward_flops``.
        tokens: the image's patches when not ``cfg.num_patches`` (native resolution: each batch's canvas).
    """
    return training_flops(cfg, vocab_size, tokens=tokens).total


def _pool_params(cfg: ModelConfig, width: int, mlp_hidden: int) -> int:
    if cfg.pool == "mean":
        return 0
    return width + 4 * width * width + width + 3 * width * mlp_hidden  # query, q + kv + proj, norm, MLP


def param_counts(
    cfg: ModelConfig, vocab_size: int | None = None, embeddings: bool = True, active: bool = False
) -> dict[str, int]:
    """Parameters by part, as the built model's ``param_counts()`` (``aimpre.objectives.build``): encoder, then
    aimv2: decoder (with its input projection and text embeddings), heads; aimv1 and classification: heads;
    siglip and clip: heads (image head and the loss's temperature and bias), text (the text tower); and total.

    Args:
        cfg: the model config.
        vocab_size: overrides ``cfg.vocab_size``.
        embeddings: count the looked-up or added tables (position embeddings, token embeddings, start token).
        active: count, in MoE blocks, only the top-k experts one token uses (and the router): the "active"
            parameters of Abnar et al. / Shukor et al. 2025; False: every expert (what is stored and trained).
    """
    V = _vocab(cfg, vocab_size) if _reads_text(cfg) else 0
    d, D, N, L = cfg.width, cfg.dec_width, cfg.num_patches, cfg.text_len
    block = lambda w, h: 2 * w + 4 * w * w + 3 * w * h  # two norms, qkv + proj, SwiGLU
    sparse = _moe_count(cfg)
    experts = cfg.moe_top_k if active else cfg.moe_experts
    moe = 2 * d + 4 * d * d + d * cfg.moe_experts + experts * 3 * d * _moe_hidden(cfg)  # router + experts
    blocks = (cfg.depth - sparse) * block(d, cfg.mlp_hidden) + sparse * moe
    encoder = cfg.patch_dim * d + d + d + blocks + d  # conv (+bias), norm, blocks, norm
    if embeddings:
        encoder += N * d if cfg.pos_embed == "learned" else 0  # pos_embed (sincos2d: computed, no table)
    parts = {"encoder": encoder}
    teacher_width = _teacher_macs(cfg)[1]  # distillation: the projection to the teacher's width is a head
    if cfg.objective in ("aimv2", "aimv2_distill"):
        decoder = d * D + D + cfg.dec_depth * block(D, cfg.dec_mlp_hidden) + D  # img_proj (+bias), blocks, norm
        if embeddings:
            decoder += V * D + D + L * D  # text_embed, start_token, text_pos
        parts.update(decoder=decoder, heads=D * cfg.patch_dim + D * V + d * teacher_width)
    elif cfg.objective == "distill":
        parts["heads"] = d * teacher_width
    elif cfg.objective == "aimv1":
        h, P = cfg.head_width, cfg.patch_dim
        mlp = 2 * h + 2 * MLP_RATIO * h * h  # LayerNorm (weight, bias), fc1, fc2
        parts["heads"] = d * h + h + cfg.head_depth * mlp + 2 * h + h * P + P  # proj, blocks, norm, pred
    elif cfg.objective == "classification":
        K = cfg.num_classes or 0
        parts["heads"] = _pool_params(cfg, d, cfg.mlp_hidden) + d * K + K
    else:
        w = cfg.text_width
        loss = 2 if cfg.objective == "siglip" else 1  # SigLIP: temperature and bias; CLIP: temperature
        parts["heads"] = _pool_params(cfg, d, cfg.mlp_hidden) + d * cfg.embed_dim + loss
        text = cfg.text_depth * block(w, cfg.text_mlp_hidden) + w + _pool_params(cfg, w, cfg.text_mlp_hidden)
        parts["text"] = text + w * cfg.embed_dim + ((V + L) * w if embeddings else 0)  # proj, token and positions
    return {**parts, "total": sum(parts.values())}


def param_count(
    cfg: ModelConfig, scope: str = "encoder", embeddings: bool = True, vocab_size: int | None = None
) -> int:
    """One parameter count under an explicit convention.

    Args:
        cfg: the model config.
        scope: "encoder" (the network AIMv2 keeps and reports) or "total" (everything trained).
        embeddings: include the embedding tables (see the module docstring).
        vocab_size: overrides ``cfg.vocab_size``.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return param_counts(cfg, vocab_size, embeddings)[scope]
