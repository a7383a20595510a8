"""Encoder fusion: the tokens of two or more frozen encoders (or of several layers of one) as one token sequence.

The CLIP + DINOv2 question (Tong et al. 2024, "Eyes Wide Shut"; Cambrian-1; SPHINX): do two vision encoders
together give a VLM more than either alone? Two ways, both on one token grid:
- ``concat``: channel concatenation [B, T, C1 + C2 + ...] (SPHINX, Cambrian's simplest aggregator); no parameters;
- ``sum``: each encoder's tokens through its own linear projection to one width, then summed (project-and-sum);
  the projections train with the probe that reads the tokens.

Encoders may differ in width, patch size and input resolution, so in grid: every encoder's token map is resampled
to one target grid first (area averaging when it shrinks, bilinear when it grows), as Cambrian interpolates its
encoders' maps to a common number of tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FUSIONS = ("concat", "sum")


def token_grid(tokens: Tensor) -> int:
    """The side of the square grid of tokens [B, T, C] (raster order); a ValueError when T is not a square."""
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} tokens are not a square grid")
    return side


def resample_tokens(tokens: Tensor, grid: int) -> Tensor:
    """Tokens [B, T, C] of a square grid resampled to ``grid`` x ``grid`` [B, grid^2, C], in float32."""
    side = token_grid(tokens)
    if side == grid:
        return tokens.float()
    B, _, C = tokens.shape
    x = tokens.float().transpose(1, 2).reshape(B, C, side, side)  # [B, T, C] -> [B, C, h, w]
    x = F.adaptive_avg_pool2d(x, grid) if grid < side else F.interpolate(x, size=(grid, grid), mode="bilinear")
    return x.reshape(B, C, grid * grid).transpose(1, 2)  # -> [B, grid^2, C]


class Fuse(nn.Module):
    """Tokens of several sources on one grid -> one token sequence [B, T, out_dim].

    Args:
        widths: each source's token width, in the order ``forward`` gets them.
        mode: "concat" (out_dim = sum of widths) or "sum" (each projected to ``dim``, then added).
        dim: the width of the projected tokens in "sum" mode; None: the largest of ``widths``.
    """

    def __init__(self, widths: list[int], mode: str = "concat", dim: int | None = None) -> None:
        super().__init__()
        if mode not in FUSIONS:
            raise ValueError(f"unknown fusion {mode!r}; fusions: {', '.join(FUSIONS)}")
        if not widths:
            raise ValueError("fusion needs at least one source")
        self.mode = mode
        self.widths = list(widths)
        if mode == "sum":
            self.out_dim = dim or max(widths)
            self.proj = nn.ModuleList(nn.Linear(w, self.out_dim) for w in widths)
        else:
            self.out_dim = sum(widths)

    def forward(self, tokens: list[Tensor]) -> Tensor:
        """One tensor [B, T, out_dim] from ``tokens``, one [B, T, width_i] per source, all on the same grid."""
        if [t.shape[-1] for t in tokens] != self.widths:
            raise ValueError(f"token widths {[t.shape[-1] for t in tokens]}, expected {self.widths}")
        if len({t.shape[1] for t in tokens}) > 1:
            raise ValueError(f"sources on different grids ({[t.shape[1] for t in tokens]} tokens): resample first")
        if self.mode == "concat":
            return torch.cat([t.float() for t in tokens], dim=-1)
        return torch.stack([p(t.float()) for p, t in zip(self.proj, tokens, strict=True)]).sum(0)


def align(tokens: list[Tensor], grid: int | None = None) -> list[Tensor]:
    """Every source's tokens on one square grid: ``grid``, or (None) the first source's.

    Args:
        tokens: one [N, T_i, C_i] per source, each a square grid in raster order.
        grid: the target side in tokens.
    """
    target = token_grid(tokens[0]) if grid is None else grid
    return [resample_tokens(t, target) for t in tokens]


class FuseConcatenated(nn.Module):
    """``Fuse`` for probes that get their sources already concatenated: tokens [..., sum of widths] are split back
    into the sources and fused, so one cached tensor serves both modes ("concat" then returns it unchanged; "sum"
    trains its projections with the head after it).

    Args:
        widths: each source's width, in the order they were concatenated.
        mode: "concat" or "sum", as ``Fuse``.
    """

    def __init__(self, widths: list[int], mode: str = "concat") -> None:
        super().__init__()
        self.fuse = Fuse(widths, mode)
        self.out_dim = self.fuse.out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(list(x.split(self.fuse.widths, dim=-1)))


def fused_name(names: list[str], mode: str) -> str:
    """A fused row's name: "a + b" (concatenated) or "a (+) b" (projected and summed), as the VLM probe names it."""
    return (" + " if mode == "concat" else " (+) ").join(names)
