"""Whole-set passes over shards: ``aimpre data inspect`` (vet a data set through the training decode) and the
caption source for ``aimpre data train-tokenizer``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm

from aimpre.data.decode import SKIP_REASONS, Augment, caption_of, decode_sample
from aimpre.data.reader import ReadErrors, Segment, segment_samples
from aimpre.data.shardset import Shard
from aimpre.data.tokenizer import Tokenizer, encode_captions


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
            # a count of 0 (an unreadable shard) still reads it, so its damage is reported
            for sample in segment_samples(Segment(shard.url, 0, shard.samples or None), errors):
                counts["read"] += 1
                out = decode_sample(sample, self.aug, rng)
                if isinstance(out, str):
                    counts[out] += 1
                else:
                    counts["kept"] += 1
                    captions += [out[1]] if out[1] is not None else []
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
    for part in tqdm(loader, total=len(shards), desc="inspect", unit="shard"):
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
            caption, _ = caption_of(sample) if sample is not None else (None, None)
            if caption is not None:
                yield caption
                n += 1
                if limit is not None and n >= limit:
                    return
