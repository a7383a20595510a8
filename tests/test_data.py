from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from aimpre.data import Augment, ByteTokenizer, ImageTextStream, demo_shards, encode_captions, expand_shards
from aimpre.data.demo import BACKGROUNDS, COLOURS, digit_split, render_scene
from aimpre.data.pipeline import decode_image


def stream(shards: list[str], **kw) -> ImageTextStream:
    args = dict(tokenizer=ByteTokenizer(), text_len=48, batch_size=8, aug=Augment(112), seed=0, shuffle_buffer=64)
    return ImageTextStream(shards, **{**args, **kw})


def take(ds: ImageTextStream, n: int, workers: int = 0) -> list[dict]:
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("stream ended")


def test_demo_shards_are_plain_webdataset_tars(demo: Path) -> None:
    index = json.loads((demo / "index.json").read_text())
    assert set(index["splits"]) == {"pretrain", "val", "digits-train", "digits-test"}
    for split, info in index["splits"].items():
        samples = list(wds.WebDataset(demo_shards(split, demo), shardshuffle=False))
        assert len(samples) == info["samples"], split
        s = samples[0]
        assert Image.open(io.BytesIO(s["jpg"])).size == (128, 128)
        assert s["txt"].decode().strip()
        assert ("cls" in s) == split.startswith("digits")
    with tarfile.open(demo / "pretrain-000000.tar") as tar:  # readable with nothing but the standard library
        assert any(name.endswith(".jpg") for name in tar.getnames())


def test_held_out_digits_stay_out_of_pretraining(demo: Path) -> None:
    keys = lambda split: {s["__key__"] for s in wds.WebDataset(demo_shards(split, demo), shardshuffle=False)}
    pretrain, train, test = keys("pretrain"), keys("digits-train"), keys("digits-test")
    assert test and not (test & pretrain)
    assert train <= pretrain
    labels = np.repeat(np.arange(10), 180)
    tr, te = digit_split(labels)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(labels)
    assert all(abs((labels[te] == c).sum() - 54) <= 1 for c in range(10))  # stratified 30%


def test_scene_captions_describe_the_pixels() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        img, caption = render_scene(rng)
        pixels = {tuple(p) for p in np.asarray(img).reshape(-1, 3)}
        named = [c for c in COLOURS if f" {c} " in f" {caption} "]
        assert named and all(COLOURS[c] in pixels for c in named), caption
        bg = caption.rsplit(" on a ", 1)[1].split()[0]
        assert tuple(np.asarray(img)[0, 0]) == BACKGROUNDS[bg]


def test_batches(pretrain_spec: str) -> None:
    (batch,) = take(stream(expand_shards(pretrain_spec)), 1)
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 112, 112)
    assert batch["text"].dtype == torch.int64 and batch["text"].shape == (8, 48)
    assert batch["text_mask"].dtype == torch.bool and len(batch["key"]) == 8
    tok = ByteTokenizer()
    for ids, mask in zip(batch["text"], batch["text_mask"], strict=True):
        real = ids[mask].tolist()
        assert real[-1] == tok.eos_id or len(real) == 48  # caption + EOS, or cut at the length
        assert tok.decode(real).strip() == tok.decode(real)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_replays_exactly(pretrain_spec: str, workers: int) -> None:
    shards = expand_shards(pretrain_spec)
    full = take(stream(shards), 7, workers)
    resumed = take(stream(shards, start_batch=4), 3, workers)
    for a, b in zip(full[4:], resumed, strict=True):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])


def test_seed_changes_the_order(pretrain_spec: str) -> None:
    shards = expand_shards(pretrain_spec)
    assert take(stream(shards, seed=0), 1)[0]["key"] != take(stream(shards, seed=1), 1)[0]["key"]


def test_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    good = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(good, format="JPEG")
    samples = [
        {"__key__": "ok0", "jpg": good.getvalue(), "txt": "red"},
        {"__key__": "corrupt", "jpg": b"\xff\xd8 not a jpeg", "txt": "broken"},
        {"__key__": "empty", "jpg": b"", "txt": "zero bytes"},
        {"__key__": "nocaption", "jpg": good.getvalue()},
        {"__key__": "badutf8", "jpg": good.getvalue(), "txt": b"\xff\xfe\xfa"},
        {"__key__": "noimage", "txt": "caption only"},
        {"__key__": "ok1", "jpg": good.getvalue(), "json": json.dumps({"caption": "red again"}).encode()},
    ]
    path = tmp_path / "bad.tar"
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    (batch,) = take(stream([str(path)], batch_size=2, shuffle_buffer=0), 1)
    assert batch["key"] == ["ok0", "ok1"]
    assert batch["skipped"] == {"image": 2, "caption": 2, "no_image": 1}


def test_draft_decoding_keeps_content() -> None:
    img = Image.new("RGB", (1600, 1200), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 800, 1200))  # left half red
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    out = decode_image(buf.getvalue(), Augment(112, train=False), np.random.default_rng(0))
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    assert out[:, :40, 0].mean() > 240 and out[:, -40:, 2].mean() > 240  # centre crop: red left, blue right


def test_encode_captions_pads_and_cuts() -> None:
    tok = ByteTokenizer()
    ids, mask = encode_captions(tok, ["Ab", "x" * 10], 5)
    assert ids[0].tolist() == [ord("a") + 2, ord("b") + 2, tok.eos_id, 0, 0]  # lower-cased, EOS, pads
    assert mask[0].tolist() == [True, True, True, False, False]
    assert ids[1].tolist() == [ord("x") + 2] * 5 and mask[1].all()  # cut: no EOS


def test_missing_shards_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"000001\.tar"):
        expand_shards(f"{tmp_path}/{{000001..000002}}.tar")


def test_too_few_shards_for_the_readers_is_an_error(val_spec: str) -> None:
    with pytest.raises(ValueError, match="cannot feed 2 ranks x 1 workers"):
        take(stream([val_spec], rank=1, world=2), 1)
