"""Frozen-trunk evaluation: attentive and linear probes on an encoder's tokens over labelled shards.

AIMv2 (Fini et al. 2024) and AIM (El-Nouby et al. 2024) judge an encoder by an attentive probe on its frozen
last-layer features (``aimpre.model.pooling``). Here the trunk runs once per image (full attention, centre crop,
normalised with the mean/std the encoder was trained with) and its tokens are cached on disk, keyed by a hash of
the encoder's weights, the preprocessing and the shard bytes; the heads then train on the cached tokens.
Departure from the papers: with cached features the probe trains without augmentation. ``layers`` probes chosen
blocks instead of the last one (each through the final RMSNorm), averaged or concatenated: AIM v1 found its best
features in the middle of the trunk.

A raw-pixel baseline (``raw_pixel_probe``) trains the linear probe on the normalised pixels themselves, at the
probe's resolution: logistic regression on the flattened image (the attentive head on raw 588-wide patches would
cost 9x a tiny encoder's probe, and says no more about what the pixels hold). An encoder that probes below it has
lost information the pixels held. Every result carries the probe's top-1 on its own training set beside the
held-out one: a low train top-1 means the features do not hold what the labels need; a high one with a low test
top-1 means the head overfits.

``native`` (a sincos2d encoder) probes at native resolution instead: each image keeps its aspect on a canvas of
2^n patches, wide (2^floor(n/2) rows x 2^ceil(n/2) columns, ``aimpre.export.canvas``) or its transpose, whichever
the image's own aspect fits (training draws both, a coin per step): both hold the same 2^n tokens, so one probe's
features stack, and a tall image is not shrunk onto a wide canvas. Images are decoded whole through training's
bounded decoder straight onto the canvas (``Augment(canvas=...)``) and zero-padded at the bottom and right as
training pads; the tokens' valid mask (``aimpre.model.losses.valid_patches``) is cached with them, and the heads
pool over the image's tokens only.

Labels come from ``KEY.cls`` (an integer) or the ``label``/``cls`` field of ``KEY.json``. ``demo:SPLIT`` names a
split of the embedded demo data (e.g. ``demo:digits-train``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from aimpre.data import Augment, demo_spec, expand_shards
from aimpre.data.decode import IMAGE_KEYS, decode_image, jpeg_frame, sample_label
from aimpre.data.demo import cache_root
from aimpre.data.native import Area, grid_of, pad_to_canvas
from aimpre.data.reader import ReadErrors, shard_samples
from aimpre.eval import finish_record
from aimpre.eval.fusion import fused_name
from aimpre.export import canvas, load
from aimpre.files import atomic_path
from aimpre.model import AIMv2Encoder
from aimpre.model.losses import valid_patches
from aimpre.model.pooling import AttentionPoolingClassifier, MeanPoolingClassifier, masked_mean
from aimpre.progress import progress

KINDS = ("attentive", "linear")


class ProbeError(ValueError):
    """The probe's data or encoder is unusable; the message names the shard, split or file."""


MAX_HEAD_BYTES = 4 << 30  # a probe head of ImageNet-21k's 21841 classes on a 3072-wide encoder takes 1.1 GB


@dataclass
class ProbeSettings:
    """Probe training: AdamW with linear warmup and cosine decay, full passes over the cached features.

    The defaults train both probes on the 1258 demo digits to near 100% train top-1 (at lr 1e-3 and 30 epochs they
    stop at 80-90%, under-fitted, which flatters whichever encoder is easier to fit).
    """

    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    heads: int | None = None  # attentive-probe heads; None: width // 64 (head dim 64)
    seed: int = 0


def shard_urls(spec: str) -> list[str]:
    """``demo:SPLIT`` or a shard spec (braces, ``::``) -> shard paths."""
    try:
        urls = demo_spec(spec)
    except ValueError as e:
        raise ProbeError(str(e)) from e
    return expand_shards(spec) if urls is None else urls


def label_of(sample: dict[str, Any]) -> int | None:
    """The integer label in ``KEY.cls``, else the ``label``/``cls`` field of ``KEY.json``; None if absent or bad.

    Training reads labels with the same function (``aimpre.data.decode.sample_label``), so a probe and a
    classification run agree on every sample's class.
    """
    return sample_label(sample)[0]


def parse_size(text: str) -> int | tuple[int, int]:
    """``--img-size``: ``S`` (square) or ``HxW`` in pixels, e.g. ``224x336`` (rows x columns, as a grid is given).

    Args:
        text: the option's value.
    """
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ProbeError(f"--img-size {text[:40]!r}: give S or HxW in pixels (e.g. 224 or 224x336)")
    h, w = (int(p) for p in (parts * 2)[:2])
    return h if h == w else (h, w)


def check_size(encoder: AIMv2Encoder, size: int | tuple[int, int]) -> None:
    """``size`` must be whole patches, and non-square (or another grid) only for an encoder without a fixed grid."""
    cfg = encoder.cfg
    h, w = (size, size) if isinstance(size, int) else size
    if h % cfg.patch_size or w % cfg.patch_size:
        raise ProbeError(f"--img-size {h}x{w} is not a multiple of the encoder's patch size {cfg.patch_size}")
    if cfg.pos_embed != "sincos2d" and (h, w) != (cfg.img_size, cfg.img_size):
        raise ProbeError(f"--img-size {h}x{w}: this encoder learned its positions for {cfg.img_size} px "
                         "(model.pos_embed=learned); only a sincos2d (native) encoder takes other grids")  # fmt: skip


def check_native(encoder: AIMv2Encoder, n: int, img_size: bool = False, raw_pixels: bool = False) -> None:
    """``--native n`` needs a sincos2d encoder, a canvas ``aimpre.export.canvas`` knows, and no square crop beside.

    Args:
        encoder: the encoder to probe.
        n: log2 of the canvas's patches.
        img_size: whether ``--img-size`` was given too.
        raw_pixels: whether the raw-pixel baseline was asked for (it reads square crops).
    """
    if encoder.cfg.pos_embed != "sincos2d":
        raise ProbeError(f"--native {n}: this encoder learned its positions for {encoder.cfg.img_size} px "
                         "(model.pos_embed=learned); only a sincos2d (native) encoder runs canvases")  # fmt: skip
    if not 1 <= n <= 16:
        raise ProbeError(f"--native {n}: the canvas holds 2^n patches, n in 1..16 (the paper's range is 7..12)")
    if img_size or raw_pixels:
        raise ProbeError(f"--native {n} fits whole images to a canvas: not with " +
                         ("--img-size (a centre crop)" if img_size else "--raw-pixels (square crops)"))  # fmt: skip


def read_labelled(urls: list[str], img_size: int | tuple[int, int]) -> tuple[Tensor, Tensor, Counter[str]]:
    """Images uint8 [N, 3, H, W], labels int64 [N], and skipped samples by reason.

    Shards are read as training reads them: damage is skipped and counted by reason (with ``samples_lost``),
    and reading goes on after it. A square size is the centre square crop, resized; a non-square ``(H, W)`` (a
    native encoder) is the centre H x W of the centre square resized to max(H, W): no image is stretched, and
    the decoder (``aimpre.data.decode``, bounded against hostile files) stays the one training uses.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    aug, rng = Augment(max(h, w), train=False), np.random.default_rng(0)

    def centre(data: bytes) -> Tensor | str:
        image = decode_image(data, aug, rng)
        if isinstance(image, str):
            return image
        top, left = (image.shape[1] - h) // 2, (image.shape[2] - w) // 2
        return image[:, top : top + h, left : left + w]  # [3, S, S] -> [3, H, W], the centre

    images, labels, skipped = _decoded(urls, centre)
    return torch.stack(images), torch.tensor(labels), skipped


def _decoded(urls: list[str], decode: Callable[[bytes], Tensor | str]) -> tuple[list[Tensor], list[int], Counter[str]]:
    """Each labelled sample's ``decode(image bytes)`` (a tensor, or the reason it cannot be used), its label, and
    skipped samples by reason; refuses shards that hold no usable one."""
    images: list[Tensor] = []
    labels: list[int] = []
    skipped = Counter[str]()
    errors = ReadErrors()
    for s in (s for u in urls for s in shard_samples(u, errors)):
        label, reason = sample_label(s)
        image_key = next((k for k in IMAGE_KEYS if k in s), None)
        if label is None or image_key is None:  # sample_label gives a reason with every None
            skipped[reason or "no_image"] += 1
            continue
        image = decode(s[image_key])
        if isinstance(image, str):  # the reason it cannot be used
            skipped[image] += 1
            continue
        images.append(image)
        labels.append(label)
    skipped.update({k: n for k, n in errors.counts.items() if k != "samples_recovered"})
    if not images:
        raise ProbeError(f"no labelled images in {urls[:3]}{'...' if len(urls) > 3 else ''} (skipped: {dict(skipped)})")
    return images, labels, skipped


def native_canvas(data: bytes, n: int) -> Area:
    """The canvas of 2^n patches an image is probed on: wide (``aimpre.export.canvas``), or its transpose for an
    image taller than wide. Only the header is read (the decoder reads the file again, bounded); an unreadable
    header gets the wide canvas, and the decoder then names what is wrong with the file."""
    wide = canvas(n)
    size = jpeg_frame(data)
    if size is None:
        try:
            with Image.open(io.BytesIO(data)) as img:  # lazy: the header, no pixels
                size = (*img.size, 0)
        except Exception:  # PIL raises many types on junk; decode_image gives the reason
            return wide
    return Area(n, wide.cols, wide.rows) if size[1] > size[0] else wide


def read_native(urls: list[str], n: int, patch: int) -> tuple[list[Tensor], Tensor, Tensor, Counter[str]]:
    """Images at native resolution: uint8 [3, rows * patch, cols * patch] each (two shapes at most, the canvas of
    2^n patches and its transpose, ``native_canvas``), valid masks [N, 2^n] bool (raster order of each one's own
    canvas), labels int64 [N] and skipped samples by reason.

    Args:
        urls: labelled shards.
        n: log2 of the canvas's patches (``data.native_log2_area``'s unit).
        patch: the encoder's patch size in pixels.
    """
    rng = np.random.default_rng(0)
    areas: list[Area] = []

    def fitted(data: bytes) -> Tensor | str:
        area = native_canvas(data, n)
        aug = Augment(area.cols * patch, train=False, canvas=(area.rows * patch, area.cols * patch))
        image = decode_image(data, aug, rng)  # the whole image, aspect kept, fitted to the canvas
        if isinstance(image, str):
            return image
        areas.append(Area(n, *grid_of(image, patch)))  # its own rows, cols (rounded up)
        return pad_to_canvas([image], area.rows, area.cols, patch)[0]

    images, labels, skipped = _decoded(urls, fitted)
    valid = torch.stack([
        valid_patches(torch.tensor([[a.rows, a.cols]]), im.shape[-2] // patch, im.shape[-1] // patch)[0]
        for a, im in zip(areas, images, strict=True)
    ])  # fmt: skip
    return images, valid, torch.tensor(labels), skipped


MERGES = ("mean", "concat")


@dataclass(frozen=True)
class Layers:
    """Which features to probe: ``blocks`` (indices as ``AIMv2Encoder.forward_intermediates`` takes them; None:
    the encoder's output) merged by ``merge``: "mean" ([N, T, C]) or "concat" ([N, T, C x blocks])."""

    blocks: tuple[int, ...] | None = None
    merge: str = "mean"

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise ProbeError(f"unknown layer merge {self.merge!r}; merges: {', '.join(MERGES)}")

    def tokens(self, encoder: AIMv2Encoder, x: Tensor) -> Tensor:
        if self.blocks is None:
            return encoder(x)
        outs = encoder.forward_intermediates(x, list(self.blocks))  # each [B, T, C]
        return torch.stack(outs).mean(0) if self.merge == "mean" else torch.cat(outs, dim=-1)


@torch.no_grad()
def extract(
    encoder: AIMv2Encoder, images: Tensor, mean: Tensor, std: Tensor, batch_size: int = 64, layers: Layers = Layers()
) -> Tensor:
    """Tokens [N, T, C] (float16 on the CPU, to halve memory and cache size) of uint8 images [N, 3, S, S]: the
    encoder's final-norm output, or the ``layers`` it is asked for.

    The encoder runs where its weights are; ``mean``/``std`` are [1, 3, 1, 1] in 0..1 units.
    """
    device = next(encoder.parameters()).device
    mean, std = mean.to(device), std.to(device)
    out = []
    for i in progress(range(0, len(images), batch_size), "features", unit="batch", leave=False):
        x = (images[i : i + batch_size].to(device).float() / 255 - mean) / std
        out.append(layers.tokens(encoder, x).half().cpu())
    return torch.cat(out)


def extract_shapes(
    encoder: AIMv2Encoder, images: list[Tensor], mean: Tensor, std: Tensor, layers: Layers = Layers()
) -> Tensor:
    """``extract`` of images of a few shapes (native canvases, each of the same number of patches): tokens
    [N, T, C] in the images' order, each shape run in batches of its own."""
    out: Tensor | None = None
    for shape in sorted({tuple(im.shape) for im in images}):
        idx = [i for i, im in enumerate(images) if tuple(im.shape) == shape]
        tokens = extract(encoder, torch.stack([images[i] for i in idx]), mean, std, layers=layers)
        if out is None:
            out = tokens.new_empty((len(images), *tokens.shape[1:]))
        out[idx] = tokens
    assert out is not None  # _decoded refuses shards without images
    return out


def _weights_hash(encoder: AIMv2Encoder, pre: dict[str, Any]) -> Any:
    """A sha256 object fed the preprocessing and every weight: the encoder's part of a feature-cache key."""
    native = [pre["native"]] if pre.get("native") is not None else []  # the square keys stay as they were
    h = hashlib.sha256(json.dumps([pre["mean"], pre["std"], pre["img_size"], *native]).encode())
    for k, v in sorted(encoder.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h


def _digest(weights: Any, urls: list[str], layers: Layers = Layers()) -> str:
    """The cache key of the ``layers`` features of ``urls`` under the encoder whose ``_weights_hash`` is
    ``weights``."""
    h = weights.copy()
    if layers != Layers():  # the default's keys stay those of the caches written before layers existed
        h.update(json.dumps([layers.blocks, layers.merge]).encode())
    for u in urls:
        if not os.path.isfile(u):  # a pipe: or remote URL: its name is all we can key on
            h.update(u.encode())
            continue
        with open(u, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:20]


def features(
    encoder: AIMv2Encoder,
    pre: dict[str, Any],
    urls: list[str],
    cache: Path | None,
    weights: Any = None,
    layers: Layers = Layers(),
) -> tuple[Tensor, Tensor]:
    """Tokens [N, T, C] and labels [N] of the labelled shards ``urls``, from the cache when it has them.

    ``weights``: the encoder's ``_weights_hash``, when the caller has it already (hashing a large encoder takes
    seconds).
    """
    if pre.get("native") is not None:
        raise ProbeError("features: a native probe's tokens come with their valid mask (native_features)")
    saved = _features(encoder, pre, urls, cache, weights, layers)
    return saved["tokens"], saved["labels"]


def native_features(
    encoder: AIMv2Encoder,
    pre: dict[str, Any],
    urls: list[str],
    cache: Path | None,
    weights: Any = None,
    layers: Layers = Layers(),
) -> tuple[Tensor, Tensor, Tensor]:
    """``features`` at native resolution (``pre["native"]``: n, canvases of 2^n patches): tokens [N, 2^n, C],
    labels [N] and the valid mask [N, 2^n] (False on padding), cached together."""
    saved = _features(encoder, pre, urls, cache, weights, layers)
    return saved["tokens"], saved["labels"], saved["valid"]


def _features(
    encoder: AIMv2Encoder, pre: dict[str, Any], urls: list[str], cache: Path | None, weights: Any, layers: Layers
) -> dict[str, Tensor]:
    """``tokens`` and ``labels`` (and ``valid`` when ``pre`` has ``native``), from the cache when it has them."""
    native = pre.get("native")
    fields: dict[str, type] = {"tokens": Tensor, "labels": Tensor, **({"valid": Tensor} if native is not None else {})}
    if cache is not None and weights is None:
        weights = _weights_hash(encoder, pre)
    file = None if cache is None else cache / f"{_digest(weights, urls, layers)}.pt"
    saved = None if file is None else read_cache(file, fields)
    if saved is not None:
        return saved
    mean, std = (torch.tensor(pre[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    if native is None:
        images, labels, skipped = read_labelled(urls, pre["img_size"])
        saved = {"tokens": extract(encoder, images, mean, std, layers=layers), "labels": labels}
    else:
        shaped, valid, labels, skipped = read_native(urls, native, encoder.cfg.patch_size)
        saved = {"tokens": extract_shapes(encoder, shaped, mean, std, layers), "labels": labels, "valid": valid}
    if skipped:
        print(f"probe: skipped {dict(skipped)} samples in {urls[0]}...", flush=True)
    if file is not None:
        with atomic_path(file) as tmp:
            torch.save(saved, tmp)
    return saved


def read_cache(file: Path, fields: dict[str, type]) -> dict[str, Any] | None:
    """A feature cache file's dict, or None if there is none or it is damaged (then the caller recomputes it and
    replaces the file; a note on stderr says so).

    Nothing is unpickled beyond tensors and plain values (``weights_only``). A file that asks to run code is
    refused in one line naming it: the cache was tampered with, and recomputing would hide that.

    Args:
        file: the cache file.
        fields: the keys the dict must have and their types; the first two hold one entry per sample.
    """
    from aimpre.train.checkpoint import UnsafeCheckpointError, load_torch_file  # here: it imports Lightning

    if not (file.exists() or file.is_symlink()):
        return None
    try:
        saved = load_torch_file(file)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"feature cache {e} (remove the file)") from None
    except ValueError as e:  # unreadable, truncated, a FIFO: ours, damaged
        print(f"aimpre: note: recomputing the feature cache: {e}", file=sys.stderr)
        return None
    first, second = list(fields)[:2]
    if not (
        isinstance(saved, dict)
        and all(isinstance(saved.get(k), tp) for k, tp in fields.items())
        and len(saved[first]) == len(saved[second])
    ):
        print(f"aimpre: note: recomputing the feature cache: {file} does not hold {', '.join(fields)}", file=sys.stderr)
        return None
    return saved


def _lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _logits(head: nn.Module, tokens: Tensor, valid: Tensor | None) -> Tensor:
    """The head's logits of a batch on the training device; ``valid`` (native tokens) masks the padding."""
    x = tokens.to(_device()).float()
    return head(x) if valid is None else head(x, valid.to(x.device))


@torch.no_grad()
def _top1(head: nn.Module, tokens: Tensor, labels: Tensor, batch_size: int = 256, valid: Tensor | None = None) -> float:
    head.eval()
    hits = sum(
        int((_logits(head, tokens[i : i + batch_size], None if valid is None else valid[i : i + batch_size])
             .argmax(-1).cpu() == labels[i : i + batch_size]).sum())
        for i in range(0, len(tokens), batch_size)
    )  # fmt: skip
    return hits / len(tokens)


def train_probe(
    kind: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    s: ProbeSettings,
    widths: list[int] | None = None,
    fusion: str = "concat",
    valid: tuple[Tensor, Tensor] | None = None,
) -> dict:
    """Trains one probe head on cached tokens and reports top-1 on ``test``.

    Args:
        kind: "attentive" (AIM's attention-pooling head) or "linear" (mean-pooled tokens).
        train: tokens [N, T, C] and labels [N].
        test: held-out tokens and labels.
        s: optimisation settings.
        widths: when the tokens are several encoders' concatenated (``aimpre.eval.fusion``), each one's width.
        fusion: with ``widths``, "concat" (the head reads the concatenation) or "sum" (each encoder's part is
            projected to the widest width and the projections summed, trained with the head; mean pooling
            commutes with them, so the linear probe pools first as ever).
        valid: native tokens' masks [N, T] of ``train`` and ``test`` (False on padding): the heads pool over the
            image's tokens only.
    """
    if valid is not None and widths is not None and fusion == "sum":
        raise ProbeError("a native probe's padded tokens are masked in the head; fusion 'sum' projects before it")
    from aimpre.eval.attributes import probe_heads
    from aimpre.eval.fusion import FuseConcatenated

    fuse = None if widths is None else FuseConcatenated(widths, fusion)  # refuses an unknown fusion
    (x, y), dim = train, train[0].shape[-1] if fuse is None else fuse.out_dim
    vx, vt = (None, None) if valid is None else valid
    if kind == "linear":  # the head mean-pools; pooling once here makes its mean over one token a no-op
        x, test = masked_mean(x.float(), vx)[:, None], (masked_mean(test[0].float(), vt)[:, None], test[1])  # [N, 1, C]
        vx = vt = None
    classes = int(max(y.max(), test[1].max())) + 1
    # the head is sized by the largest label: check what it would take before allocating it
    head_bytes = classes * dim * 16  # float32 weights, their gradients and AdamW's two moments
    if head_bytes > MAX_HEAD_BYTES:
        raise ProbeError(
            f"the largest label is {classes - 1}: a head of {classes} classes x {dim} features would take "
            f"{head_bytes / 2**30:.1f} GiB (limit {MAX_HEAD_BYTES / 2**30:.0f}); labels must be class indices 0..C-1"
        )
    torch.manual_seed(s.seed)
    if kind == "attentive":
        head: nn.Module = AttentionPoolingClassifier(dim, classes, s.heads or probe_heads(dim))
    elif kind == "linear":
        head = MeanPoolingClassifier(dim, classes)
    else:
        raise ValueError(f"unknown probe {kind!r}; probes: {', '.join(KINDS)}")
    if widths is not None and fusion == "sum":
        torch.manual_seed(s.seed + 1)  # the projections, after the head's own seeded init (unchanged by fusion)
        head = nn.Sequential(FuseConcatenated(widths, fusion), head)
    dev = _device()
    head.to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = math.ceil(len(x) / s.batch_size)
    total, warmup = s.epochs * steps_per_epoch, s.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_at(i, total, warmup))
    g = torch.Generator().manual_seed(s.seed)
    bar = progress(range(s.epochs), f"{kind} probe", unit="epoch", leave=False)
    for _ in bar:
        head.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), s.batch_size):
            idx = order[i : i + s.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(_logits(head, x[idx], None if vx is None else vx[idx]), y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return {
        "top1": _top1(head, *test, valid=vt),
        "train_top1": _top1(head, x, y, valid=vx),
        "params": sum(p.numel() for p in head.parameters()),
    }


def raw_pixel_probe(
    pre: dict[str, Any], train: str, test: str | None, settings: ProbeSettings | None = None
) -> dict[str, dict]:
    """The linear probe on raw normalised pixels at the probe's resolution: the baseline beside the encoders.

    Args:
        pre: the encoder's preprocessing (``img_size``, ``mean``, ``std``), so the pixels are what it was fed.
        train: labelled shards to train on (``demo:SPLIT`` or a shard spec).
        test: held-out labelled shards; None holds out a seeded 20% of ``train``.
        settings: probe training settings (as for the encoders).

    Returns:
        ``{"linear": train_probe's result}`` (top1, train_top1, params).
    """
    s = settings or ProbeSettings()
    mean, std = (torch.tensor(pre[k]).view(1, 3, 1, 1) for k in ("mean", "std"))

    def pixels(spec: str) -> tuple[Tensor, Tensor]:
        images, labels, _ = read_labelled(shard_urls(spec), pre["img_size"])
        return ((images.float() / 255 - mean) / std).flatten(1).unsqueeze(1).half(), labels  # [N, 1, 3 x S x S]

    x, y = pixels(train)
    if test is None:
        tr, te = _split(y, 0.2, s.seed)
        train_set, test_set = (x[tr], y[tr]), (x[te], y[te])
    else:
        train_set, test_set = (x, y), pixels(test)
    return {"linear": train_probe("linear", train_set, test_set, s)}


def _split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(len(labels) * fraction))
    return order[n_test:], order[:n_test]


def run_probe(
    encoder_path: str | Path,
    train: str = "demo:digits-train",
    test: str | None = "demo:digits-test",
    kinds: tuple[str, ...] = KINDS,
    settings: ProbeSettings | None = None,
    compare_random: bool = False,
    cache: bool = True,
    out: Path | None = None,
    layers: Layers = Layers(),
    raw_pixels: bool = False,
    img_size: int | tuple[int, int] | None = None,
    fuse: tuple[str, ...] = (),
    fusion: str = "concat",
    native: int | None = None,
) -> dict[str, Any]:
    """Probes a frozen encoder (and, if asked, the same architecture at random initialisation, and raw pixels).

    Args:
        encoder_path: anything ``aimpre.export.load`` reads (a run, a checkpoint, an export, a released model).
        train: labelled shards to train the probes on (``demo:SPLIT`` or a shard spec).
        test: held-out labelled shards; None holds out a seeded 20% of ``train``.
        kinds: probes to train, from ``KINDS``.
        settings: probe training settings.
        compare_random: also probe the encoder's architecture re-initialised (seeded) as ours is before pretraining.
        cache: keep features under ``$AIMPRE_CACHE/features``.
        out: where to write the results JSON (atomically), if anywhere.
        layers: the blocks to probe and how to merge them (default: the encoder's output).
        raw_pixels: also train the linear probe on the raw normalised pixels (``raw_pixel_probe``), as
            ``raw_pixels`` (when ``kinds`` has it).
        img_size: probe at this size (S, or (H, W) for a sincos2d encoder, which runs any grid); None: the size
            the encoder was trained at.
        fuse: more encoders (paths, or "pixels": the normalised pixels patchified as the encoder patchifies them),
            each probed alone (a row named by its path) and fused with the encoder in one more row
            (``aimpre.eval.fusion.fused_name``). Each reads the images with its own preprocessing (size, mean/std),
            its output tokens (cached as the encoder's) resampled to the encoder's token grid.
        fusion: how the fused row combines its sources: "concat" or "sum" (projected to one width and summed).
        native: probe a sincos2d encoder at native resolution on canvases of 2^n patches (module docstring),
            instead of a square or ``img_size`` crop.

    Returns:
        A JSON-able dict with top-1 and train top-1 per encoder and probe, the data sizes and the settings.
    """
    s = settings or ProbeSettings()
    start = time.time()
    loaded = load(encoder_path)
    pre = loaded.info.get("preprocessing") or {}
    if pre.get("mean") is None or pre.get("std") is None:
        raise ProbeError(f"{encoder_path}: its normalisation (mean/std) is unknown; probing needs it")
    if img_size is not None:
        check_size(loaded.encoder, img_size)
        pre = {**pre, "img_size": list(img_size) if isinstance(img_size, tuple) else img_size}  # in the cache key
    if native is not None:
        check_native(loaded.encoder, native, img_size is not None, raw_pixels)
        if fuse:  # partners' tokens are resampled onto one square grid; a native probe has two canvases
            raise ProbeError("--native N with more than one encoder: fusion needs one square token grid")
        pre = {**pre, "native": native}  # in the cache key
    if layers.blocks is not None:
        from aimpre.model.vit import block_indices

        try:
            block_indices(list(layers.blocks), loaded.encoder.cfg.depth)
        except ValueError as e:
            raise ProbeError(f"--layers: {e}") from None
    partners = _partners(fuse, fusion, pre, loaded.encoder.cfg.patch_size)  # before any work: refusals come first
    encoders = {"encoder": loaded.encoder.to(_device())}
    if compare_random:
        twin = AIMv2Encoder(loaded.encoder.cfg).eval()
        torch.manual_seed(s.seed)
        twin.init_weights()
        encoders["random_init"] = twin.to(_device())
    cache_dir = cache_root() / "features" if cache else None
    train_urls, test_urls = shard_urls(train), None if test is None else shard_urls(test)
    sources: dict[str, list[tuple[Tensor, Tensor] | None]] = {}  # name -> [train features, test features or None]
    masks: dict[str, list[Tensor | None]] = {}  # name -> valid-token masks (native probes), as sources
    for name, encoder in encoders.items():
        weights = _weights_hash(encoder, pre) if cache_dir else None  # once for both shard sets
        got = [_features(encoder, pre, u, cache_dir, weights, layers) if u else None for u in (train_urls, test_urls)]
        sources[name] = [None if g is None else (g["tokens"], g["labels"]) for g in got]
        masks[name] = [None if g is None else g.get("valid") for g in got]
    widths: dict[str, list[int]] = {}
    if partners:
        names = ["encoder", *partners]
        for name, (tokens_of, _) in partners.items():
            sources[name] = [tokens_of(u, cache_dir) if u else None for u in (train_urls, test_urls)]
        own = sources["encoder"][0]
        assert own is not None
        sources[fused_name(names, fusion)] = [_fused([sources[n][i] for n in names], names) for i in (0, 1)]
        widths[fused_name(names, fusion)] = [own[0].shape[-1], *(w for _, w in partners.values())]  # --layers widen
    results: dict[str, dict[str, Any]] = {}
    for name, (train_f, test_f) in sources.items():
        assert train_f is not None
        v_train, v_test = masks.get(name, [None, None])
        valid = None
        if test_f is None:
            tr, te = _split(train_f[1], 0.2, s.seed)
            train_set, test_set = (train_f[0][tr], train_f[1][tr]), (train_f[0][te], train_f[1][te])
            valid = None if v_train is None else (v_train[tr], v_train[te])
        else:
            train_set, test_set = train_f, test_f
            valid = None if v_train is None or v_test is None else (v_train, v_test)
        results[name] = {kind: train_probe(kind, train_set, test_set, s, widths.get(name), fusion, valid=valid)
                         for kind in kinds}  # fmt: skip
    if raw_pixels and "linear" in kinds:
        results["raw_pixels"] = raw_pixel_probe(pre, train, test, s)
    res = {
        "encoder_path": str(encoder_path),
        "encoder_info": loaded.info,
        "train": train,
        "test": test or f"20% of {train} (seed {s.seed})",
        "n_train": len(train_set[1]),
        "n_test": len(test_set[1]),
        "classes": int(max(train_set[1].max(), test_set[1].max())) + 1,
        "settings": vars(s),
        "img_size": pre["img_size"],
        "native": None if native is None else {"log2_area": native, "canvas": list(canvas(native)[1:])},
        "layers": "output" if layers.blocks is None else {"blocks": list(layers.blocks), "merge": layers.merge},
        "fuse": list(fuse),
        "fusion": fusion,
        "results": results,
    }
    return finish_record(res, start, out)


PartnerTokens = Callable[[list[str], Path | None], tuple[Tensor, Tensor]]  # (urls, cache) -> tokens, labels


def _partners(
    fuse: tuple[str, ...], fusion: str, pre: dict[str, Any], patch: int
) -> dict[str, tuple[PartnerTokens, int]]:
    """The encoders ``run_probe`` fuses with its own: name -> (tokens function, token width). Each is loaded here,
    so a missing or unusable one is refused before any features are computed.

    Args:
        fuse: paths, or "pixels".
        fusion: "concat" or "sum".
        pre: the probed encoder's preprocessing (the pixels partner uses it).
        patch: the probed encoder's patch size.
    """
    from aimpre.eval.fusion import FUSIONS, resample_tokens
    from aimpre.eval.scenes import pixel_tokens

    if not fuse:
        return {}
    if fusion not in FUSIONS:
        raise ProbeError(f"unknown fusion {fusion!r}; fusions: {', '.join(FUSIONS)}")
    if len(set(fuse)) != len(fuse) or {"encoder", "random_init", "raw_pixels"} & set(fuse):
        raise ProbeError(f"the encoders to fuse name one twice or a reserved name: {' '.join(fuse)}")
    if not isinstance(pre["img_size"], int):
        raise ProbeError(f"--img-size {pre['img_size']}: fusing encoders needs a square grid")
    grid = pre["img_size"] // patch  # every partner's tokens are resampled onto the encoder's grid
    partners: dict[str, tuple[PartnerTokens, int]] = {}
    for path in fuse:
        if path == "pixels":
            mean, std = (torch.tensor(pre[k]).view(1, 3, 1, 1) for k in ("mean", "std"))

            def pixels(urls: list[str], cache: Path | None, mean: Tensor = mean, std: Tensor = std) -> Any:
                images, labels, _ = read_labelled(urls, pre["img_size"])
                return pixel_tokens(images, patch, mean, std).half(), labels  # [N, T, patch * patch * 3]

            partners[path] = (pixels, patch * patch * 3)
            continue
        loaded = load(path)
        own = loaded.info.get("preprocessing") or {}
        if own.get("mean") is None or own.get("std") is None:
            raise ProbeError(f"{path}: its normalisation (mean/std) is unknown; probing needs it")
        own = {**own, "img_size": own.get("img_size") or loaded.encoder.cfg.img_size}  # its own size, as trained
        encoder = loaded.encoder.to(_device())

        def tokens(urls: list[str], cache: Path | None, encoder: AIMv2Encoder = encoder, own: dict = own) -> Any:
            x, y = features(encoder, own, urls, cache)  # cached under its own weights and preprocessing
            return resample_tokens(x, grid).half(), y

        partners[path] = (tokens, loaded.encoder.cfg.width)
    return partners


def _fused(parts: list[tuple[Tensor, Tensor] | None], names: list[str]) -> tuple[Tensor, Tensor] | None:
    """Several sources' (tokens, labels) of one shard set as one: tokens concatenated along channels. Every source
    read the same shards with the same reader, so they hold the same samples in the same order; a label that
    differs says they do not (one skipped a sample another decoded), which would pair the wrong images."""
    if parts[0] is None:
        return None
    labels = parts[0][1]
    for name, part in zip(names, parts, strict=True):
        assert part is not None
        if not torch.equal(part[1], labels):
            raise ProbeError(f"{name} read other samples than the encoder ({len(part[1])} vs {len(labels)}); "
                             "cannot fuse them")  # fmt: skip
    return torch.cat([p[0] for p in parts if p is not None], dim=-1), labels
