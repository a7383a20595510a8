"""Position embeddings at another grid: a learned table resampled as timm's ``resample_abs_pos_embed``.

Checked against timm (``timm/layers/pos_embed.py``, ``resample_abs_pos_embed``, no prefix tokens): the table is
read as an image [1, D, h, w] and resized bicubically with antialiasing, in float32, then cast back. ViT
fine-tuning at a higher resolution (Dosovitskiy et al. 2021, sec. 3.2) and AIMv2's 336/448 px stages start so.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from aimpre.model.vit import AIMv2Encoder


def _pair(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def resample_pos_embed(
    pos: Tensor, new_grid: int | tuple[int, int], old_grid: int | tuple[int, int] | None = None
) -> Tensor:
    """The table ``pos`` [1, N, D] of an ``old_grid`` of patches resampled to ``new_grid`` [1, h*w, D].

    Args:
        pos: [1, N, D], patches in raster order (row by row), no class token.
        new_grid: (rows, columns) in patches, or one int for a square grid.
        old_grid: the grid ``pos`` was made for; None: the square grid of N.
    """
    if pos.dim() != 3 or pos.shape[0] != 1:
        raise ValueError(f"position table of shape {tuple(pos.shape)}: expected [1, N, D]")
    n, dim = pos.shape[1], pos.shape[2]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} positions are not a square grid: give old_grid")
        old_grid = side
    (oh, ow), (nh, nw) = _pair(old_grid), _pair(new_grid)
    if oh * ow != n:
        raise ValueError(f"old grid {oh}x{ow} has {oh * ow} positions, the table {n}")
    if min(nh, nw) < 1:
        raise ValueError(f"new grid {nh}x{nw} is empty")
    if (oh, ow) == (nh, nw):
        return pos
    x = pos.float().reshape(1, oh, ow, dim).permute(0, 3, 1, 2)  # [1, N, D] -> [1, D, h, w]
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True)
    return x.permute(0, 2, 3, 1).reshape(1, nh * nw, dim).to(pos.dtype)  # -> [1, h'w', D]


def at_resolution(encoder: AIMv2Encoder, img_size: int) -> AIMv2Encoder:
    """A copy of an ``AIMv2Encoder`` that takes ``img_size`` px images: its position table resampled to the new
    grid, every other weight shared in value (the original is left as it was).

    Args:
        encoder: the encoder to run at another size.
        img_size: the new input side in pixels, a multiple of the patch size.
    """
    cfg = encoder.cfg
    if img_size % cfg.patch_size or img_size < cfg.patch_size:
        raise ValueError(f"image size {img_size} is not a positive multiple of the patch size {cfg.patch_size}")
    if img_size == cfg.img_size:
        return encoder
    out = copy.deepcopy(encoder)
    out.cfg = dataclasses.replace(cfg, img_size=img_size)
    pos = resample_pos_embed(encoder.pos_embed.detach(), img_size // cfg.patch_size, cfg.grid)
    out.pos_embed = nn.Parameter(pos, requires_grad=encoder.pos_embed.requires_grad)
    return out
