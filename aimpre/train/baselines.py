"""Trivial predictors the trained model must beat: the mean patch per position and a bigram caption model.

Both are fitted on training batches and scored on validation batches with the same prefixes and masks as the
model's validation, so their numbers compare directly with ``val_loss_image`` and ``val_loss_text``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from aimpre.model import normalize_patches, patchify


def _targets(module: Any, batch: dict[str, Any]) -> torch.Tensor:
    images = module.normalize(batch["image"].to(module.device))
    return normalize_patches(patchify(images, module.cfg.model.patch_size).float())  # [B, N, P]


def _bigram_inputs(text: torch.Tensor, start: int) -> torch.Tensor:
    """The token before each target: a start symbol, then the caption shifted right."""
    return torch.cat([torch.full_like(text[:, :1], start), text[:, :-1]], dim=1)


@torch.no_grad()
def baselines(
    module: Any, train: Iterable[dict[str, Any]], val: Iterable[dict[str, Any]], val_prefix: Any
) -> dict[str, float]:
    """Args:
        module: the AIMv2Module (for normalisation, patch size and vocabulary size).
        train: batches to fit on.
        val: batches to score on.
        val_prefix: ``val_prefix(batch_idx, batch_size) -> [B]`` prefix lengths, as validation draws them.

    Returns:
        ``loss_image_mean_patch``, and ``loss_text_bigram`` when the batches carry captions (an image-only
        objective's batches have none, and it has no text loss to compare).
    """
    V = module.model.cfg.vocab_size
    counts = torch.full((V + 1, V), 0.1, dtype=torch.float64)  # add-0.1 smoothing; row V is the start symbol
    patch_sum, n = None, 0
    for batch in train:
        t = _targets(module, batch).double().cpu()
        patch_sum = t.sum(0) if patch_sum is None else patch_sum + t.sum(0)
        n += t.shape[0]
        if "text" in batch:
            text, mask = batch["text"], batch["text_mask"]
            prev = _bigram_inputs(text, V)
            ones = torch.ones(int(mask.sum()), dtype=torch.float64)
            counts.index_put_((prev[mask], text[mask]), ones, accumulate=True)
    assert patch_sum is not None, "no training batches"
    mean_patch = patch_sum / n  # [N, P]
    log_p = (counts / counts.sum(1, keepdim=True)).log()
    se = ce = n_img = n_txt = 0.0
    for i, batch in enumerate(val):
        t = _targets(module, batch).double().cpu()[:, 1:]  # targets of positions 0..N-2
        prefix = val_prefix(i, t.shape[0]).cpu()
        valid = torch.arange(1, t.shape[1] + 1)[None, :] >= prefix[:, None]
        err = (mean_patch[None, 1:] - t).pow(2).mean(-1)
        se += float((err * valid).sum())
        n_img += float(valid.sum())
        if "text" in batch:
            text, mask = batch["text"], batch["text_mask"]
            ce -= float(log_p[_bigram_inputs(text, V)[mask], text[mask]].sum())
            n_txt += float(mask.sum())
    out = {"loss_image_mean_patch": se / max(n_img, 1)}
    return out | ({"loss_text_bigram": ce / n_txt} if n_txt else {})
