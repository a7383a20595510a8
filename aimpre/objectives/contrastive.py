"""Contrastive image-text losses that see every rank's batch: CLIP's softmax InfoNCE and SigLIP's sigmoid loss.

CLIP (Radford et al. 2021): symmetric cross-entropy over the image-text similarity matrix, learnable logit scale
initialised to log(1/0.07) and kept in [0, log 100] by clamping the parameter after each optimiser step
(``clamp_temperatures``, open_clip's ``logit_scale.clamp_(0, math.log(100))`` in its train loop). Clamping inside
the forward instead would zero the scale's gradient whenever a step has carried it past the bound, so it could
never come down again. SigLIP (Zhai et al. 2023): L = -1/|B| sum_ij log sigmoid(
z_ij (t x_i.y_j + b)), z = +1 on the diagonal and -1 off it, learnable t = exp(t') with t' = log 10 and b = -10 at
initialisation. Embeddings are L2-normalised here.

Distributed (checked against open_clip ``loss.py``: ``gather_features(gather_with_grad=True)`` with
``local_loss=True``): each rank scores its own images and captions against every rank's, the other ranks'
embeddings gathered with their gradient flowing back to the rank that made them. Each rank's loss is its slice
of the global one, so the mean over ranks is the loss of one process with the global batch, and the gradients,
averaged over ranks as DDP and FSDP do, are that process's gradients (tests/test_objectives.py checks both on 2
gloo processes).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice (every rank's loss used it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        rank, world = _world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts)  # [world x B, D]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:  # sums and keeps only my slice in one collective
            mine = torch.empty_like(grad[: ctx.n])
            dist.reduce_scatter_tensor(mine, grad)
            return mine
        dist.all_reduce(grad)  # gloo has no reduce-scatter
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: Tensor) -> Tensor:
    """[B, D] on each rank (the same B everywhere) -> [world x B, D] in rank order, gradients flowing back to the
    rank that made each slice (open_clip's ``gather_with_grad``)."""
    if _world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def _embeddings(image: Tensor, text: Tensor) -> tuple[Tensor, Tensor, int]:
    """Normalised local image embeddings [B, D], every rank's text embeddings [world x B, D], this rank's offset."""
    if image.shape != text.shape or image.dim() != 2:
        raise ValueError(
            f"image and text embeddings must both be [B, D], got {tuple(image.shape)}, {tuple(text.shape)}"
        )
    rank, _ = _world()
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1), rank * image.shape[0]


class ClipLoss(nn.Module):
    """Symmetric softmax InfoNCE over every rank's pairs, with a learnable temperature.

    The forward uses the scale as it is; whoever steps the optimiser calls ``clamp_`` (or ``clamp_temperatures``)
    after each step.

    Args:
        init_scale: initial logit scale (1/0.07, CLIP's).
        max_scale: the scale's clamp (100, CLIP's).
    """

    def __init__(self, init_scale: float = 1 / 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.max_log = math.log(max_scale)

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        """This rank's slice of the loss over the global batch; ``image``/``text`` [B, D] are the local pairs."""
        image, text, offset = _embeddings(image, text)
        all_image, all_text = gather_with_grad(image), gather_with_grad(text)  # [world x B, D]
        scale = self.logit_scale.exp()  # unclamped: the gradient stays live at the bound (see clamp_)
        labels = torch.arange(offset, offset + image.shape[0], device=image.device)  # my pairs' global columns
        per_image = scale * image @ all_text.T  # [B, world x B]
        per_text = scale * text @ all_image.T
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamps the log scale to [0, log max_scale] in place: call it after every optimiser step."""
        self.logit_scale.clamp_(0.0, self.max_log)


def clamp_temperatures(model: nn.Module) -> None:
    """Clamps the temperature of every ``ClipLoss`` inside ``model``; call it after every optimiser step.

    Args:
        model: any module (a whole objective, LiT's towers); modules without a ``ClipLoss`` are left as they are.
    """
    for m in model.modules():
        if isinstance(m, ClipLoss):
            m.clamp_()


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss of this rank's images against every rank's captions, learnable temperature and bias.

    Args:
        init_log_t: initial t' (t = exp(t')): log 10, SigLIP's.
        init_bias: initial b: -10, SigLIP's.
    """

    def __init__(self, init_log_t: float = math.log(10.0), init_bias: float = -10.0) -> None:
        super().__init__()
        self.log_t = nn.Parameter(torch.tensor(init_log_t))
        self.bias = nn.Parameter(torch.tensor(init_bias))

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        """-1/B sum over my B images and all world x B captions of log sigmoid(z (t x.y + b))."""
        image, text, offset = _embeddings(image, text)
        all_text = gather_with_grad(text)  # [world x B, D]
        logits = self.log_t.exp() * image @ all_text.T + self.bias  # [B, world x B]
        z = -torch.ones_like(logits)
        rows = torch.arange(image.shape[0], device=image.device)
        z[rows, rows + offset] = 1.0  # my pairs sit at my offset in the gathered columns
        return -F.logsigmoid(z * logits).sum() / image.shape[0]
