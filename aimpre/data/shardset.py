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

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from webdataset.shardlists import envsubst, expand_urls

from aimpre.data.tario import group_samples, tar_members
from aimpre.files import UntrustedInputError, read_json, write_text

INDEX = "index.json"
MAX_SHARDS = 2_000_000  # URLs one spec may expand to: 12.8B samples at 10k per shard are 1.3M shards
MAX_SHARD_SAMPLES = 10_000_000  # samples one shard may hold by an index (their headers alone would be 5 GB)
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
    for s in specs:
        n = sum(_expansion_size(envsubst(part)) for part in s.strip().split("::"))
        if n > MAX_SHARDS:
            raise ValueError(f"shard spec {s!r} expands to {n} shards, over the {MAX_SHARDS} one spec may name")
    urls = [u for s in specs for u in expand_urls(s.strip()) if u]
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    urls = [t for u in urls for t in (_dir_shards(u) if is_local(u) and os.path.isdir(u) else [u])]
    for u in urls:
        if is_local(u) and not os.path.exists(u):
            raise FileNotFoundError(f"shard not found: {u} (from spec {spec!r})")
    return urls


_RANGE = re.compile(r"^(-?\d+|[a-zA-Z])\.\.(-?\d+|[a-zA-Z])(?:\.\.(-?\d+))?$")


def _expansion_size(pattern: str) -> int:
    """How many strings brace expansion makes of ``pattern`` (an upper bound), counted without expanding it:
    braceexpand builds every range as a tuple first, so ``{0..99999999}`` alone would take gigabytes."""
    total, i = 1, 0
    while (i := pattern.find("{", i)) != -1:
        depth, j, cuts = 0, i, []
        for j in range(i, len(pattern)):
            depth += {"{": 1, "}": -1}.get(pattern[j], 0)
            if depth == 1 and pattern[j] == ",":
                cuts.append(j)
            if depth == 0:
                break
        if depth:  # unbalanced: the rest is literal
            break
        body = pattern[i + 1 : j]
        if cuts:
            bounds = [i, *cuts, j]
            total *= sum(_expansion_size(pattern[a + 1 : b]) for a, b in itertools.pairwise(bounds))
        elif m := _RANGE.match(body):
            lo, hi = (int(x) if x.lstrip("-").isdigit() else ord(x) for x in m.group(1, 2))
            total *= abs(hi - lo) // max(1, abs(int(m.group(3) or 1))) + 1
        else:
            total *= _expansion_size(body)
        i = j + 1
    return total


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


def index_path(path: Path) -> Path:
    """An index file, or a directory's ``index.json``."""
    return path / INDEX if path.is_dir() else path


def read_index_file(path: Path) -> dict[str, object]:
    """All of an index file (bounded in size and depth); {} if there is none."""
    path = index_path(path)
    if not path.exists():
        return {}
    doc = read_json(path, "shard index")  # bounded, and a FIFO named as data.index is refused, not waited on
    if not isinstance(doc, dict):
        raise UntrustedInputError(f"shard index {path} is not a JSON object")
    return doc


def read_index(path: Path) -> dict[str, int]:
    """``{shard file name: samples}`` from an index file (or a directory's ``index.json``); {} if there is none.

    Counts above ``MAX_SHARD_SAMPLES`` are refused here: reading pads a shard to its count, so an implausible one
    would loop for ever."""
    counts = read_index_file(path).get("shards", {})

    def ok(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SHARD_SAMPLES

    if not isinstance(counts, dict) or not all(ok(v) for v in counts.values()):
        bad = next((f"{k!r}: {v!r}" for k, v in counts.items() if not ok(v)), "") if isinstance(counts, dict) else ""
        raise UntrustedInputError(
            f"shard index {index_path(path)}: 'shards' must map shard names to sample counts in "
            f"0..{MAX_SHARD_SAMPLES}{f' (has {bad})' if bad else ''}"
        )
    return counts


def check_count(url: str, n: int, where: Path) -> None:
    """Refuses an index count a local shard cannot hold: every sample takes a 512-byte header at least."""
    if is_local(url) and os.path.isfile(url) and n > (size := os.path.getsize(url)) // 512:
        raise UntrustedInputError(
            f"shard index {where}: {shard_name(url)} is said to hold {n} samples, more than its {size} bytes can "
            f"({size // 512} at most); rewrite the index with `aimpre data index`"
        )


def write_index(path: Path, counts: dict[str, int], **extra: object) -> Path:
    """Writes (atomically) an index with per-shard sample counts and any extra fields (a directory: its
    ``index.json``)."""
    path = index_path(path)
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
        if n is not None:
            check_count(url, n, Path(str(index)))
        directory = os.path.dirname(url) if is_local(url) else ""
        if n is None and directory:
            if directory not in indexes:
                indexes[directory] = read_index(Path(directory)) if os.path.isdir(directory) else {}
            n = indexes[directory].get(os.path.basename(url))
            if n is not None:
                check_count(url, n, Path(directory) / INDEX)
        if n is None and is_local(url):
            n = count_samples(url)
        if n is None and need_counts:
            raise ValueError(
                f"no sample count for {url}: epoch-based reading needs them. Write one with "
                f"`aimpre data index SPEC [--out FILE]` (then data.index=FILE), or set data.resampled=true"
            )
        shards.append(Shard(url, n))
    return shards
