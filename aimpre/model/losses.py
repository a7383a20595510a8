"""AIMv2 losses: normalised-pixel MSE on the next patch and cross-entropy on the next caption token.

Checked against apple/ml-l3m ``RasterPixelLoss`` (norm_pix_loss, block_size 1, prefix mask) and
``LLMCrossEntropyLoss``. The pixel target of each patch is normalised over its p*p*3 values with the unbiased
variance and eps 1e-6, as ml-l3m (and MAE) do.

The pixel loss has no fused form, on purpose: at batch 128 its tensors are [128, 255, 588] (77 MB in fp32, 38 MB
in bf16). A fused kernel would move ~0.27 GB forward and backward (read bf16 predictions and fp32 patches twice,
write the bf16 gradient), eager torch ~1.5-2 GB over ~15 kernels: at ~4.3 TB/s the most a fusion could save is
~0.4 ms of a ~234 ms AIMv2-L step (0.2%).
"""

from __future__ import annotations

import torch
from torch import Tensor

from aimpre.kernels import fused


def _at_least_f32(x: Tensor) -> Tensor:
    """Losses run in float32 under bf16/fp16 autocast; float64 stays float64 (for tests against sums by hand)."""
    return x if x.dtype == torch.float64 else x.float()


def patchify(images: Tensor, patch: int) -> Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], patches in raster order, each laid out (row, column, channel)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)  # [B, C, h, p, w, p]
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p(row), p(col), C]
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(patches: Tensor, patch: int, channels: int = 3, grid: tuple[int, int] | None = None) -> Tensor:
    """Inverse of ``patchify``: [B, N, p*p*C] -> [B, C, H, W]; ``grid`` (rows, cols) in patches, None: square."""
    B, N, _ = patches.shape
    gh, gw = grid or (round(N**0.5),) * 2
    x = patches.reshape(B, gh, gw, patch, patch, channels)  # [B, h, w, p, p, C]
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, gh * patch, gw * patch)


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-patch standardisation over the last dimension (unbiased variance, as ml-l3m)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def valid_patches(grid: Tensor, rows: int, cols: int) -> Tensor:
    """Which patches of a zero-padded rows x cols canvas hold image: [B, rows * cols] bool, raster order.

    Args:
        grid: [B, 2] ints, each image's own (rows, columns) in patches, placed at the top-left of the canvas.
        rows, cols: the canvas (the batch's grid).
    """
    r = torch.arange(rows, device=grid.device)[:, None]  # [rows, 1]
    c = torch.arange(cols, device=grid.device)[None, :]  # [1, cols]
    inside = (r[None] < grid[:, 0, None, None]) & (c[None] < grid[:, 1, None, None])  # [B, rows, cols]
    return inside.reshape(grid.shape[0], rows * cols)


def pixel_loss(pred: Tensor, patches: Tensor, prefix_len: Tensor, valid: Tensor | None = None) -> Tensor:
    """MSE of next-patch predictions against normalised targets, on non-prefix patches only.

    Args:
        pred: [B, N-1, P] predictions; ``pred[:, i]`` is the prediction of patch ``i + 1``.
        patches: [B, N, P] the patchified (un-normalised) input image.
        prefix_len: [B] prefix lengths M; patch j is a target iff j >= M.
        valid: [B, N] bool, False on zero-padded patches (native resolution): those are never targets.

    Returns:
        The mean over valid targets of the per-patch mean squared error.
    """
    target = normalize_patches(_at_least_f32(patches))[:, 1:]  # [B, N-1, P]: the target of pred[:, i] is patch i+1
    err = (_at_least_f32(pred) - target).pow(2).mean(dim=-1)  # [B, N-1]
    index = torch.arange(1, patches.shape[1], device=patches.device)  # patch index of each target
    target_ok = index[None, :] >= prefix_len[:, None]  # [B, N-1]
    if valid is not None:
        target_ok = target_ok & valid[:, 1:]
    return (err * target_ok).sum() / target_ok.sum().clamp_min(1)


def text_loss(logits: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
    """Cross-entropy of next-token logits [B, L, V] against ids [B, L], averaged over non-pad tokens."""
    return fused.masked_cross_entropy(logits, text, text_mask)


def head_text_loss(hidden: Tensor, weight: Tensor, text: Tensor, text_mask: Tensor, mode: str = "torch") -> Tensor:
    """``text_loss`` of the bias-free text head ``hidden @ weight.T``, without the logits when liger runs it.

    Args:
        hidden: decoder outputs at the text positions [B, L, D].
        weight: the text head's weight [V, D].
        text, text_mask: as ``text_loss``.
        mode: ``model.fused``; with liger (``aimpre.kernels.fused.use_liger``) the head and the cross-entropy are
            chunked over tokens, so the [B, L, V] logits and their fp32 copy never exist.
    """
    return fused.linear_cross_entropy(hidden, weight, text, text_mask, mode)
