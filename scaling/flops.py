"""Parameters and FLOPs of one AIMv2 training sample, counted from the config.

FLOPs: a multiply-add is 2 FLOPs; the backward costs twice the forward (input and weight gradients), except
the patch-embedding convolution, whose input (the image) needs no gradient: its backward is the weight gradient
alone. That is the accounting of ``torch.utils.flop_counter.FlopCounterMode``, against which
``tests/test_scaling_flops.py`` checks these counts exactly. Attention either counts only the (query, key)
pairs the mask allows (``attention="masked"``, the default: the useful work, which the Triton and Flex kernels
limit themselves to; the encoder's prefix length is averaged over its uniform distribution), or every pair
(``"dense"``: what dense-mask SDPA computes and what FlopCounterMode reports). Norms, activations, softmax and
the losses are not counted (< 1% at L size); neither are embedding look-ups.

Parameters: ``param_counts`` reproduces ``AIMv2.param_counts()`` from the config alone (no model built). The
convention is explicit: ``scope`` is the encoder (what AIMv2 keeps and reports) or everything trained, and
``embeddings=False`` drops the parameters that are looked up or added rather than multiplied: the encoder's
position embedding and the decoder's token embedding, start token and text positions. The patch-embedding
convolution and the output heads are matrix products and always count (Kaplan et al. 2020 likewise drop
only the vocabulary and position embeddings from their non-embedding N).
"""

from __future__ import annotations

from dataclasses import dataclass

from aimpre.model.sizes import ModelConfig

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
    """FLOPs of one sample, by part."""

    encoder: float
    decoder: float
    heads: float

    @property
    def total(self) -> float:
        return self.encoder + self.decoder + self.heads


def _vocab(cfg: ModelConfig, vocab_size: int | None) -> int:
    V = vocab_size if vocab_size is not None else cfg.vocab_size
    if V is None:
        raise ValueError("vocab_size is unresolved: pass vocab_size= or set model.vocab_size")
    return V


def _block_macs(tokens: int, width: int, mlp_hidden: int, pairs: float) -> float:
    dense = tokens * (4 * width * width + 3 * width * mlp_hidden)  # qkv + proj + SwiGLU (3 matrices)
    return dense + 2 * pairs * width  # q k^T and p v, over all heads


def _macs(cfg: ModelConfig, V: int, prefix: bool, attention: str) -> tuple[float, float, float, float]:
    """Forward multiply-adds: (patch embedding, rest of the encoder, decoder, heads)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    N, L, d, D = cfg.num_patches, cfg.text_len, cfg.width, cfg.dec_width
    T = cfg.dec_seq_len
    lo, hi = cfg.prefix_range
    if attention == "dense":
        enc_pairs, dec_pairs = float(N * N), float(T * T)
    else:
        enc_pairs, dec_pairs = (mean_prefix_pairs(N, lo, hi) if prefix else N * N), causal_pairs(T)
    patch = N * cfg.patch_dim * d
    enc = cfg.depth * _block_macs(N, d, cfg.mlp_hidden, enc_pairs)
    dec = N * d * D + cfg.dec_depth * _block_macs(T, D, cfg.dec_mlp_hidden, dec_pairs)
    heads = (N - 1) * D * cfg.patch_dim + L * D * V
    return patch, enc, dec, heads


def forward_flops(
    cfg: ModelConfig, vocab_size: int | None = None, prefix: bool = True, attention: str = "masked"
) -> Flops:
    """Forward FLOPs per sample.

    Args:
        cfg: the model config.
        vocab_size: overrides ``cfg.vocab_size`` (needed when that is None, i.e. taken from the tokenizer).
        prefix: count the encoder with the pretraining prefix mask (True) or full attention (False).
        attention: "masked" counts the pairs the mask allows, "dense" every (query, key) pair.
    """
    patch, enc, dec, heads = _macs(cfg, _vocab(cfg, vocab_size), prefix, attention)
    return Flops(encoder=2.0 * (patch + enc), decoder=2.0 * dec, heads=2.0 * heads)


def training_flops(
    cfg: ModelConfig, vocab_size: int | None = None, prefix: bool = True, attention: str = "masked"
) -> Flops:
    """Forward + backward FLOPs per sample (arguments as ``forward_flops``)."""
    patch, enc, dec, heads = _macs(cfg, _vocab(cfg, vocab_size), prefix, attention)
    # backward = 2 x forward (input + weight gradients); the patch conv has no input gradient to compute
    return Flops(encoder=4.0 * patch + 6.0 * enc, decoder=6.0 * dec, heads=6.0 * heads)


def flops_per_sample(cfg: ModelConfig, vocab_size: int | None = None) -> float:
    """Training FLOPs of one sample (forward + backward), the number MFU and the scaling laws use."""
    return training_flops(cfg, vocab_size).total


def param_counts(cfg: ModelConfig, vocab_size: int | None = None, embeddings: bool = True) -> dict[str, int]:
    """Parameters by part, as ``AIMv2.param_counts()``: encoder, decoder (with its input projection and text
    embeddings), heads, total.

    Args:
        cfg: the model config.
        vocab_size: overrides ``cfg.vocab_size``.
        embeddings: count the looked-up or added tables (position embeddings, token embedding, start token).
    """
    V = _vocab(cfg, vocab_size)
    d, D, N, L = cfg.width, cfg.dec_width, cfg.num_patches, cfg.text_len
    block = lambda w, h: 2 * w + 4 * w * w + 3 * w * h  # two norms, qkv + proj, SwiGLU
    encoder = cfg.patch_dim * d + d + d + cfg.depth * block(d, cfg.mlp_hidden) + d  # conv (+bias), norm, blocks, norm
    decoder = d * D + D + cfg.dec_depth * block(D, cfg.dec_mlp_hidden) + D  # img_proj (+bias), blocks, norm
    if embeddings:
        encoder += N * d  # pos_embed
        decoder += V * D + D + L * D  # text_embed, start_token, text_pos
    heads = D * cfg.patch_dim + D * V
    return {"encoder": encoder, "decoder": decoder, "heads": heads, "total": encoder + decoder + heads}


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
