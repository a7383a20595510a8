"""Writing and naming webdataset shards (img2dataset layout: ``KEY.jpg`` + ``KEY.txt``, optional ``KEY.cls``)."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from webdataset.shardlists import expand_urls


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_shards(samples: Iterable[dict[str, Any]], out_dir: Path, prefix: str, per_shard: int) -> list[str]:
    """Writes ``{prefix}-000000.tar, ...`` into ``out_dir``; returns the shard file names.

    Args:
        samples: dicts with ``__key__`` and extension keys (bytes, or str for text), as webdataset's TarWriter takes.
        out_dir: an existing directory.
        prefix: shard name prefix.
        per_shard: samples per shard.
    """
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
        n = sink.shard
    return [Path(pattern % i).name for i in range(n)]


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard spec -> list of URLs: brace expansion (``/data/{00000..09999}.tar``), ``::`` separates several specs.

    Local paths must exist (the error names the first missing one); ``pipe:`` and other URLs are kept as-is.
    """
    specs = spec if isinstance(spec, list) else [spec]
    urls = [u for s in specs for u in expand_urls(s.strip()) if u]
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    for u in urls:
        if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u):
            raise FileNotFoundError(f"shard not found: {u} (from spec {spec!r})")
    return urls


def publish_dir(tmp: Path, final: Path) -> Path:
    """Moves a fully written temp directory into place; if another process won the race, keeps theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise
    return final
