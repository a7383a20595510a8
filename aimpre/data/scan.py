"""Passes over shards: ``aimpre data inspect`` (vet a data set through the training decode), the caption source
for ``aimpre data train-tokenizer``, and the look at a shard set's first samples that refuses, before training,
data an objective cannot use (``check_fields``)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from aimpre.data.decode import MAX_SAMPLE_JSON, SKIP_REASONS, Augment, caption_of, decode_sample, sample_label
from aimpre.data.reader import ReadErrors, Segment, segment_samples, shard_samples
from aimpre.data.shardset import Shard
from aimpre.data.tokenizer import Tokenizer, encode_captions
from aimpre.progress import progress


class _Inspect(IterableDataset):
    """Each worker decodes whole shards (shard i goes to worker i % workers) and yields one count per shard."""

    def __init__(self, shards: list[Shard], aug: Augment, tokenizer: Tokenizer, text_len: int) -> None:
        super().__init__()
        self.shards, self.aug, self.tokenizer, self.text_len = shards, aug, tokenizer, text_len

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(worker, len(self.shards), workers):
            shard = self.shards[i]
            errors = ReadErrors()
            counts: Counter[str] = Counter()
            rng = np.random.default_rng(i)
            captions = []
            # the whole shard is read whatever its index says: more samples than it says are a stale index,
            # reported with the real count; fewer were lost to damage and count as "missing"
            n = 0
            for sample in segment_samples(Segment(shard.url, 0, None), errors):
                n += 1
                out = decode_sample(sample, self.aug, rng, self.text_len)
                if isinstance(out, str):
                    counts[out] += 1
                else:
                    counts["kept"] += 1
                    captions.append(out[1])
            if shard.samples is not None and n > shard.samples:
                errors.stale_index(shard.url, shard.samples, n)
            counts["missing"] += max(0, (shard.samples or 0) - n)
            counts["read"] += max(n, shard.samples or 0)
            if captions:  # the same tokenisation as training, for its truncation count
                text, mask = encode_captions(self.tokenizer, captions, self.text_len)
                counts["truncated"] += int((mask.all(dim=1) & (text[:, -1] != self.tokenizer.eos_id)).sum())
            yield {"counts": dict(counts), "errors": dict(errors.counts), "damage": errors.damage}


def inspect_shards(
    shards: list[Shard], aug: Augment, tokenizer: Tokenizer, text_len: int, workers: int = 2
) -> dict[str, Any]:
    """Reads every sample through the training decode; returns {"read", "kept", "skipped", "errors", ...}.

    ``read`` counts samples by key (with index counts, samples a truncated shard lost count as "missing");
    ``read == kept + sum(skipped)``. ``errors`` counts stream errors by reason (``tario.DAMAGE_REASONS``, or an
    exception type for a shard that cannot be opened) with the samples damage cost (``samples_lost``) and those
    read after it (``samples_recovered``); ``damage`` lists each damage: shard, reason, the byte offset where
    reading stopped and the one where it resumed (None: nothing after it was readable).
    """
    loader = torch.utils.data.DataLoader(
        _Inspect(shards, aug, tokenizer, text_len), batch_size=None, num_workers=min(workers, len(shards))
    )
    total: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    damage: list[dict[str, Any]] = []
    for part in progress(loader, "inspect", total=len(shards), unit="shard"):
        total.update(part["counts"])
        errors.update(part["errors"])
        damage += part["damage"]
    skipped = {r: total[r] for r in SKIP_REASONS if total[r]}
    return {
        "read": total["read"],
        "kept": total["kept"],
        "skipped": skipped,
        "errors": dict(errors),
        "damage": damage,
        "truncated_captions": total["truncated"],
        "shards": len(shards),
    }


def iter_captions(shards: list[Shard], limit: int | None = None) -> Iterator[str]:
    """Captions of a shard set in file order (unusable ones skipped), for tokenizer training."""
    errors = ReadErrors()
    n = 0
    for shard in shards:
        for sample in segment_samples(Segment(shard.url, 0, None), errors):
            # a caption's first MiB is more than a tokenizer learns from: the rest is never decoded
            caption, _ = caption_of(sample, MAX_SAMPLE_JSON) if sample is not None else (None, None)
            if caption is not None:
                yield caption
                n += 1
                if limit is not None and n >= limit:
                    return


PEEK = 64  # samples check_fields reads: enough to tell a data set without a field from a few damaged samples
_FIELD = {"text": 'a caption (KEY.txt, or "caption"/"text" in KEY.json)',
          "label": 'a label (KEY.cls, or "label"/"cls" in KEY.json)'}  # fmt: skip


def check_fields(url: str, need: frozenset[str], num_classes: int | None, key: str, why: str, n: int = PEEK) -> None:
    """Refuses (ValueError, one line naming ``key``, the file and a sample key) a shard set whose first shard
    ``url`` cannot feed the objective: none of its first ``n`` samples has a usable field of ``need``, or one has
    a label of ``num_classes`` or more (a wrong config, not a bad sample: training would skip a whole class).

    A few unusable samples are no reason to refuse: training skips and counts them. Only the samples' bytes are
    read, nothing is decoded. A shard that yields nothing (unreadable) passes: reading it in training counts it.

    Args:
        url: the first shard of the set.
        need: fields every sample must have (``aimpre.objectives.needs``).
        num_classes: labels must lie in 0..num_classes-1; None: not checked.
        key: the config key that names the shard set (e.g. ``data.train_shards``).
        why: who needs the fields, for the message (e.g. ``model.objective=classification``).
        n: samples to look at.
    """
    samples = list(itertools.islice(shard_samples(url, ReadErrors()), n))  # the dropped reader closes the shard
    for field in sorted(need):
        reasons = [(caption_of(s) if field == "text" else sample_label(s))[1] for s in samples]
        if samples and all(r is not None for r in reasons):
            raise ValueError(
                f"config key '{key}': {why} needs {_FIELD[field]} in every sample, but none of the first "
                f"{len(samples)} samples of {url} has a usable one (sample {samples[0]['__key__']!r}: {reasons[0]})"
            )
    if "label" in need and num_classes is not None:
        labelled = [(label, str(s["__key__"])) for s in samples if (label := sample_label(s)[0]) is not None]
        top, at = max(labelled, default=(-1, ""))
        if top >= num_classes:
            raise ValueError(
                f"config key 'model.num_classes': {num_classes}, but sample {at!r} of {url} has label {top} "
                f"(the largest in the first {len(samples)} samples); labels must lie in 0..{num_classes - 1}"
            )
