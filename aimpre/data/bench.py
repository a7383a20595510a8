"""``aimpre bench loader``: images/s of our pipeline and of a plain webdataset pipeline, in one run.

Plain: ``wds.WebDataset(urls).decode("pil").to_tuple("jpg", "txt")`` + torchvision
``RandomResizedCrop(224)`` + ``ToTensor()`` (float), batched by the DataLoader. Ours: ``ImageTextStream`` at
224 px (header-first crop box, draft decode, one bicubic resize, uint8, captions tokenised). Both run in the same
number of DataLoader worker processes over the same shards; each is timed after a warm-up.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from aimpre.data.decode import Augment
from aimpre.data.pipeline import ImageTextStream
from aimpre.data.shards import write_shards
from aimpre.data.shardset import expand_shards, shard_set, write_index
from aimpre.data.tokenizer import ByteTokenizer


def synthetic_shards(out: Path, n: int, size: tuple[int, int] = (512, 384), per_shard: int = 250) -> str:
    """Writes ``n`` photo-like JPEGs (smooth colour fields with texture, q90) as shards; returns their spec."""
    rng = np.random.default_rng(0)

    def samples() -> Iterable[dict[str, Any]]:
        for i in range(n):
            noise = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
            field = Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC)
            pixels = np.asarray(field).astype(np.int16) + rng.integers(-12, 12, (size[1], size[0], 3))
            buf = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            yield {"__key__": f"{i:07d}", "jpg": buf.getvalue(), "txt": f"a synthetic photo number {i}"}

    out.mkdir(parents=True, exist_ok=True)
    counts = write_shards(samples(), out, "bench", per_shard)
    write_index(out, counts)
    return f"{out}/bench-{{000000..{len(counts) - 1:06d}}}.tar"


def _plain(urls: list[str], batch: int, workers: int) -> torch.utils.data.DataLoader:
    import torchvision.transforms as T
    import webdataset as wds

    transform = T.Compose([T.RandomResizedCrop(224), T.ToTensor()])
    ds = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map_tuple(transform, lambda t: t)
        .repeat()  # endless, like ours
    )
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)


def _ours(spec: str, batch: int, workers: int) -> torch.utils.data.DataLoader:
    stream = ImageTextStream(
        [shard_set(spec, need_counts=False)], ByteTokenizer(), 77, batch, Augment(224), resampled=True, shuffle=1000
    )
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4)


def _rate(loader: torch.utils.data.DataLoader, batch: int, warmup: int, batches: int) -> float:
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def bench_loader(spec: str, workers: int = 1, batch: int = 64, batches: int = 30, warmup: int = 3) -> list[dict]:
    """Measures both pipelines; returns rows of {pipeline, workers, images/s, per worker, vs plain}."""
    urls = expand_shards(spec)
    plain = _rate(_plain(urls, batch, workers), batch, warmup, batches)
    ours = _rate(_ours(spec, batch, workers), batch, warmup, batches)
    rows = []
    for name, rate in (("plain webdataset + torchvision (float)", plain), ("aimpre ImageTextStream (uint8)", ours)):
        rows.append({"pipeline": name, "workers": workers, "img_per_s": rate, "per_worker": rate / workers,
                     "vs_plain": rate / plain})  # fmt: skip
    return rows
