"""The fields an objective reads: labels in batches, image-only streams."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aimpre.data import Augment, ByteTokenizer, ImageTextStream, shard_set
from aimpre.data.decode import sample_label
from helpers import jpeg, write_tar

LABEL = frozenset({"label"})


def stream(path: Path, need: frozenset[str], batch: int, **kw) -> ImageTextStream:
    return ImageTextStream([shard_set(str(path))], ByteTokenizer(), 32, batch, Augment(32), shuffle=0, need=need, **kw)


def first(ds: ImageTextStream) -> dict:
    return next(iter(ds))


def mixed(tmp_path: Path) -> Path:
    """Twelve samples: labelled with and without captions, and every way a label can be missing or wrong."""
    img = jpeg()
    samples = [  # the bad ones first: a first batch reads them all
        {"__key__": "no-image", "txt": "x", "cls": "0"},
        {"__key__": "no-label", "jpg": img, "txt": "a caption, no label"},
        {"__key__": "json-no-label", "jpg": img, "json": json.dumps({"caption": "x"})},
        {"__key__": "word", "jpg": img, "cls": "seven"},
        {"__key__": "negative", "jpg": img, "cls": "-1"},
        {"__key__": "fraction", "jpg": img, "json": json.dumps({"label": 2.5})},
        {"__key__": "bool", "jpg": img, "json": json.dumps({"label": True})},
        {"__key__": "broken-json", "jpg": img, "json": b"{not json"},
        {"__key__": "nocap-json-cls", "jpg": img, "json": json.dumps({"cls": "13"})},
        {"__key__": "cap-cls", "jpg": img, "txt": "a caption", "cls": "3"},
        {"__key__": "nocap-cls", "jpg": img, "cls": b"1\n"},
        {"__key__": "nocap-json", "jpg": img, "json": json.dumps({"label": 2})},
    ]
    return write_tar(tmp_path / "mixed.tar", samples)


def test_label_batches_skip_and_count_samples_without_a_usable_label(tmp_path: Path) -> None:
    batch = first(stream(mixed(tmp_path), LABEL, 4))  # the whole shard (12 samples) fills one batch of 4
    assert batch["key"] == ["nocap-json-cls", "cap-cls", "nocap-cls", "nocap-json"]  # no caption needed
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [13, 3, 1, 2]
    assert batch["image"].shape == (4, 3, 32, 32) and "text" not in batch and "text_mask" not in batch
    assert batch["state"]["skipped"] == {"no_label": 2, "bad_label": 5, "no_image": 1}


def test_labels_at_or_above_num_classes_are_bad_samples(tmp_path: Path) -> None:
    batch = first(stream(mixed(tmp_path), LABEL, 3, num_classes=13))  # label 13 is out of 0..12
    assert batch["label"].tolist() == [3, 1, 2]
    assert batch["state"]["skipped"] == {"bad_label": 6, "no_label": 2, "no_image": 1}


def test_an_image_only_stream_keeps_samples_without_captions_or_labels(tmp_path: Path) -> None:
    batch = first(stream(mixed(tmp_path), frozenset(), 6))
    assert batch["key"] == ["no-label", "json-no-label", "word", "negative", "fraction", "bool"]
    assert set(batch) == {"image", "key", "worker", "state"}
    assert batch["state"]["skipped"] == {"no_image": 1}


def test_text_and_label_together_need_both(tmp_path: Path) -> None:
    batch = first(stream(mixed(tmp_path), frozenset({"text", "label"}), 1))
    assert batch["key"] == ["cap-cls"] and batch["label"].tolist() == [3] and batch["text"].shape == (1, 32)


def test_unknown_fields_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown sample fields \\['caption'\\]"):
        stream(mixed(tmp_path), frozenset({"caption"}), 1)


def test_probe_and_training_read_labels_alike() -> None:
    assert sample_label({"cls": b" 4\n"}) == (4, None) and sample_label({"json": b'{"cls": "5"}'}) == (5, None)
    assert sample_label({"txt": b"x"}) == (None, "no_label") and sample_label({"cls": b"\xff"}) == (None, "bad_label")
