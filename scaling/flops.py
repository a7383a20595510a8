"""FLOPs of one AIMv2 training sample, counted from the config.

Convention: a multiply-add is 2 FLOPs; training = forward + backward = 3 x forward (backward costs twice the
forward). Attention counts only the (query, key) pairs the mask allows: the useful work, which the Triton and
Flex kernels also limit themselves to (dense-mask SDPA computes more). The encoder's prefix length is averaged
over its uniform distribution. Norms, activations, softmax and the loss are not counted (< 1% at L size).
"""

from __future__ import annotations

from dataclasses import dataclass

from aimpre.model.sizes import ModelConfig


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
    """Training FLOPs of one sample, by part."""

    encoder: float
    decoder: float
    heads: float

    @property
    def total(self) -> float:
        return self.encoder + self.decoder + self.heads


def _block_macs(tokens: int, width: int, mlp_hidden: int, pairs: float) -> float:
    dense = tokens * (4 * width * width + 3 * width * mlp_hidden)  # qkv + proj + SwiGLU (3 matrices)
    return dense + 2 * pairs * width  # q k^T and p v, over all heads


def training_flops(cfg: ModelConfig, vocab_size: int | None = None, prefix: bool = True) -> Flops:
    """Forward + backward FLOPs per sample.

    Args:
        cfg: the model config.
        vocab_size: overrides ``cfg.vocab_size`` (needed when that is None, i.e. taken from the tokenizer).
        prefix: count the encoder with the pretraining prefix mask (True) or full attention (False).
    """
    V = vocab_size if vocab_size is not None else cfg.vocab_size
    if V is None:
        raise ValueError("vocab_size is unresolved: pass vocab_size= or set model.vocab_size")
    N, L, d, D = cfg.num_patches, cfg.text_len, cfg.width, cfg.dec_width
    lo, hi = cfg.prefix_range
    enc_pairs = mean_prefix_pairs(N, lo, hi) if prefix else N * N
    enc = N * cfg.patch_dim * d + cfg.depth * _block_macs(N, d, cfg.mlp_hidden, enc_pairs)
    T = cfg.dec_seq_len
    dec = N * d * D + cfg.dec_depth * _block_macs(T, D, cfg.dec_mlp_hidden, causal_pairs(T))
    heads = (N - 1) * D * cfg.patch_dim + L * D * V
    return Flops(encoder=6.0 * enc, decoder=6.0 * dec, heads=6.0 * heads)


def flops_per_sample(cfg: ModelConfig, vocab_size: int | None = None) -> float:
    """Training FLOPs of one sample (forward + backward), the number MFU and the scaling laws use."""
    return training_flops(cfg, vocab_size).total
