"""Writing webdataset shards (img2dataset layout: ``KEY.jpg`` + ``KEY.txt``, optional ``KEY.json``/``KEY.cls``)."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_shards(samples: Iterable[dict[str, Any]], out_dir: Path, prefix: str, per_shard: int) -> dict[str, int]:
    """Writes ``{prefix}-000000.tar, ...`` into ``out_dir``; returns {shard file name: samples}.

    Args:
        samples: dicts with ``__key__`` and extension keys (bytes, or str for text), as webdataset's TarWriter takes.
        out_dir: an existing directory.
        prefix: shard name prefix.
        per_shard: samples per shard.
    """
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    total = 0
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
            total += 1
        n = sink.shard
    return {Path(pattern % i).name: min(per_shard, total - i * per_shard) for i in range(n)}


def publish_dir(tmp: Path, final: Path) -> Path:
    """Moves a fully written temp directory into place; if another process won the race, keeps theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise
    return final
