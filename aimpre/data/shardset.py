"""Shard sets: URLs from specs, and the number of samples in each shard.

Epoch-based reading needs per-shard sample counts to give every rank and worker the same number of batches.
They come from an index file given as ``data.index`` (any URL kind, matched by the shard's ``*.tar`` name), an
``index.json`` beside local shards (written by ``aimpre data make-shards``, ``aimpre data demo`` and
``aimpre data index``), or, for local shards without one, a scan of the tar headers (no data read). Resampled
reading needs no counts, so ``pipe:`` sources without an index work there.

A sample is the group of consecutive tar members sharing a key: the member name up to the first dot of its
base name (webdataset's rule), e.g. ``abc/000123.jpg`` and ``abc/000123.txt`` form sample ``abc/000123``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from webdataset.shardlists import expand_urls

from aimpre.data.tario import group_samples, tar_members
from aimpre.files import read_json, write_text

INDEX = "index.json"
_TAR_NAME = re.compile(r"([^/\s]+\.tar)\b")


def shard_name(url: str) -> str:
    """The ``*.tar`` file name inside a URL or ``pipe:`` command (the key of index files)."""
    names = _TAR_NAME.findall(url)
    return names[-1] if names else os.path.basename(url)


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None  # None: unknown (a pipe: URL without an index)


def starts_process(url: str) -> bool:
    """Whether reading ``url`` starts a process: webdataset opens a URL with a scheme (``pipe:`` in a shell, in
    any case; http, gs, hf, ... through curl or gsutil) by running a command, and only a plain path as a file."""
    return urlparse(url).scheme != ""


def is_local(url: str) -> bool:
    return not starts_process(url)


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard spec -> URLs: brace expansion (``/data/{00000..09999}.tar``); ``::`` or a list joins several specs;
    a local directory stands for the ``*.tar`` files in it.

    Local paths must exist (the error names the first missing one); ``pipe:`` and other URLs are kept as-is.
    """
    specs = spec if isinstance(spec, list) else [spec]
    urls = [u for s in specs for u in expand_urls(s.strip()) if u]
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    urls = [t for u in urls for t in (_dir_shards(u) if is_local(u) and os.path.isdir(u) else [u])]
    for u in urls:
        if is_local(u) and not os.path.exists(u):
            raise FileNotFoundError(f"shard not found: {u} (from spec {spec!r})")
    return urls


def _dir_shards(path: str) -> list[str]:
    """A directory as a spec: the ``*.tar`` files in it, in name order."""
    names = sorted(n for n in os.listdir(path) if n.endswith(".tar") and os.path.isfile(os.path.join(path, n)))
    if not names:
        raise FileNotFoundError(
            f"shard spec {path!r} is a directory without *.tar files; name the shards, e.g. "
            f"'{path.rstrip('/')}/shard-{{000000..000009}}.tar'"
        )
    return [os.path.join(path, n) for n in names]


def count_samples(path: str) -> int:
    """Samples in a local tar, from its headers alone (member data is seeked over): those reading yields, with
    the same resynchronisation past damage. An unreadable file counts 0; reading will count its errors."""
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in group_samples(tar_members(f, read=False, resync=True), damaged=lambda e: None))
    except OSError:
        return 0


def read_index(path: Path) -> dict[str, int]:
    """``{shard file name: samples}`` from an index file (or a directory's ``index.json``); {} if there is none."""
    path = path / INDEX if path.is_dir() else path
    if not path.exists():
        return {}
    raw = read_json(path, "shard index")  # bounded, and a FIFO named as data.index is refused, not waited on
    counts = raw.get("shards", {}) if isinstance(raw, dict) else None
    if not isinstance(counts, dict) or not all(isinstance(v, int) and v >= 0 for v in counts.values()):
        raise ValueError(f"{path}: 'shards' must map shard names to sample counts")
    return counts


def write_index(path: Path, counts: dict[str, int], **extra: object) -> Path:
    """Writes (atomically) an index with per-shard sample counts and any extra fields (a directory: its
    ``index.json``)."""
    path = path / INDEX if path.is_dir() else path
    write_text(path, json.dumps({"version": 1, **extra, "shards": counts}, indent=2))
    return path


def shard_set(spec: str | list[str], need_counts: bool = True, index: str | None = None) -> list[Shard]:
    """The shards of a spec with their sample counts.

    Args:
        spec: a shard spec or list of specs.
        need_counts: raise if a count cannot be had (epoch mode); otherwise unknown counts are None.
        index: an index file to take counts from first (for ``pipe:`` and remote shards).
    """
    given = read_index(Path(index)) if index else {}
    if index and not given:
        raise FileNotFoundError(f"data.index: no shard counts in {index}")
    shards = []
    indexes: dict[str, dict[str, int]] = {}
    for url in expand_shards(spec):
        n = given.get(shard_name(url))
        directory = os.path.dirname(url) if is_local(url) else ""
        if n is None and directory:
            if directory not in indexes:
                indexes[directory] = read_index(Path(directory)) if os.path.isdir(directory) else {}
            n = indexes[directory].get(os.path.basename(url))
        if n is None and is_local(url):
            n = count_samples(url)
        if n is None and need_counts:
            raise ValueError(
                f"no sample count for {url}: epoch-based reading needs them. Write one with "
                f"`aimpre data index SPEC [--out FILE]` (then data.index=FILE), or set data.resampled=true"
            )
        shards.append(Shard(url, n))
    return shards
