"""``aimpre bench loader``: images/s of our pipeline and of a plain webdataset pipeline, in one run.

Plain: ``wds.WebDataset(urls).decode("pil").to_tuple("jpg", "txt")`` + torchvision
``RandomResizedCrop(224)`` + ``ToTensor()`` (float), batched by the DataLoader. Ours: ``ImageTextStream`` at
224 px (header-first crop box, draft decode, one bicubic resize, uint8, captions tokenised) through the
``StreamLoader`` training uses. Both run in the same
number of DataLoader worker processes over the same shards; each is timed after a warm-up. The two alternate
over several rounds (a fresh DataLoader each round, so no idle loader prefetches while the other is timed) and
the median round of each is reported with the spread, so a noisy neighbour on a shared machine shows as spread
rather than as a bias against whichever pipeline ran second.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from aimpre.data.decode import Augment
from aimpre.data.pipeline import ImageTextStream, StreamLoader
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
    return torch.utils.data.DataLoader(
        ds, batch_size=batch, num_workers=workers, prefetch_factor=4 if workers > 0 else None
    )


def _ours(spec: str, batch: int, workers: int) -> StreamLoader:
    stream = ImageTextStream(
        [shard_set(spec, need_counts=False)], ByteTokenizer(), 77, batch, Augment(224), resampled=True, shuffle=1000
    )
    return StreamLoader(stream, workers, prefetch_factor=4)


def _cpu_seconds() -> float | None:
    """User + system CPU time of this process and its live child processes (the DataLoader workers), from
    Linux's /proc; None elsewhere."""
    total = time.process_time()
    try:
        for child in multiprocessing.active_children():
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    return total


def _rate(loader: torch.utils.data.DataLoader, batch: int, warmup: int, batches: int) -> tuple[float, float | None]:
    """(images per second of wall time, images per CPU-second of the main process and its workers)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for _ in range(batches):
        next(it)
    t1, c1 = time.perf_counter(), _cpu_seconds()
    del it  # shuts the workers down before the next loader starts
    n = batches * batch
    return n / (t1 - t0), (n / (c1 - c0) if c0 is not None and c1 is not None and c1 > c0 else None)


def bench_loader(
    spec: str, workers: int = 1, batch: int = 64, batches: int = 30, warmup: int = 3, rounds: int = 3
) -> list[dict]:
    """Measures both pipelines, alternating, ``rounds`` times each; returns per pipeline the median round's
    ``img_per_s`` (wall), ``per_worker``, ``vs_plain``, ``low``/``high`` (slowest and fastest round), and
    ``img_per_cpu_s`` with ``cpu_vs_plain``: images per CPU-second summed over the main process and the workers
    (the cost per core, whatever else shares the machine; None where /proc is missing)."""
    urls = expand_shards(spec)
    runs: dict[str, list[tuple[float, float | None]]] = {"plain": [], "ours": []}
    for _ in range(rounds):
        runs["plain"].append(_rate(_plain(urls, batch, workers), batch, warmup, batches))
        runs["ours"].append(_rate(_ours(spec, batch, workers), batch, warmup, batches))
    names = {"plain": "plain webdataset + torchvision (float)", "ours": "aimpre ImageTextStream (uint8)"}
    rates = {key: [r for r, _ in rs] for key, rs in runs.items()}
    cpu_rates = {key: [c for _, c in rs if c is not None] for key, rs in runs.items()}
    cpu = {key: float(np.median(cs)) if len(cs) == rounds else None for key, cs in cpu_rates.items()}
    plain, plain_cpu = float(np.median(rates["plain"])), cpu["plain"]
    rows = []
    for key, name in names.items():
        rate, c = float(np.median(rates[key])), cpu[key]
        rows.append({"pipeline": name, "workers": workers, "img_per_s": rate, "per_worker": rate / max(1, workers),
                     "vs_plain": rate / plain, "low": min(rates[key]), "high": max(rates[key]), "img_per_cpu_s": c,
                     "cpu_vs_plain": c / plain_cpu if c is not None and plain_cpu else None})  # fmt: skip
    return rows
