"""Raw samples out of tar shards, in a deterministic, resumable order.

Two ways to read:
- epochs: each epoch permutes the shard order, lays all samples end to end and gives every reader
  (rank x worker) the same-sized contiguous range of that order. Every reader therefore yields the same number
  of batches, even with fewer shards than readers, and each sample is read once per epoch (the tail that does
  not fill a batch for every reader is dropped, a different one each epoch).
- resampled: each reader draws shards with replacement, forever (sample-count based training, source mixing).

Within a range, samples are shuffled in chunks: chunk c holds raw positions [c*C, (c+1)*C) and is permuted by
an RNG seeded with the chunk's index. Position p is therefore reproducible without replaying anything before
its chunk, so resuming costs at most one chunk of reading. Known-count shards that end early (truncated tars)
are padded with ``None`` so positions never shift.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from webdataset.tariterators import url_opener

from aimpre.data.shardset import (
    Shard,
    count_samples,
    expand_shards,
    is_local,
    read_index,
    read_index_file,
    shard_name,
    write_index,
)
from aimpre.data.tario import TarError, group_samples, tar_members

Sample = dict[str, Any]
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    url: str
    start: int  # first sample of the shard to read
    count: int | None  # samples to read; None: to the end of the shard
    ends_shard: bool = False  # start + count is the shard's count by its index: a sample after it means a stale one


class ReadErrors:
    """Counts stream errors by kind (a damage reason, an exception type, or a name like ``duplicate_member``)
    and carries on; keeps where each damage was (the first ``KEEP``) for reports.

    Also webdataset's exception handler for opening URLs: counts, never sleeps, never re-raises.
    """

    KEEP = 100

    def __init__(self, log: bool = False) -> None:
        """Args:
        log: also log each kept damage as a warning (training, where no report lists them).
        """
        self.counts: Counter[str] = Counter()
        self.damage: list[dict[str, Any]] = []
        self.log = log

    def count(self, kind: str) -> None:
        self.counts[kind] += 1

    def damaged(self, url: str, exn: TarError) -> None:
        self.note(url, exn.reason, str(exn), exn.offset, exn.resumed)

    def note(self, url: str, reason: str, error: str, offset: int | None = None, resumed: int | None = None) -> None:
        """Counts one damage of ``reason`` in shard ``url`` and keeps where it was."""
        self.count(reason)
        if len(self.damage) < self.KEEP:
            self.damage.append({"shard": url, "reason": reason, "offset": offset, "resumed": resumed, "error": error})
            if self.log:
                _log.warning("damaged shard %s: %s", url, error)

    def stale_index(self, url: str, declared: int, found: int | None) -> None:
        """Counts a shard holding more samples than its index says (``found``: how many, None if unknown)."""
        more = f"{found}" if found is not None else "more"
        self.note(url, "stale_index", f"its index says {declared} samples, it holds {more}; training reads only "
                  "the indexed ones (rewrite the index with `aimpre data index`)")  # fmt: skip

    def __call__(self, exn: Exception) -> bool:
        self.count(type(exn).__name__)
        return True


def shard_samples(url: str, errors: ReadErrors) -> Iterator[Sample]:
    """Samples of one shard (member bytes by field, plus ``__key__``); never unpickles or extracts anything.

    A shard that cannot be opened, or whose stream breaks (truncated or damaged tar, a failing ``pipe:``
    command), is counted in ``errors``. Reading resumes at the next intact header after damage, so only the
    samples the damage touches are lost (``tario.group_samples``); the same bytes always give the same samples,
    so positions in a damaged shard are as reproducible as in a whole one.
    """
    for source in url_opener([{"url": url}], handler=errors):
        stream = source["stream"]
        try:
            yield from group_samples(tar_members(stream, resync=True), errors.count, lambda e: errors.damaged(url, e))
        except OSError as exn:
            errors(exn)
        finally:
            try:
                stream.close()
            except Exception as exn:  # e.g. the exit status of a pipe: command
                errors(exn)


def segment_samples(seg: Segment, errors: ReadErrors) -> Iterator[Sample | None]:
    """The samples of a segment; a known-count segment always yields exactly ``count`` items (None = lost).

    A segment that ends its shard looks one sample further: one there means the index undercounts the shard,
    which is counted and reported (``stale_index``) rather than passed over in silence."""
    it = itertools.islice(shard_samples(seg.url, errors), seg.start, None)
    if seg.count is None:
        yield from it
        return
    n = 0
    for sample in itertools.islice(it, seg.count):
        n += 1
        yield sample
    if n == seg.count and seg.ends_shard and next(it, None) is not None:
        errors.stale_index(seg.url, seg.start + seg.count, count_samples(seg.url) if is_local(seg.url) else None)
    for _ in range(seg.count - n):
        yield None


def samples_from(segments: list[Segment], pos: int, errors: ReadErrors) -> Iterator[Sample | None]:
    """Samples of the concatenated segments from position ``pos``, skipping whole known-count segments."""
    for seg in segments:
        if seg.count is not None and pos >= seg.count:
            pos -= seg.count
            continue
        count = None if seg.count is None else seg.count - pos
        yield from segment_samples(Segment(seg.url, seg.start + pos, count, seg.ends_shard), errors)
        pos = 0


def chunk_shuffled(
    segments: list[Segment], start: int, chunk: int, seed: list[int], errors: ReadErrors
) -> Iterator[tuple[int, Sample | None]]:
    """(position after the sample, sample) from ``start``, in chunk-permuted order (chunk <= 1: file order)."""
    if chunk <= 1:
        yield from enumerate(samples_from(segments, start, errors), start + 1)
        return
    c = start // chunk
    source = samples_from(segments, c * chunk, errors)
    while True:
        block = list(itertools.islice(source, chunk))
        if not block:
            return
        order = np.random.default_rng([*seed, c]).permutation(len(block))
        first = c * chunk
        for i in range(max(0, start - first), len(block)):
            yield first + i + 1, block[order[i]]
        c += 1


def epoch_plan(shards: list[Shard], seed: int, epoch: int, reader: int, per_reader: int) -> list[Segment]:
    """Reader ``reader``'s range [reader * per_reader, (reader + 1) * per_reader) of the epoch's sample order."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    lo, hi = reader * per_reader, (reader + 1) * per_reader
    segments, offset = [], 0
    for i in order:
        n = shards[i].samples
        assert n is not None, "epoch plans need sample counts"
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            segments.append(Segment(shards[i].url, a - offset, b - a, b == offset + n))
        offset += n
        if offset >= hi:
            break
    return segments


def resampled_draw(shards: list[Shard], seed: list[int], draw: int) -> Segment:
    """The ``draw``-th shard drawn (with replacement) by a reader: a whole shard."""
    i = int(np.random.default_rng([*seed, draw]).integers(len(shards)))
    return Segment(shards[i].url, 0, shards[i].samples, shards[i].samples is not None)


def source_choices(weights: list[float], seed: list[int], start: int, n: int, block: int = 4096) -> np.ndarray:
    """Which source each raw position start..start+n-1 comes from; position i depends only on (seed, i)."""
    p = np.asarray(weights, dtype=np.float64) / sum(weights)
    out = []
    for b in range(start // block, (start + n - 1) // block + 1):
        choices = np.random.default_rng([*seed, b]).choice(len(p), size=block, p=p)
        lo, hi = max(start, b * block) - b * block, min(start + n, (b + 1) * block) - b * block
        out.append(choices[lo:hi])
    return np.concatenate(out)


def index_shards(spec: str | list[str], out: Path | None = None) -> list[Path]:
    """Counts the samples of every shard and writes index files; returns their paths.

    Local shards are counted from their tar headers and, without ``out``, indexed in the ``index.json`` of their
    own directory (merged with what is there). Other URLs (``pipe:``, http) are streamed once and need ``out``.
    """
    groups: dict[Path, dict[str, int]] = {}
    for url in expand_shards(spec):
        if out is None and not is_local(url):
            raise ValueError(f"{url} is not a local file: give --out FILE for the index (then data.index=FILE)")
        path = Path(out) if out is not None else Path(url).parent
        counts = groups.setdefault(path, read_index(path))
        counts[shard_name(url)] = (
            count_samples(url) if is_local(url) else sum(1 for _ in shard_samples(url, ReadErrors()))
        )
    # the other fields (what make-shards wrote: max_side, skips, ...) are provenance: kept as they were
    return [write_index(path, counts, **_provenance(path)) for path, counts in groups.items()]


def _provenance(path: Path) -> dict[str, Any]:
    return {k: v for k, v in read_index_file(path).items() if k not in ("version", "shards", "path", "counts")}
