"""Position embeddings on a grid of patches: resampling a learned table to another grid; 2D sin-cos for any grid.

A learned ``pos_embed`` [1, N, d] belongs to one grid (16 x 16 patches at 224 px, patch 14). Starting a 336 px stage
(24 x 24) from it, or evaluating at another resolution, resamples the table as an image of d channels: bicubic with
antialiasing, in float32, exactly as timm's ``timm.layers.resample_abs_pos_embed`` (which ``timm.create_model(...,
img_size=336)`` and ``dynamic_img_size`` use on AIMv2 checkpoints), so a model resampled here equals timm's.
``tests/test_init.py`` compares the two on the same tensor.

The native-resolution AIMv2 (``model.pos_embed=sincos2d``) has no table: ``sincos_2d`` computes the embedding of
whatever grid the batch has, as apple/ml-aim ``aim-v1/aim/v1/torch/layers.py`` ``SinCosPosEmbed`` (used by
``aimv2_large_native`` in ``aim-v2/aim/v2/torch/models.py``): channels ``[sin_w | cos_w | sin_h | cos_h]``, each a
quarter of the width, frequencies ``1 / 10000 ** (i / (d/4))``, positions the integer column and row indices.
``tests/test_native.py`` checks it against that layout written out independently.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from aimpre.model.vit import AIMv2Encoder


def _hw(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def resample_pos_embed(
    pos: Tensor, new_grid: int | tuple[int, int], old_grid: int | tuple[int, int] | None = None
) -> Tensor:
    """A position embedding table resampled from one patch grid to another (bicubic, antialiased, as timm).

    Args:
        pos: [1, N, d], rows in raster order of the old grid (no class token).
        new_grid: the new grid, (rows, columns) in patches, or one int for a square grid.
        old_grid: the grid ``pos`` was learned on; None: square, sqrt(N) a side.

    Returns:
        [1, new_rows * new_columns, d] in ``pos``'s dtype; ``pos`` itself when the grids are the same.
    """
    if pos.dim() != 3 or pos.shape[0] != 1:
        raise ValueError(f"a position embedding is [1, N, d], got shape {tuple(pos.shape)}")
    N, d = pos.shape[1], pos.shape[2]
    if old_grid is None:
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"{N} positions are not a square grid: give old_grid")
        old_grid = side
    (oh, ow), (nh, nw) = _hw(old_grid), _hw(new_grid)
    if oh * ow != N:
        raise ValueError(f"old grid {oh}x{ow} has {oh * ow} positions, the table {N}")
    if min(nh, nw) < 1:
        raise ValueError(f"new grid {nh}x{nw} is empty")
    if (oh, ow) == (nh, nw):
        return pos
    x = pos.float().reshape(1, oh, ow, d).permute(0, 3, 1, 2)  # [1, N, d] -> [1, d, oh, ow], an image of d channels
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True)  # float32: interpolate's own precision
    return x.permute(0, 2, 3, 1).reshape(1, nh * nw, d).to(pos.dtype)  # [1, d, nh, nw] -> [1, nh*nw, d]


def sincos_2d(rows: int, cols: int, dim: int, device: torch.device | str | None = None) -> Tensor:
    """The fixed 2D sin-cos position embedding of a rows x cols patch grid (ml-aim's layout, see the module).

    Args:
        rows, cols: the grid in patches.
        dim: the embedding width, a multiple of 4.
        device: where to build it.

    Returns:
        float32 [1, rows * cols, dim], rows in raster order: ``[sin(x w) | cos(x w) | sin(y w) | cos(y w)]`` with
        x the column and y the row of each patch.
    """
    if dim % 4:
        raise ValueError(f"a 2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)  # [d/4]
    y, x = torch.meshgrid(
        torch.arange(rows, dtype=torch.float32, device=device),
        torch.arange(cols, dtype=torch.float32, device=device),
        indexing="ij",
    )  # each [rows, cols]: row and column index of every patch
    xw = x.reshape(-1, 1) * omega  # [T, d/4]
    yw = y.reshape(-1, 1) * omega
    return torch.cat([xw.sin(), xw.cos(), yw.sin(), yw.cos()], dim=1)[None]  # [1, T, d]


def at_resolution(encoder: AIMv2Encoder, img_size: int) -> AIMv2Encoder:
    """A copy of an ``AIMv2Encoder`` that takes ``img_size`` px images: its position table resampled to the new
    grid, every other weight shared in value (the original is left as it was). A sin-cos encoder has no table:
    only its config changes.

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
    table = getattr(encoder, "pos_embed", None)
    if isinstance(table, nn.Parameter):
        pos = resample_pos_embed(table.detach(), img_size // cfg.patch_size, cfg.grid)
        out.pos_embed = nn.Parameter(pos, requires_grad=table.requires_grad)
    return out
