"""Test helpers: real shards, real images."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import webdataset as wds
from PIL import Image

if TYPE_CHECKING:
    import torch


def jpeg(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour[: len(mode)]).save(buf, format="JPEG")
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_csv(path: Path, rows: list[dict]) -> Path:
    """A CSV with the first row's keys as its header (tables as ``aimpre scaling collect`` writes them)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A real webdataset shard: each dict has ``__key__`` and extension -> bytes/str members."""
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return path


def good_samples(prefix: str, n: int) -> list[dict]:
    return [{"__key__": f"{prefix}{i:05d}", "jpg": jpeg(((i * 37) % 256, 80, 160)), "txt": f"{prefix} {i}"}
            for i in range(n)]  # fmt: skip


def rows_when_killed(proc: subprocess.Popen, rows_file: Path, kill: Callable[[], None], timeout: float = 120) -> list:
    """The JSON lines a bench process wrote to ``rows_file`` once it has written its first one, read after
    ``kill()`` stopped it (or it ended, or ``timeout`` passed): what a bench cut by a time limit leaves behind."""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if rows_file.exists() and rows_file.read_text().count("\n") >= 1:
                break
            time.sleep(0.1)
    finally:
        kill()
        proc.wait()
    return [json.loads(line) for line in rows_file.read_text().splitlines()]


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its init (norm weights off 1, conv bias off 0) so a wrong mapping shows."""
    import torch  # here: the other helpers serve subprocess tests that need no torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def metric_rows(run: Path) -> dict[int, dict[str, str]]:
    """A run's metrics.csv training rows (those with a loss), by step."""
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): r for r in csv.DictReader(f) if r["loss"]}
