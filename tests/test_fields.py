"""The fields an objective reads: labels in batches, image-only streams, and refusing shards that lack a field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aimpre.config import ConfigError, load_config
from aimpre.data import Augment, ByteTokenizer, ImageTextStream, shard_set
from aimpre.data.decode import sample_label
from aimpre.data.scan import PEEK
from aimpre.probe import read_labelled
from aimpre.train.baselines import baselines
from aimpre.train.module import AIMv2DataModule, AIMv2Module
from helpers import good_samples, jpeg, write_tar

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


def test_probe_and_training_read_labels_alike(tmp_path: Path) -> None:
    assert sample_label({"cls": b" 4\n"}) == (4, None) and sample_label({"json": b'{"cls": "5"}'}) == (5, None)
    assert sample_label({"txt": b"x"}) == (None, "no_label") and sample_label({"cls": b"\xff"}) == (None, "bad_label")
    _, labels, skipped = read_labelled([str(mixed(tmp_path))], 16)  # the probe counts skips by the same reasons
    assert labels.tolist() == [13, 3, 1, 2] and skipped == {"no_label": 2, "bad_label": 5, "no_image": 1}


# -- refusals before training ---------------------------------------------------------------------------------


def _cfg(train: Path | str, *extra: str, val: Path | str | None = None):
    return load_config(
        None,
        [f"data.train_shards={train}", f"data.val_shards={val if val is not None else 'null'}", "data.batch_size=4",
         "trainer.val_batches=1", *extra],
    )  # fmt: skip


def _check(cfg) -> None:
    AIMv2DataModule(cfg, ByteTokenizer()).check_shards()


def _labelled(path: Path, n: int, label=lambda i: i % 10) -> Path:
    return write_tar(path, [{**s, "cls": str(label(i))} for i, s in enumerate(good_samples("l", n))])


@pytest.mark.parametrize("objective", ["aimv2", "siglip", "clip"])
def test_a_text_objective_on_shards_without_captions_is_refused(tmp_path: Path, objective: str) -> None:
    bare = write_tar(tmp_path / "bare.tar", [{"__key__": f"k{i:03d}", "jpg": jpeg(), "cls": "1"} for i in range(80)])
    with pytest.raises(ConfigError) as e:
        _check(_cfg(f"{tmp_path}/bare.tar", f"model.objective={objective}"))
    assert str(e.value) == (
        f"config key 'data.train_shards': model.objective={objective} needs a caption (KEY.txt, or "
        f'"caption"/"text" in KEY.json) in every sample, but none of the first {PEEK} samples of {bare} has a usable '
        "one (sample 'k000': no_caption)"
    )
    _check(_cfg(bare, "model.objective=aimv1"))  # image only: the same shards are fine
    _check(_cfg(bare, "model.objective=classification", "model.num_classes=2"))


def test_a_classification_run_on_unlabelled_shards_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    shards = write_tar(tmp_path / "captions.tar", good_samples("cap", 20))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [f"run.out_dir={tmp_path}", "run.name=r", f"data.train_shards={shards}", "data.val_shards=null",
            "data.batch_size=4", "data.num_workers=0", "model.depth=1", "model.dec_depth=1", "trainer.max_steps=1",
            "model.objective=classification", "model.num_classes=14"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "aimpre", "train", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "aimpre: error: config key 'data.train_shards': model.objective=classification needs a label (KEY.cls, or "
        f'"label"/"cls" in KEY.json) in every sample, but none of the first 20 samples of {shards} has a usable one '
        "(sample 'cap00000': no_label)"
    )
    assert not (tmp_path / "r").exists()  # refused before the run directory (or the model) was made


def test_labels_beyond_num_classes_are_refused_naming_the_sample(tmp_path: Path) -> None:
    shards = _labelled(tmp_path / "l.tar", 30, label=lambda i: 13 if i == 17 else i % 5)
    with pytest.raises(ConfigError) as e:
        _check(_cfg(shards, "model.objective=classification", "model.num_classes=10"))
    assert str(e.value) == (
        f"config key 'model.num_classes': 10, but sample 'l00017' of {shards} has label 13 (the largest in the "
        "first 30 samples); labels must lie in 0..9"
    )
    _check(_cfg(shards, "model.objective=classification", "model.num_classes=14"))


def test_validation_shards_are_checked_too(tmp_path: Path) -> None:
    train = _labelled(tmp_path / "train.tar", 8)
    val = write_tar(tmp_path / "val.tar", good_samples("v", 8))
    with pytest.raises(ConfigError, match=f"^config key 'data.val_shards': .* samples of {val} .*'v00000': no_label"):
        _check(_cfg(train, "model.objective=classification", "model.num_classes=10", val=val))
    _check(_cfg(train, "model.objective=classification", "model.num_classes=10", "trainer.val_batches=0", val=val))


def test_a_few_bad_samples_are_left_to_training_to_skip(tmp_path: Path) -> None:
    """Only a shard set whose start has no usable field is refused: the odd bad sample is skipped and counted."""
    samples = [{**s, "cls": str(i % 3)} for i, s in enumerate(good_samples("g", 12))]
    samples[0] = {k: v for k, v in samples[0].items() if k != "cls"}
    samples[1] = {**samples[1], "cls": "many"}
    shards = write_tar(tmp_path / "g.tar", samples)
    cfg = _cfg(shards, "model.objective=classification", "model.num_classes=3", "data.num_workers=0")
    _check(cfg)
    dm = AIMv2DataModule(cfg, ByteTokenizer())
    batch = first(dm.stream(cfg.data.train_shards, "pretrain", train=False))
    assert batch["state"]["skipped"] == {"no_label": 1, "bad_label": 1} and batch["label"].tolist() == [2, 0, 1, 2]
    assert "text" not in batch


def test_every_source_of_a_mixture_is_checked(tmp_path: Path) -> None:
    a = _labelled(tmp_path / "a.tar", 8)
    b = write_tar(tmp_path / "b.tar", good_samples("b", 8))
    cfg = _cfg(a, "model.objective=classification", "model.num_classes=10", f"data.train_shards=[{a}, {b}]")
    with pytest.raises(ConfigError, match=f"samples of {b} has a usable one"):
        _check(cfg)


@pytest.mark.parametrize("need", [frozenset(), frozenset({"text"})])
def test_run_baselines_have_a_text_part_only_with_captions(tmp_path: Path, need: frozenset[str]) -> None:
    """aimv1's batches carry no captions: the run summary's baselines are then the mean patch alone."""
    module = AIMv2Module(load_config(None, ["model.depth=1", "model.dec_depth=1", "model.vocab_size=258"]))
    shard = write_tar(tmp_path / "s.tar", good_samples("s", 8))
    it = iter(ImageTextStream([shard_set(str(shard))], ByteTokenizer(), 96, 4, Augment(112), shuffle=0, need=need))
    out = baselines(module, [next(it)], [next(it)], lambda i, b: module.prefix_len(b, i))
    assert set(out) == {"loss_image_mean_patch", *(["loss_text_bigram"] if need else [])}
    assert all(v > 0 for v in out.values())
