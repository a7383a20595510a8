"""Localization probe (issue 19, point 3): from frozen patch tokens, which patches a named shape covers and its box.

For each held-out scene (``aimpre.eval.scenes``) and each shape name in it, the target is the union of the visible
pixels of the objects of that shape (a later-drawn object hides what it overlaps): per patch, the fraction it
covers; and the box around those pixels. The head, trained on frozen tokens, is per name:

- mask: a linear classifier applied to every patch token (weights and bias chosen by the name), or with
  ``window`` 3 to its 3 x 3 neighbourhood of tokens, trained with binary cross-entropy against the covered fraction:
  position comes from which patch a token is, so it needs no position information in the token itself. The
  window exists because an autoregressive encoder's token need not describe its own patch: AIMv2's decoder
  predicts patch t + 1 from token t, and a 193-step demo run's token t already holds more of patch t + 1 than of
  t - 1 (ridge R^2 of the patch's content 0.50 vs 0.42; random init 0.46 both ways). It is not the default: at 15
  epochs on 1,000 scenes the 9x wider head fits its own training scenes worse for every source (train patch IoU
  trained 0.417 -> 0.408, random init 0.457 -> 0.428, pixels 0.457 -> 0.377; issue 19, one seed);
- box: the name's learned query attends over the (standardised) tokens, as in AIM's attentive probe, and a
  linear layer on it (layer-normed) gives (x0, y0, x1, y1); trained with L1.

Reported: patch IoU (predicted patches p > 0.5 against patches at least half covered), patch accuracy, soft IoU
(sum min / sum max of predicted probabilities and covered fractions), the IoU of the box around the predicted
patches and the share of those boxes with IoU >= 0.5, and the IoU of the regressed box.
The floor is ``mean``: per name, the training set's mean coverage map and mean box, whatever the picture.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aimpre.data.demo import SHAPES
from aimpre.eval import finish_record
from aimpre.eval.scenes import judged_encoders, judged_record, mask_box, patch_coverage, render_scenes, visible_masks
from aimpre.probe import Layers, _device, _lr_at


@dataclass
class Queries:
    """One row per (scene, shape name in it): ``scene`` [Q] indices into the scenes, ``name`` [Q] indices into
    SHAPES, ``cover`` [Q, T] covered fraction per patch, ``box`` [Q, 4] (x0, y0, x1, y1) in 0..1."""

    scene: Tensor
    name: Tensor
    cover: Tensor
    box: Tensor


def queries(facts: list[dict[str, Any]], grid: int) -> Queries:
    """The localization targets of scenes described by ``facts``, on a ``grid`` x ``grid`` patch grid."""
    scene, name, cover, box = [], [], [], []
    for i, f in enumerate(facts):
        masks = visible_masks(f)
        for shape in dict.fromkeys(o["shape"] for o in f["objects"]):  # each name once, in drawing order
            union = np.logical_or.reduce([m for m, o in zip(masks, f["objects"], strict=True) if o["shape"] == shape])
            if not union.any():  # hidden entirely by a later object: nothing to find
                continue
            scene.append(i)
            name.append(SHAPES.index(shape))
            cover.append(patch_coverage(union, grid))
            box.append(mask_box(union))
    return Queries(torch.tensor(scene), torch.tensor(name), torch.stack(cover), torch.stack(box))


def neighbourhoods(x: Tensor, window: int) -> Tensor:
    """Each token with its ``window`` x ``window`` grid neighbours (zeros past the edge): [B, T, C] -> [B, T,
    window^2 C]; ``window`` 1 is ``x`` itself."""
    if window == 1:
        return x
    B, T, C = x.shape
    g = math.isqrt(T)
    grid = x.transpose(1, 2).reshape(B, C, g, g)
    return F.unfold(grid, window, padding=window // 2).transpose(1, 2)  # [B, w^2 C, T] -> [B, T, w^2 C]


class LocalizationHead(nn.Module):
    """Per-name patch mask logits and box from frozen tokens: ``forward(tokens [B, T, C], name [B])`` ->
    (mask logits [B, T], box [B, 4] as x0, y0, x1, y1 in 0..1)."""

    def __init__(self, dim: int, names: int, heads: int, fuse: nn.Module | None = None, window: int = 1) -> None:
        super().__init__()
        self.fuse = fuse  # several encoders' concatenated tokens projected and summed (aimpre.eval.fusion), or None
        if window < 1 or window % 2 == 0:
            raise ValueError(f"the mask window must be an odd number of patches, not {window}")
        self.window = window
        if dim % heads:
            raise ValueError(f"probe width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)  # standardise each channel, as the class probes do
        self.mask = nn.Embedding(names, window * window * dim + 1)  # per name: a patch classifier's weights and bias
        nn.init.normal_(self.mask.weight, std=0.02)
        self.query = nn.Parameter(torch.randn(names, dim) * 0.02)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.box_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.box = nn.Linear(dim, 4)  # (x0, y0, x1, y1) directly: a sigmoid saturated at lr 1e-2 and never came back
        nn.init.zeros_(self.box.weight)
        with torch.no_grad():
            self.box.bias.copy_(torch.tensor([0.25, 0.25, 0.75, 0.75]))  # start from the middle of the picture

    def forward(self, tokens: Tensor, name: Tensor) -> tuple[Tensor, Tensor]:
        if self.fuse is not None:
            tokens = self.fuse(tokens)
        B, N, C = tokens.shape
        H, D = self.heads, C // self.heads
        x = self.norm(tokens.transpose(1, 2)).transpose(1, 2)  # BatchNorm1d normalises dim 1: [B, C, N] and back
        w = self.mask(name)  # [B, window^2 C + 1]
        logits = torch.einsum("bnc,bc->bn", neighbourhoods(x, self.window), w[:, :-1]) + w[:, -1:]  # [B, N]
        q = self.query[name].view(B, 1, H, D).transpose(1, 2)  # [B, H, 1, D]
        k = self.k(x).view(B, N, H, D).transpose(1, 2)  # [B, H, N, D]
        v = self.v(x).view(B, N, H, D).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v).reshape(B, C)  # [B, H, 1, D] -> [B, C]
        return logits, self.box(self.box_norm(pooled))


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching boxes [Q, 4] (x0, y0, x1, y1): [Q]."""
    w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = w * h
    area = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1) + (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area - inter).clamp(min=1e-9)


def patch_box(prob: Tensor) -> Tensor:
    """The box (x0, y0, x1, y1 in 0..1) around the patches with probability over 0.5 (the likeliest one where
    none is): [Q, 4] from patch probabilities [Q, T] on a square grid."""
    grid = math.isqrt(prob.shape[1])
    on = (prob > 0.5) | (prob == prob.max(-1, keepdim=True).values)  # [Q, T]
    on = on.view(-1, grid, grid)
    cols, rows = on.any(1), on.any(2)  # [Q, grid] each: which columns / rows hold a chosen patch
    idx = torch.arange(grid)
    big = grid + 1
    x0 = torch.where(cols, idx, big).min(-1).values
    x1 = torch.where(cols, idx, -1).max(-1).values + 1
    y0 = torch.where(rows, idx, big).min(-1).values
    y1 = torch.where(rows, idx, -1).max(-1).values + 1
    return torch.stack([x0, y0, x1, y1], dim=-1).float() / grid


def scores(prob: Tensor, box: Tensor, q: Queries) -> dict[str, float]:
    """Localization metrics of predicted patch probabilities [Q, T] and regressed boxes [Q, 4] against ``q``'s
    targets: ``box_iou`` / ``box_acc50`` for the box around the predicted patches, ``reg_box_iou`` for the
    regressed one (a pooled readout: it must find the shape through attention)."""
    pred, target = prob > 0.5, q.cover >= 0.5
    union = (pred | target).sum(-1)
    iou = torch.where(union > 0, (pred & target).sum(-1) / union.clamp(min=1), torch.ones(len(union)))
    soft = torch.minimum(prob, q.cover).sum(-1) / torch.maximum(prob, q.cover).sum(-1).clamp(min=1e-9)
    biou = box_iou(patch_box(prob), q.box)
    return {
        "patch_iou": float(iou.mean()),
        "patch_acc": float((pred == target).float().mean()),
        "soft_iou": float(soft.mean()),
        "box_iou": float(biou.mean()),
        "box_acc50": float((biou >= 0.5).float().mean()),
        "reg_box_iou": float(box_iou(box, q.box).mean()),
    }


def mean_baseline(train: Queries, test: Queries) -> dict[str, float]:
    """``scores`` of predicting, for each name, the training set's mean coverage map and mean box (the box around
    the mean map's likely patches, and the mean box as the regressed one)."""
    prob, box = torch.zeros_like(test.cover), torch.zeros_like(test.box)
    for n in range(len(SHAPES)):
        sel, tsel = train.name == n, test.name == n
        if sel.any():
            prob[tsel], box[tsel] = train.cover[sel].mean(0), train.box[sel].mean(0)
    return scores(prob, box, test)


@dataclass
class LocalizeSettings:
    """Head training: AdamW, linear warmup then cosine, full passes over the cached tokens."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    seed: int = 0
    window: int = 1  # the mask readout's neighbourhood side in patches (3: for tokens that describe a neighbour)


def train_localizer(
    tokens: Tensor,
    train: Queries,
    test_tokens: Tensor,
    test: Queries,
    s: LocalizeSettings,
    widths: list[int] | None = None,
    fusion: str = "concat",
) -> dict[str, Any]:
    """Trains a ``LocalizationHead`` on frozen ``tokens`` [N, T, C] for ``train``'s queries; scores on ``test``.

    Args:
        tokens: the training scenes' tokens.
        train: their queries (``scene`` indexes ``tokens``).
        test_tokens: the test scenes' tokens.
        test: their queries.
        s: training settings.
        widths: for fused tokens (several encoders' concatenated), each one's width; with ``fusion`` "sum" the
            head projects each to the widest and sums them first, trained with it.
        fusion: "concat" or "sum".

    Returns:
        ``scores`` on the test queries, and ``train_patch_iou`` / ``train_box_iou`` (fit vs generalisation).
    """
    from aimpre.eval.attributes import probe_heads
    from aimpre.eval.fusion import FuseConcatenated

    torch.manual_seed(s.seed)
    dev = _device()
    fuse = None if widths is None or fusion == "concat" else FuseConcatenated(widths, fusion)
    dim = tokens.shape[-1] if fuse is None else fuse.out_dim
    head = LocalizationHead(dim, len(SHAPES), probe_heads(dim), fuse, s.window).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = math.ceil(len(train.scene) / s.batch_size)
    total, warmup = s.epochs * steps_per_epoch, s.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_at(i, total, warmup))
    g = torch.Generator().manual_seed(s.seed)
    for _ in range(s.epochs):
        head.train()
        for idx in torch.randperm(len(train.scene), generator=g).split(s.batch_size):
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            logits, box = head(tokens[train.scene[idx]].to(dev).float(), train.name[idx].to(dev))
            loss = F.binary_cross_entropy_with_logits(logits, train.cover[idx].to(dev)) + F.l1_loss(
                box, train.box[idx].to(dev)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    fit = scores(*_predict(head, tokens, train), train)
    return {**scores(*_predict(head, test_tokens, test), test),
            "train_patch_iou": fit["patch_iou"], "train_box_iou": fit["box_iou"]}  # fmt: skip


@torch.no_grad()
def _predict(head: LocalizationHead, tokens: Tensor, q: Queries, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    head.eval()
    dev = _device()
    probs, boxes = [], []
    for idx in torch.arange(len(q.scene)).split(batch_size):
        logits, box = head(tokens[q.scene[idx]].to(dev).float(), q.name[idx].to(dev))
        probs.append(torch.sigmoid(logits).cpu())
        boxes.append(box.cpu())
    return torch.cat(probs), torch.cat(boxes)


def localize_rows(
    encoder_path: str | Path,
    n_train: int = 2000,
    n_test: int = 1000,
    settings: LocalizeSettings | None = None,
    baselines: bool = True,
    fuse: tuple[str, ...] = (),
    fusion: str = "concat",
    layers: Layers | None = None,
) -> list[dict[str, Any]]:
    """Rows of the localization table, one per encoder (``aimpre compare`` can add them).

    Args:
        encoder_path: anything ``aimpre.export.load`` reads.
        n_train: held-out scenes the head trains on.
        n_test: other held-out scenes it is scored on.
        settings: head training.
        baselines: add the random-init and raw-pixel encoders and the mean prediction.
        fuse: more encoders (paths, or "pixels"), each alone and fused with the encoder
            (``aimpre.eval.scenes.judged_encoders``).
        fusion: how the fused row combines them: "concat" or "sum".
        layers: the blocks the encoder and its random-init twin are read at (None: the output).

    Returns:
        Dicts with ``encoder`` ("encoder", "random_init", "pixels", each ``fuse`` path, the fused row, "mean") and
        the ``scores`` keys (plus
        ``train_patch_iou`` / ``train_box_iou`` for trained heads).
    """
    s = settings or LocalizeSettings()
    judged = judged_encoders(encoder_path, s.seed, random_init=baselines, pixels=baselines, fuse=fuse, fusion=fusion,
                             layers=layers)  # fmt: skip
    train, test = render_scenes(n_train, judged.img_size, "train"), render_scenes(n_test, judged.img_size, "test")
    q, qt = queries(train.facts, judged.grid), queries(test.facts, judged.grid)
    rows = []
    for name, tokens in judged.tokens.items():
        fit = train_localizer(tokens(train.images), q, tokens(test.images), qt, s, judged.widths.get(name), fusion)
        rows.append({"encoder": name, **fit})
    if baselines:
        rows.append({"encoder": "mean", **mean_baseline(q, qt)})
    return rows


def run_localize(encoder_path: str | Path, out: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """``localize_rows`` with what they were measured on; written as JSON to ``out`` (atomically) if given.

    Args:
        encoder_path: anything ``aimpre.export.load`` reads.
        out: results JSON.
        **kwargs: ``localize_rows``'s options.
    """

    start = time.time()
    rows = localize_rows(encoder_path, **kwargs)
    res = {
        "encoder_path": str(encoder_path),
        "scenes": {"train": kwargs.get("n_train", 2000), "test": kwargs.get("n_test", 1000)},
        "settings": vars(kwargs.get("settings") or LocalizeSettings()),
        **judged_record(kwargs),
        "rows": rows,
    }
    return finish_record(res, start, out)
