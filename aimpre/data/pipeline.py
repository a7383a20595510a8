"""The loading pipeline: raw tar samples -> decoded, cropped uint8 images + token ids and labels, in batches.

Each DataLoader worker is one reader (rank r, worker k of K is reader r*K + k). Everything a reader does is a
function of (seed, reader, position): the order (``aimpre.data.reader``) and the crop/flip of each sample (an
RNG seeded by its position). Every batch carries its reader's state *after* it; restarting a reader from that
state continues with exactly the samples it would have read next: no replay, nothing repeated or skipped.

Batch: ``image`` uint8 [B, 3, S, S], ``key`` list[str], ``worker`` int, ``state`` dict (position, and running
counts of skips by reason and of read errors); with what the objective needs (``need``, as
``aimpre.objectives.needs`` says): ``text`` int64 [B, L] and ``text_mask`` bool [B, L] for "text", ``label``
int64 [B] for "label". A sample lacking a needed field is skipped and counted; one lacking an unneeded one is kept.
With ``native`` (``data.native``), each batch has its own canvas: ``image`` uint8 [B, 3, rows*p, cols*p], whole
images with their aspect kept, zero-padded, and ``grid`` int64 [B, 2] each image's own rows and columns; B and the
canvas come from the worker's batch index (``_native_batches``).

``StreamLoader`` is the DataLoader for it: its workers stack images into a few reused shared-memory buffers
instead of fresh ones for every batch.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aimpre.data.decode import FIELDS, SKIP_REASONS, Augment, decode_fields
from aimpre.data.native import Native, batch_size_for, draw_area, grid_of, native_span, pad_to_canvas
from aimpre.data.reader import ReadErrors, chunk_shuffled, epoch_plan, resampled_draw, source_choices
from aimpre.data.shardset import Shard
from aimpre.data.tokenizer import Tokenizer, encode_captions

__all__ = ["SKIP_REASONS", "Augment", "ImageTextStream", "StreamLoader", "batches_per_epoch"]


def batches_per_epoch(sources: list[list[Shard]], batch_size: int, readers: int) -> int:
    """Batches each reader yields per epoch: the same for all, so no rank ever waits on another."""
    total = sum(s.samples or 0 for shards in sources for s in shards)
    m = total // (readers * batch_size)
    if m == 0:
        urls = [s.url for shards in sources for s in shards]
        where = urls[0] if len(urls) == 1 else f"{len(urls)} shards ({urls[0]} ... {urls[-1]})"
        raise ValueError(
            f"{total} samples in {where} cannot fill one batch of {batch_size} for each of {readers} readers "
            f"(ranks x data.num_workers): lower data.batch_size or data.num_workers, or add data"
        )
    return m


class ImageTextStream(IterableDataset):
    """An endless, resumable stream of batches.

    Args:
        sources: shard sets; in epoch mode they are read as one, in resampled mode mixed by ``weights``.
        tokenizer: caption tokenizer.
        text_len: caption length in tokens (EOS included).
        batch_size: samples per batch.
        aug: crop/flip/size-limit settings.
        weights: source mixing weights (resampled mode); None: equal.
        resampled: draw shards with replacement instead of reading epochs.
        seed: base seed of order, shuffling and augmentation.
        rank, world: this process's place in data parallelism.
        shuffle: chunk size of the chunked permutation shuffle (<= 1: file order).
        resume: per-worker states (from batches' ``state``) to continue from; None entries start fresh.
        first_worker: the worker whose batch comes next (batches consumed % workers). The DataLoader always
            asks its slot 0 first, so slot j plays worker (j + first_worker) % workers.
        need: the fields besides the image every sample must have and every batch carries: a subset of
            {"text", "label"} (``aimpre.objectives.needs(objective)``).
        num_classes: with "label" needed, labels must lie in 0..num_classes-1 (others are skipped as
            "bad_label"); None: any non-negative label.
        native: native-resolution batches (``aimpre.data.native``): each batch draws its area from (seed, worker,
            the worker's batch index), holds ``batch_size_for`` images fitted to its canvas, aspect kept, and
            carries ``grid``; ``batch_size`` is then unused. None: square crops of ``aug.size``.
    """

    def __init__(
        self,
        sources: list[list[Shard]],
        tokenizer: Tokenizer,
        text_len: int,
        batch_size: int,
        aug: Augment,
        *,
        weights: list[float] | None = None,
        resampled: bool = False,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        shuffle: int = 1000,
        resume: list[dict[str, Any] | None] | None = None,
        first_worker: int = 0,
        need: frozenset[str] = frozenset({"text"}),
        num_classes: int | None = None,
        native: Native | None = None,
    ) -> None:
        super().__init__()
        if not resampled and weights is not None:
            raise ValueError("data.weights mixes sources by sampling: it needs data.resampled=true")
        if not need <= FIELDS:
            raise ValueError(f"unknown sample fields {sorted(need - FIELDS)}; known: {sorted(FIELDS)}")
        self.need, self.num_classes = frozenset(need), num_classes
        self.sources, self.tokenizer, self.text_len, self.batch_size = sources, tokenizer, text_len, batch_size
        self.aug, self.weights, self.resampled = aug, weights or [1.0] * len(sources), resampled
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        self.resume = resume or []
        self.first_worker = first_worker
        self.native = native
        # set by StreamLoader: per worker, how many of its shared image buffers the consumer has released
        self.released: torch.Tensor | None = None
        self.buffers = 0

    # -- raw samples, each with the reader's state after it -------------------------------------------------

    def _resampled_samples(
        self, reader: int, state: dict[str, Any], errors: ReadErrors
    ) -> Iterator[tuple[dict[str, Any], Any]]:
        pos = state.get("pos", 0)
        src = [list(x) for x in state.get("src", [[0, 0]] * len(self.sources))]
        streams = [self._source(s, reader, src[s][0], src[s][1], errors) for s in range(len(self.sources))]
        while True:
            for s in source_choices(self.weights, [self.seed, reader, 7], pos, 256):
                draw, off, sample = next(streams[s])
                src[s] = [draw, off]
                pos += 1
                yield {"pos": pos, "src": [list(x) for x in src]}, sample

    def _source(self, s: int, reader: int, draw: int, off: int, errors: ReadErrors) -> Iterator[tuple[int, int, Any]]:
        empty = 0
        while True:
            seg = resampled_draw(self.sources[s], [self.seed, reader, s], draw)
            n = 0
            for q, sample in chunk_shuffled([seg], off, self.shuffle, [self.seed, reader, s, draw], errors):
                n += 1
                yield draw, q, sample
            empty = 0 if n else empty + 1
            if empty > 100:
                raise ValueError(f"source {s}: 100 shards drawn in a row gave no samples (last: {seg.url})")
            draw, off = draw + 1, 0

    # -- batches --------------------------------------------------------------------------------------------

    def _epoch_range(
        self, reader: int, span: int, epoch: int, pos: int, errors: ReadErrors
    ) -> Iterator[tuple[dict[str, Any], Any]]:
        """The reader's range of one epoch from ``pos``, wrapping around if bad samples leave it short."""
        shards = [s for source in self.sources for s in source]
        segments = epoch_plan(shards, self.seed, epoch, reader, span)
        while True:
            p = pos % span
            for q, sample in chunk_shuffled(segments, p, self.shuffle, [self.seed, epoch, reader], errors):
                yield {"epoch": epoch, "pos": pos - p + q}, sample
            pos = pos - p + span

    def _fill(
        self,
        samples: Iterator[tuple[dict[str, Any], Any]],
        reader: int,
        tally: _Tally,
        span: int,
        aug: Augment | None = None,
        size: int | None = None,
    ) -> tuple[_Kept, dict[str, Any]]:
        """Decodes samples until a batch is full (``size`` images, with ``aug``; None: the stream's); returns what
        was kept and the state after the last."""
        aug, size = aug or self.aug, size or self.batch_size
        kept = _Kept([], [], [], [])
        keys, images, captions, labels = kept
        since_kept = 0
        for st, sample in samples:
            # augmentation depends on the position only, so a resumed reader crops exactly as before
            rng = np.random.default_rng([self.seed, reader, st.get("epoch", 0), st["pos"]])
            out = decode_fields(sample, aug, rng, self.need, self.num_classes, self.text_len)
            if isinstance(out, str):
                tally.skipped[out] += 1
                since_kept += 1
                if since_kept > max(span, 10_000):
                    raise ValueError(f"reader {reader}: {since_kept} samples in a row were unusable: {tally.skipped}")
                continue
            since_kept = 0
            tally.repeated += int(span > 0 and st["pos"] > span)
            keys.append(str(sample["__key__"]))
            images.append(out[0])
            captions += [out[1]] if out[1] is not None else []  # present exactly when needed
            labels += [out[2]] if out[2] is not None else []
            if len(images) == size:
                return kept, st
        raise RuntimeError("sample stream ended")  # streams are endless

    def _batch(
        self, kept: _Kept, tally: _Tally, shm: _SharedBuffers | None, canvas: tuple[int, int] | None = None
    ) -> dict:
        """The batch of ``kept``; with ``canvas`` (rows, cols in patches) the images zero-padded to it, and ``grid``."""
        if canvas is None:
            out = shm.take((len(kept.images), *kept.images[0].shape)) if shm is not None else None
            batch: dict[str, Any] = {"image": torch.stack(kept.images, out=out), "key": kept.keys}  # [B, 3, S, S]
        else:
            assert self.native is not None
            p = self.native.patch
            out = shm.take((len(kept.images), 3, canvas[0] * p, canvas[1] * p)) if shm is not None else None
            batch = {
                "image": pad_to_canvas(kept.images, *canvas, p, out=out),  # [B, 3, rows*p, cols*p] uint8
                "grid": torch.tensor([grid_of(im, p) for im in kept.images], dtype=torch.int64),  # [B, 2]
                "key": kept.keys,
            }
        if "text" in self.need:
            text, mask = encode_captions(self.tokenizer, kept.captions, self.text_len)
            tally.truncated += int((mask.all(dim=1) & (text[:, -1] != self.tokenizer.eos_id)).sum())
            batch |= {"text": text, "text_mask": mask}
        if "label" in self.need:
            batch["label"] = torch.tensor(kept.labels, dtype=torch.int64)  # [B]
        return batch | ({SHARED: True} if out is not None else {})

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (slot + self.first_worker) % workers
        reader, readers = self.rank * workers + worker, self.world * workers
        state = dict(self.resume[worker] or {}) if worker < len(self.resume) else {}
        tally = _Tally(state)
        shm = None
        if info is not None and self.released is not None:  # a StreamLoader worker
            shm = _SharedBuffers(self.released, worker, self.buffers)
        if self.native is not None:
            yield from self._native_batches(worker, reader, readers, state, tally, shm)
        if self.resampled:
            samples = self._resampled_samples(reader, state, tally.errors)
            while True:
                kept, st = self._fill(samples, reader, tally, 0)
                batch = self._batch(kept, tally, shm)
                yield {**batch, "worker": worker, "state": {**st, **tally.state()}}
        m = batches_per_epoch(self.sources, self.batch_size, readers)
        span = m * self.batch_size
        epoch, pos, done = state.get("epoch", 0), state.get("pos", 0), state.get("batch", 0)
        while True:
            samples = self._epoch_range(reader, span, epoch, pos, tally.errors)
            while done < m:
                kept, st = self._fill(samples, reader, tally, span)
                done += 1
                after = {"epoch": epoch, "pos": st["pos"], "batch": done} if done < m else {"epoch": epoch + 1}
                batch = self._batch(kept, tally, shm)
                yield {**batch, "worker": worker, "state": {**after, **tally.state()}}
            epoch, pos, done = epoch + 1, 0, 0

    def _native_batches(
        self, worker: int, reader: int, readers: int, state: dict[str, Any], tally: _Tally, shm: _SharedBuffers | None
    ) -> Iterator[dict[str, Any]]:
        """Native batches, forever. The area of a worker's i-th batch is ``draw_area(seed, worker, i)``: the same on
        every rank (ranks have the same workers and the DataLoader takes them in turn), so all ranks run the same
        batch size and grid at every step. The state after a batch adds ``index`` (i + 1) to the reader's position.

        Epochs: each reader's range is its share of all samples (``native_span``); a batch that needs more samples
        than the range has left ends the epoch, the tail is dropped (fewer than one batch of the largest size) and
        that batch, with the area already drawn for it, starts the next epoch. Ranks may end epochs at different
        batches (bad samples are skipped where they are): areas depend on the batch index alone, never the epoch.
        """
        nat = self.native
        assert nat is not None
        index = state.get("index", 0)
        epoch, pos, span = state.get("epoch", 0), state.get("pos", 0), 0
        if self.resampled:
            samples = self._resampled_samples(reader, state, tally.errors)
        else:
            total = sum(s.samples or 0 for shards in self.sources for s in shards)
            span = native_span(total, nat, self.world, readers)
            samples = self._epoch_range(reader, span, epoch, pos, tally.errors)
        while True:
            area = draw_area(self.seed, worker, index, nat.lo, nat.hi)
            size = batch_size_for(area, nat.tokens_per_batch, self.world)
            if not self.resampled and span - pos < size:  # epoch end: drop the short tail
                epoch, pos = epoch + 1, 0
                samples = self._epoch_range(reader, span, epoch, pos, tally.errors)
            aug = replace(self.aug, canvas=(area.rows * nat.patch, area.cols * nat.patch))
            kept, st = self._fill(samples, reader, tally, span, aug, size)
            pos, index = st["pos"], index + 1
            batch = self._batch(kept, tally, shm, (area.rows, area.cols))
            yield {**batch, "worker": worker, "state": {**st, "index": index, **tally.state()}}


class _Kept(NamedTuple):
    """The samples of one batch; the list of a field the stream does not need stays empty."""

    keys: list[str]
    images: list[torch.Tensor]
    captions: list[str]
    labels: list[int]


SHARED = "shared_buffer"  # batch key: the images sit in a reused buffer the consumer must copy, then release


class StreamLoader(DataLoader):
    """The DataLoader of an ``ImageTextStream``; its workers reuse a few shared-memory image buffers.

    A DataLoader worker sends a tensor by copying it into newly allocated shared memory. The kernel hands out and
    zeroes those pages for every batch: about 0.13 ms per 224 px uint8 image on a 2-core VM, over a tenth of
    what decoding it costs (docs/benchmarks.md). Instead, each worker here stacks images into the next of
    ``prefetch_factor + 2`` buffers it keeps in shared memory (so /dev/shm holds that many batches of images
    per worker, where a DataLoader holds up to ``prefetch_factor``). This loader copies the images out
    (``pin_memory`` already has) before it hands the batch on, then counts the buffer as released in a shared
    per-worker counter. A worker whose buffers are all still out uses a fresh one, so no worker ever waits on
    the consumer, and every batch the caller receives is its own memory: keeping batches is safe.
    """

    def __init__(
        self,
        stream: ImageTextStream,
        num_workers: int = 0,
        *,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int = 4,
    ) -> None:
        if num_workers > 0:
            stream.released = torch.zeros(num_workers, dtype=torch.int64).share_memory_()
            stream.buffers = prefetch_factor + 2  # more than a worker can have in flight
        super().__init__(
            stream,
            batch_size=None,  # the stream batches
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            worker_init_fn=_WorkerInit(os.getpid()) if num_workers > 0 else None,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        released = self.dataset.released  # type: ignore[attr-defined]
        for batch in super().__iter__():
            if batch.pop(SHARED, False):
                if not self.pin_memory:  # pinning made the copy already; numpy copies on this thread alone
                    batch["image"] = torch.from_numpy(batch["image"].numpy().copy())
                released[batch["worker"]] += 1  # after the copy: the worker may now overwrite the buffer
            yield batch


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class _WorkerInit:
    """Start-up of a StreamLoader worker: stop signals are the trainer's business, and the worker dies with it.

    SLURM signals the whole process group; a worker that died of SIGTERM made the trainer fail with "DataLoader
    worker killed by signal" instead of saving its checkpoint, so workers ignore SIGTERM, SIGUSR1 and SIGINT. A
    worker outliving a SIGKILLed trainer (PyTorch's watchdog notices only after seconds) would keep the run lock,
    whose file description it inherited, so on Linux it asks the kernel to SIGKILL it when its parent dies.

    Args:
        parent: the pid of the process that starts the workers.
    """

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def __call__(self, worker_id: int) -> None:
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        if sys.platform.startswith("linux"):
            try:
                ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            except (OSError, AttributeError):  # no prctl in this libc: the watchdog still ends the worker
                return
            if os.getppid() != self.parent:  # the parent died before prctl: nobody will send the signal
                os._exit(0)


class _SharedBuffers:
    """A worker's reusable shared-memory image buffers (see StreamLoader)."""

    def __init__(self, released: torch.Tensor, worker: int, size: int) -> None:
        self.released, self.worker, self.size = released, worker, size
        self.before = int(released[worker])  # releases of earlier iterators (epochs, worker restarts)
        self.taken = 0
        self.tensors: list[torch.Tensor] = []

    def take(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The next buffer, or None while all of them are still with the consumer."""
        if self.taken - (int(self.released[self.worker]) - self.before) >= self.size:
            return None
        i = self.taken % self.size
        if i == len(self.tensors):
            self.tensors.append(torch.empty(shape, dtype=torch.uint8).share_memory_())
        # native batches change shape but not size (tokens per step are constant): a buffer is reshaped
        if self.tensors[i].numel() != math.prod(shape):
            return None
        self.taken += 1
        return self.tensors[i].view(shape)


class _Tally:
    """A reader's running counts, carried in every batch's state so they survive a resume."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.skipped: Counter[str] = Counter(state.get("skipped", {}))
        self.errors = ReadErrors(log=True)  # no report lists training's damage: each is logged where it is found
        self.errors.counts.update(state.get("errors", {}))
        self.truncated: int = state.get("truncated", 0)
        self.repeated: int = state.get("repeated", 0)

    def state(self) -> dict[str, Any]:
        return {
            "skipped": dict(self.skipped),
            "errors": dict(self.errors.counts),
            "truncated": self.truncated,
            "repeated": self.repeated,
        }
