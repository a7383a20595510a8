"""The loading pipeline: tar shards -> decoded, cropped uint8 images + token ids, in batches.

Every stream is a deterministic function of (seed, epoch, rank, worker), so a run can be resumed at any batch:
``start_batch`` makes each worker replay and drop the batches the DataLoader already delivered (it hands out
batches round-robin over workers). Bad samples are skipped and counted by reason, never raised.

Batch: ``image`` uint8 [B, 3, S, S], ``text`` int64 [B, L], ``text_mask`` bool [B, L], ``key`` list[str],
``skipped`` {reason: count} (this worker's running totals) and ``worker`` (its id).
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from aimpre.data.tokenizer import Tokenizer, encode_captions

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Augment:
    size: int
    scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    train: bool = True  # False: centre square crop, no flip


def crop_box(W: int, H: int, aug: Augment, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """RandomResizedCrop's box (torchvision semantics), or the centre square when not training."""
    if aug.train:
        for _ in range(10):
            area = W * H * rng.uniform(*aug.scale)
            ar = math.exp(rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1])))
            w, h = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
            if 0 < w <= W and 0 < h <= H:
                x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
                return x, y, x + w, y + h
    side = min(W, H)
    left, top = (W - side) / 2, (H - side) / 2
    return left, top, left + side, top + side


def decode_image(data: bytes, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Bytes -> uint8 [S, S, 3]: crop and resize once, after JPEG draft-decoding at the smallest scale >= target."""
    img: Image.Image = Image.open(io.BytesIO(data))
    W, H = img.size
    x0, y0, x1, y1 = crop_box(W, H, aug, rng)
    # JPEG can decode at 1/2, 1/4, 1/8 scale: ask for the smallest that keeps the crop at >= size pixels.
    img.draft("RGB", (math.ceil(W * aug.size / (x1 - x0)), math.ceil(H * aug.size / (y1 - y0))))
    sx, sy = img.size[0] / W, img.size[1] / H
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    img = img.convert("RGB").resize(
        (aug.size, aug.size), Image.Resampling.BICUBIC, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    )
    if aug.train and aug.hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


def caption_of(sample: dict[str, Any]) -> str | None:
    """The caption from ``KEY.txt``, else ``KEY.json``'s "caption"/"text" field; None if missing or unusable."""
    try:
        if "txt" in sample:
            text = sample["txt"].decode("utf-8")
        elif "json" in sample:
            meta = json.loads(sample["json"])
            text = meta.get("caption") or meta.get("text") or ""
        else:
            return None
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    text = str(text).strip()
    return text or None


class ImageTextStream(IterableDataset):
    """An endless, resumable stream of batches over tar shards.

    Args:
        shards: shard URLs (local paths or ``pipe:`` commands).
        tokenizer: caption tokenizer.
        text_len: caption length in tokens (EOS included).
        batch_size: samples per batch.
        aug: crop/flip settings.
        seed: base seed of shard order, shuffling and augmentation.
        rank, world: this process's place in data parallelism.
        shuffle_buffer: samples kept for shuffling (0: file order).
        split_by: "shards" (train: each rank/worker reads its own shards) or "samples" (every reader scans all
            shards and keeps every k-th sample: for small validation sets).
        start_batch: global batches already consumed (resume).
    """

    def __init__(
        self,
        shards: list[str],
        tokenizer: Tokenizer,
        text_len: int,
        batch_size: int,
        aug: Augment,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        shuffle_buffer: int = 1000,
        split_by: str = "shards",
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        self.shards, self.tokenizer, self.text_len, self.batch_size = shards, tokenizer, text_len, batch_size
        self.aug, self.seed, self.rank, self.world = aug, seed, rank, world
        self.shuffle_buffer, self.split_by, self.start_batch = shuffle_buffer, split_by, start_batch
        self.skipped: Counter[str] = Counter()

    def _count_read_error(self, exn: Exception) -> bool:
        self.skipped["read"] += 1
        return True  # keep going

    def _raw(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        """Raw samples for this reader, epoch after epoch."""
        reader, readers = self.rank * workers + worker, self.world * workers
        epoch = 0
        while True:
            if self.split_by == "shards":
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
                mine = [self.shards[i] for i in order[reader::readers]]
                if not mine:
                    raise ValueError(
                        f"{len(self.shards)} shards cannot feed {self.world} ranks x {workers} workers: "
                        f"use at least {readers} shards or fewer data.num_workers"
                    )
            else:
                mine = list(self.shards)
            stream = tarfile_samples(({"url": u} for u in mine), handler=self._count_read_error)
            n = 0
            for i, sample in enumerate(stream):
                if self.split_by == "shards" or i % readers == reader:
                    n += 1
                    yield sample
            if n == 0:  # an endless loop over nothing would hang the run
                raise ValueError(f"reader {reader} of {readers} got no samples from its shards: {mine[:3]}...")
            epoch += 1

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buf: list[dict[str, Any]] = []
        for s in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], s = s, buf[j]
            yield s
        # the stream is endless: the buffer is never drained

    def _decoded(self, worker: int, workers: int) -> Iterator[tuple[str, np.ndarray, str]]:
        rng = np.random.default_rng([self.seed, self.rank, worker, 1])
        for s in self._shuffled(self._raw(worker, workers), rng):
            key = str(s.get("__key__"))
            image_key = next((k for k in IMAGE_KEYS if k in s), None)
            if image_key is None:
                self.skipped["no_image"] += 1
                continue
            caption = caption_of(s)
            if caption is None:
                self.skipped["caption"] += 1
                continue
            try:
                image = decode_image(s[image_key], self.aug, rng)
            except Exception:  # PIL raises many types for corrupt data: any failure is a bad sample
                self.skipped["image"] += 1
                continue
            yield key, image, caption

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Batches go out round-robin over workers: global batch g comes from worker g % workers.
        skip = max(0, -(-(self.start_batch - worker) // workers))
        samples = self._decoded(worker, workers)
        for _ in range(skip * self.batch_size):
            next(samples)
        while True:
            keys, images, captions = zip(*(next(samples) for _ in range(self.batch_size)), strict=True)
            text, mask = encode_captions(self.tokenizer, list(captions), self.text_len)
            yield {
                "image": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),  # [B, 3, S, S]
                "text": text,
                "text_mask": mask,
                "key": list(keys),
                "skipped": dict(self.skipped),
                "worker": worker,
            }
