"""The loading pipeline: real shards read back, splitting across ranks and workers, exact resume."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from aimpre.data import (
    Augment,
    ByteTokenizer,
    ImageTextStream,
    StreamLoader,
    batches_per_epoch,
    demo_shards,
    encode_captions,
    expand_shards,
    shard_set,
    sources,
)
from aimpre.data.decode import decode_image
from aimpre.data.demo import BACKGROUNDS, COLOURS, DIGIT_WORDS, ROWS, SHAPES, digit_split, render_scene
from aimpre.data.pipeline import SHARED
from aimpre.data.shardset import count_samples
from helpers import good_samples, write_tar


def stream(sources, **kw) -> ImageTextStream:
    args = dict(tokenizer=ByteTokenizer(), text_len=96, batch_size=8, aug=Augment(112), seed=0, shuffle=16)
    return ImageTextStream(sources, **{**args, **kw})


def take(ds: ImageTextStream, n: int, workers: int = 0) -> list[dict]:
    out = []
    for batch in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers):
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("stream ended")


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Five shards of 37, 3, 1, 60 and 11 samples (112), with an index for some and a header count for others."""
    d = tmp_path_factory.mktemp("uneven")
    for i, n in enumerate((37, 3, 1, 60, 11)):
        write_tar(d / f"u-{i}.tar", good_samples(f"s{i}-", n))
    return shard_set(f"{d}/u-{{0..4}}.tar")


def test_demo_shards_are_plain_webdataset_tars(demo: Path) -> None:
    index = json.loads((demo / "index.json").read_text())
    assert set(index["splits"]) == {"pretrain", "val", "digits-train", "digits-test"}
    for split, info in index["splits"].items():
        samples = list(wds.WebDataset(demo_shards(split, demo), shardshuffle=False))
        assert len(samples) == info["samples"] == sum(index["shards"][n] for n in info["shards"]), split
        s = samples[0]
        assert Image.open(io.BytesIO(s["jpg"])).size == (128, 128)
        assert s["txt"].decode().strip()
        classes = range(10, 14) if split == "val" else range(10) if split.startswith("digits") else range(14)
        assert {int(s["cls"]) for s in samples} == set(classes)  # every sample has a label, in the split's classes
        assert info["classes"] == (list(DIGIT_WORDS) if split.startswith("digits") else [*DIGIT_WORDS, *SHAPES])
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


def test_scene_captions_describe_the_pixels_and_fit_the_text_length() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        img, caption, label = render_scene(rng)
        parts = [p.split() for p in caption.rsplit(", on ", 1)[0].split(" and ")]  # size colour shape where...
        top = min(parts, key=lambda p: ROWS[p[-1]])  # "at the top" / "in the middle" / "at the bottom"
        assert label == 10 + SHAPES.index(top[2]), caption  # the class is the top-most shape
        pixels = {tuple(p) for p in np.asarray(img).reshape(-1, 3)}
        named = [c for c in COLOURS if f" {c} " in f" {caption} "]
        assert named and all(COLOURS[c] in pixels for c in named), caption
        assert tuple(np.asarray(img)[0, 0]) == BACKGROUNDS[caption.rsplit(", on ", 1)[1]]
        assert len(caption) + 1 <= 96  # caption + EOS fit tiny's text_len with the byte tokenizer


def test_batches(pretrain_spec: str) -> None:
    (batch,) = take(stream([shard_set(pretrain_spec)]), 1)
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 112, 112)
    assert batch["text"].dtype == torch.int64 and batch["text"].shape == (8, 96)
    assert batch["text_mask"].dtype == torch.bool and len(batch["key"]) == 8
    tok = ByteTokenizer()
    for ids, mask in zip(batch["text"], batch["text_mask"], strict=True):
        assert ids[mask].tolist()[-1] == tok.eos_id  # no demo caption is cut
    assert batch["state"]["truncated"] == 0 and batch["state"]["skipped"] == {}


def test_header_counts_match_the_index(demo: Path) -> None:
    index = json.loads((demo / "index.json").read_text())["shards"]
    for name, n in list(index.items())[:3]:
        assert count_samples(str(demo / name)) == n


@pytest.mark.parametrize("world, workers, batch", [(2, 2, 5), (3, 1, 4), (1, 2, 7)])
def test_every_reader_gets_the_same_batches_and_each_sample_once_per_epoch(uneven, world, workers, batch) -> None:
    total = 112
    m = batches_per_epoch([uneven], batch, world * workers)
    keys: list[str] = []
    for rank in range(world):
        batches = take(stream([uneven], batch_size=batch, rank=rank, world=world), m * workers, workers)
        assert all(b["state"]["epoch"] == 0 or b["state"].get("batch", 0) == 0 for b in batches)
        assert [b["state"]["epoch"] for b in batches[-workers:]] == [1] * workers  # each worker ended epoch 0
        keys += [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == m * world * workers * batch  # nothing twice
    assert total - len(keys) < world * workers * batch  # only a tail smaller than one round of batches dropped


def test_fewer_shards_than_readers_still_splits_evenly(tmp_path: Path) -> None:
    one = shard_set(str(write_tar(tmp_path / "one.tar", good_samples("x", 40))))
    keys = [k for r in range(4) for b in take(stream([one], batch_size=5, rank=r, world=4), 2) for k in b["key"]]
    assert len(keys) == len(set(keys)) == 40


def test_too_little_data_for_the_readers_is_a_clear_error(tmp_path: Path) -> None:
    tiny = shard_set(str(write_tar(tmp_path / "t.tar", good_samples("x", 3))))
    with pytest.raises(ValueError, match="cannot fill one batch"):
        take(stream([tiny], batch_size=2, world=2), 1)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resampled", [False, True])
def test_resume_from_batch_states_is_exact(uneven, workers: int, resampled: bool) -> None:
    """Restarting every reader from the state of its last delivered batch continues the exact same stream,
    across an epoch boundary too (7 batches per reader per epoch here)."""
    kw = dict(batch_size=4, resampled=resampled)
    full = take(stream([uneven], **kw), 24, workers)
    cut = 13
    last = {}
    for b in full[:cut]:
        last[b["worker"]] = b["state"]
    states = [last.get(k) for k in range(max(1, workers))]
    resumed = take(stream([uneven], **kw, resume=states, first_worker=cut % max(1, workers)), 24 - cut, workers)
    for a, b in zip(full[cut:], resumed, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])


def test_stream_loader_reuses_shared_buffers_and_kept_batches_stay_intact(uneven) -> None:
    """Each worker stacks into 4 reused shared-memory buffers; a caller that keeps every batch still has each one
    as it was made (the loader copies images out before the worker may overwrite their buffer)."""
    expected = take(stream([uneven], batch_size=4), 30, workers=2)  # a plain DataLoader: fresh memory per batch
    ds = stream([uneven], batch_size=4)
    kept = list(itertools.islice(StreamLoader(ds, 2, prefetch_factor=2), 30))
    assert ds.released is not None and ds.released.tolist() == [15, 15]  # every batch came in a reused buffer
    for a, b in zip(expected, kept, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and set(a) == set(b)


def test_a_consumer_that_never_releases_buffers_is_not_waited_for(uneven) -> None:
    ds = stream([uneven], batch_size=4)
    StreamLoader(ds, 1, prefetch_factor=2)  # gives the stream 4 buffers; a plain DataLoader never releases them
    got = take(ds, 12, workers=1)
    assert [SHARED in b for b in got] == [True] * 4 + [False] * 8  # then fresh memory, as any DataLoader
    for a, b in zip(take(stream([uneven], batch_size=4), 12), got, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def test_order_depends_on_seed_and_epoch(uneven) -> None:
    a = take(stream([uneven], batch_size=4), 28 * 2)
    epoch0, epoch1 = [k for b in a[:28] for k in b["key"]], [k for b in a[28:] for k in b["key"]]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # all 112 each epoch, in a new order
    assert take(stream([uneven], seed=1), 1)[0]["key"] != a[0]["key"]


def test_resampled_sources_mix_by_weight(tmp_path: Path) -> None:
    a = shard_set(str(write_tar(tmp_path / "a.tar", good_samples("a", 30))))
    b = shard_set(str(write_tar(tmp_path / "b.tar", good_samples("b", 30))))
    keys = [k for x in take(stream([a, b], batch_size=20, resampled=True, weights=[3.0, 1.0]), 20) for k in x["key"]]
    share = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.7 < share < 0.8  # 400 draws at p = 0.75
    with pytest.raises(ValueError, match="resampled"):
        stream([a, b], weights=[1.0, 1.0])


def test_draft_decoding_keeps_content() -> None:
    img = Image.new("RGB", (1600, 1200), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 800, 1200))  # left half red
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    out = decode_image(buf.getvalue(), Augment(112, train=False), np.random.default_rng(0))
    assert isinstance(out, torch.Tensor) and out.shape == (3, 112, 112) and out.dtype == torch.uint8
    assert out[0, :, :40].float().mean() > 240 and out[2, :, -40:].float().mean() > 240  # red left, blue right


def test_resize_matches_pils_antialiased_bicubic() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((512, 384), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    ours = decode_image(buf.getvalue(), Augment(224, train=False), rng)
    pil = np.asarray(img.resize((224, 224), Image.Resampling.BICUBIC, box=(64, 0, 448, 384)))
    assert isinstance(ours, torch.Tensor)
    diff = np.abs(ours.permute(1, 2, 0).numpy().astype(int) - pil.astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.1


def test_encode_captions_pads_and_cuts() -> None:
    tok = ByteTokenizer()
    ids, mask = encode_captions(tok, ["Ab", "x" * 10], 5)
    assert ids[0].tolist() == [ord("a") + 2, ord("b") + 2, tok.eos_id, 0, 0]  # lower-cased, EOS, pads
    assert mask[0].tolist() == [True, True, True, False, False]
    assert ids[1].tolist() == [ord("x") + 2] * 5 and mask[1].all()  # cut: no EOS


def test_missing_shards_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"000001\.tar"):
        expand_shards(f"{tmp_path}/{{000001..000002}}.tar")


def test_pipe_sources_read_epochs_with_an_index_file(tmp_path: Path, uneven) -> None:
    """`pipe:` commands (as for `pipe:aws s3 cp s3://... -`) stream through unchanged; their counts come from an
    index file written by streaming them once."""
    from aimpre.data.reader import index_shards

    spec = f"pipe:cat {Path(uneven[0].url).parent}/u-{{0..4}}.tar"
    with pytest.raises(ValueError, match="aimpre data index"):
        shard_set(spec)
    (index,) = index_shards(spec, tmp_path / "counts.json")
    piped = shard_set(spec, index=str(index))
    assert [s.samples for s in piped] == [s.samples for s in uneven] == [37, 3, 1, 60, 11]
    a = [k for b in take(stream([piped], batch_size=4), 5) for k in b["key"]]
    b = [k for b in take(stream([uneven], batch_size=4), 5) for k in b["key"]]
    assert a == b  # the same epoch order whether read through a pipe or from files


def test_demo_splits_are_sources_by_name() -> None:
    scenes, digits = sources(["demo", "demo:digits-train"], "pretrain", need_counts=True, index=None)
    assert [s.url for s in scenes] == demo_shards("pretrain")
    assert [s.url for s in digits] == demo_shards("digits-train") and sum(s.samples or 0 for s in digits) == 1258
    with pytest.raises(ValueError, match="'demo:nope': demo data has no split 'nope'"):
        sources("demo:nope", "pretrain", need_counts=True, index=None)


def test_data_commands_take_demo_specs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from aimpre.cli import main

    assert main(["data", "inspect", "demo:digits-test", "--json", "--workers", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["read"] == report["kept"] == 539 and report["skipped"] == {}
    out = tmp_path / "tok.json"
    assert main(["data", "train-tokenizer", "demo:digits-test", "--vocab-size", "300", "--out", str(out)]) == 0
    assert out.exists()


def test_training_reads_past_damage_and_resumes_exactly(tmp_path: Path) -> None:
    """A shard with a corrupt header and 20 KB of noise inside still gives every sample the damage does not
    touch, each once per epoch; counts come from the same resynchronising scan, so resuming is exact."""
    whole = write_tar(tmp_path / "a.tar", good_samples("a", 20))
    raw = bytearray(write_tar(tmp_path / "b.tar", good_samples("b", 40)).read_bytes())
    with tarfile.open(tmp_path / "b.tar") as tar:
        header = tar.getmember("b00005.jpg").offset_data - 512
        noise_at = tar.getmember("b00020.jpg").offset_data + 100
        after = [m.name.split(".")[0] for m in tar if m.offset > noise_at + 20_000 and m.name.endswith(".jpg")]
    raw[header + 150] ^= 0x11  # a checksum digit of b00005.jpg's header
    raw[noise_at : noise_at + 20_000] = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    (tmp_path / "b.tar").write_bytes(raw)
    shards = shard_set(f"{tmp_path}/{{a,b}}.tar")
    expected = {f"a{i:05d}" for i in range(20)} | {f"b{i:05d}" for i in range(20) if i != 5} | set(after)
    assert whole.exists() and len(after) >= 10 and sum(s.samples or 0 for s in shards) == len(expected)
    kw = dict(batch_size=4, aug=Augment(32))
    per_epoch = len(expected) // 4
    full = take(stream([shards], **kw), 2 * per_epoch)
    seen = [k for b in full[:per_epoch] for k in b["key"]]
    assert len(seen) == len(set(seen)) and set(seen) <= expected and len(expected) - len(seen) < 4
    state = full[per_epoch - 1]["state"]["errors"]
    assert state["bad_header"] == 2 and state["samples_lost"] >= 2 and state["samples_recovered"] >= 10
    cut = per_epoch // 2
    resumed = take(stream([shards], **kw, resume=[full[cut - 1]["state"]]), 2 * per_epoch - cut)
    assert [b["key"] for b in full[cut:]] == [b["key"] for b in resumed]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full[cut:], resumed, strict=True))
