"""Native-resolution batches (AIMv2's native model, Fini et al. 2024 sec. 3): the area of each step and the
canvas each image is fitted to.

Each step draws an area of A = 2^n patches, n from a standard normal truncated to [-1, 1] mapped linearly onto
``[lo, hi]`` (the paper: 7..12, 128..4096 patches at patch 14) and rounded. The batch's canvas is
2^floor(n/2) x 2^ceil(n/2) patches or its transpose (a coin per step), so every canvas holds exactly A patches
and ``tokens_per_batch / A`` images keep the tokens per step constant. Each image is resized, aspect kept, to the
largest size that fits the canvas (bicubic, antialiased, as the square path) and zero-padded at the bottom and
right; its own (rows, columns) in patches travel with the batch as ``grid`` so the pixel loss skips the padding.

Everything is a function of (seed, worker, index of the worker's batch), so a reader restarted from a batch's
state draws exactly the areas it would have drawn next.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class Area(NamedTuple):
    """One step's draw: the exponent n, and the canvas in patches (rows x cols = 2^n)."""

    n: int
    rows: int
    cols: int

    @property
    def patches(self) -> int:
        return self.rows * self.cols


def draw_area(seed: int, worker: int, index: int, lo: int, hi: int) -> Area:
    """The area and canvas of a worker's ``index``-th batch.

    Args:
        seed: the run's data seed.
        worker: the DataLoader worker (the same on every rank, so ranks draw the same areas at the same step).
        index: how many batches this worker made before this one.
        lo, hi: the range of n (``data.native_log2_area``).
    """
    rng = np.random.default_rng([seed, 0x6E61, worker, index])
    z = rng.standard_normal()
    while abs(z) > 1:  # truncated to [-1, 1] by rejection: the normal's shape inside is kept
        z = rng.standard_normal()
    n = round(lo + (float(z) + 1) / 2 * (hi - lo))
    rows, cols = 1 << (n // 2), 1 << (n - n // 2)
    if rng.random() < 0.5:
        rows, cols = cols, rows
    return Area(n, rows, cols)


class Native(NamedTuple):
    """A stream's native-resolution settings (``data.native_log2_area``, ``data.tokens_per_batch``, the patch)."""

    lo: int
    hi: int
    tokens_per_batch: int
    patch: int

    def largest_batch(self, world: int) -> int:
        """Images per rank at the smallest area: the most one batch ever needs."""
        return batch_size_for(Area(self.lo, 1, 1 << self.lo), self.tokens_per_batch, world)


def native_span(total: int, native: Native, world: int, readers: int) -> int:
    """Samples of each reader's range per epoch: all of them, evenly split (the remainder < readers is dropped).

    Raises:
        ValueError: a range cannot hold the largest batch (smallest area) once.
    """
    span, most = total // readers, native.largest_batch(world)
    if span < most:
        raise ValueError(
            f"{total} samples cannot fill one batch of {most} images (area 2^{native.lo} patches at "
            f"data.tokens_per_batch {native.tokens_per_batch}) for each of {readers} readers (ranks x "
            "data.num_workers): raise data.native_log2_area's low end, lower data.tokens_per_batch or "
            "data.num_workers, or add data"
        )
    return span


def batch_size_for(area: Area, tokens_per_batch: int, world: int) -> int:
    """Images per rank at this area: ``tokens_per_batch`` image tokens per step over ``world`` ranks."""
    b = tokens_per_batch // (area.patches * world)
    if b < 1 or b * area.patches * world != tokens_per_batch:
        raise ValueError(
            f"data.tokens_per_batch {tokens_per_batch} is not a multiple of {area.patches} patches x {world} ranks"
        )
    return b


def fit_size(h: int, w: int, H: int, W: int) -> tuple[int, int]:
    """The largest (height, width) with the aspect of ``h`` x ``w`` that fits ``H`` x ``W`` pixels (at least 1)."""
    scale = min(H / h, W / w)
    return max(1, min(H, round(h * scale))), max(1, min(W, round(w * scale)))


def pad_to_canvas(images: list[Tensor], rows: int, cols: int, patch: int, out: Tensor | None = None) -> Tensor:
    """uint8 [B, 3, rows*patch, cols*patch]: each image at the top left, zeros elsewhere.

    Args:
        images: uint8 [3, h, w] each, no larger than the canvas.
        rows, cols: the canvas in patches.
        patch: patch side in pixels.
        out: a buffer of that shape to write into (a shared-memory one), or None for a new tensor.
    """
    shape = (len(images), 3, rows * patch, cols * patch)
    canvas = torch.zeros(shape, dtype=torch.uint8) if out is None else out.zero_()
    for i, im in enumerate(images):
        canvas[i, :, : im.shape[-2], : im.shape[-1]] = im
    return canvas


def grid_of(image: Tensor, patch: int) -> tuple[int, int]:
    """An image's own (rows, cols) in patches, rounded up: a patch the image only partly covers is image."""
    return math.ceil(image.shape[-2] / patch), math.ceil(image.shape[-1] / patch)


def fit_to_canvas(image: Tensor, area: Area, patch: int) -> tuple[Tensor, tuple[int, int]]:
    """An image resized, aspect kept, to fit the canvas, zero-padded to it.

    Args:
        image: uint8 [3, h, w].
        area: the batch's canvas.
        patch: patch side in pixels.

    Returns:
        uint8 [3, rows * patch, cols * patch] and the image's own (rows, cols) in patches (rounded up: a patch
        the image only partly covers is image, not padding).
    """
    nh, nw = fit_size(image.shape[-2], image.shape[-1], area.rows * patch, area.cols * patch)
    x = F.interpolate(image[None], size=(nh, nw), mode="bicubic", antialias=True)[0]  # uint8 in, uint8 out
    return pad_to_canvas([x], area.rows, area.cols, patch)[0], grid_of(x, patch)


def native_batch(images: list[Tensor], area: Area, patch: int) -> dict[str, Tensor]:
    """``image`` uint8 [B, 3, rows*p, cols*p] and ``grid`` int64 [B, 2] of a batch at one area."""
    fitted = [fit_to_canvas(im, area, patch) for im in images]
    return {
        "image": torch.stack([f[0] for f in fitted]),
        "grid": torch.tensor([f[1] for f in fitted], dtype=torch.int64),
    }
