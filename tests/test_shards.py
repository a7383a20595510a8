"""Writing shards, vetting them, and surviving every kind of bad sample."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from aimpre.config import ConfigError, load_config
from aimpre.data import Augment, ByteTokenizer, ImageTextStream, shard_set
from aimpre.data.decode import _jpeg_rgbx, decode_image, jpeg_frame
from aimpre.data.make_shards import from_csv, from_folder, from_shards, make_shards
from aimpre.data.scan import inspect_shards
from aimpre.data.shardset import write_index
from helpers import good_samples, jpeg, png, write_tar


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A tiny file whose header claims a 3.6-gigapixel image (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/aimpre-was-unpickled",))


def bad_samples() -> tuple[list[dict], dict[str, int]]:
    """One shard's worth of every bad-input kind, and the exact skip counts expected."""
    good = jpeg()
    cmyk = jpeg((10, 200, 30, 5), mode="CMYK")
    palette = Image.new("P", (40, 30))
    palette.putpalette([255, 0, 0] * 256)
    palette.info["transparency"] = 0
    rgba = Image.new("RGBA", (40, 30), (0, 0, 255, 0))  # fully transparent: white after compositing
    deep = Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))  # 16-bit grey
    samples = [
        {"__key__": "ok-jpg", "jpg": good, "txt": "fine"},
        {"__key__": "ok-cmyk", "jpg": cmyk, "txt": "cmyk"},
        {"__key__": "ok-palette", "png": png(palette), "txt": "palette with transparency"},
        {"__key__": "ok-alpha", "png": png(rgba), "txt": "alpha"},
        {"__key__": "ok-16bit", "png": png(deep), "txt": "sixteen bits"},
        {"__key__": "ok-long", "jpg": good, "txt": "long " * 3000},  # kept, cut to text_len
        {"__key__": "ok-json", "jpg": good, "json": json.dumps({"caption": "from json"})},
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 certainly not a jpeg", "txt": "corrupt"},
        {"__key__": "cut-jpeg", "jpg": good[: len(good) // 2], "txt": "truncated image"},
        {"__key__": "zero", "jpg": b"", "txt": "zero bytes"},
        {"__key__": "bomb", "png": bomb_png(), "txt": "decompression bomb"},
        {"__key__": "no-caption", "jpg": good},
        {"__key__": "blank-caption", "jpg": good, "txt": "   \n"},
        {"__key__": "latin1", "jpg": good, "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "json-no-caption", "jpg": good, "json": json.dumps({"url": "x"})},
        {"__key__": "json-number", "jpg": good, "json": json.dumps({"caption": 7})},
        {"__key__": "json-broken", "jpg": good, "json": b"{not json"},
        {"__key__": "unknown-ext", "xyz": good, "txt": "an image under an unknown extension"},
        {"__key__": "pickle", "pyd": pickle.dumps(Evil()), "txt": "a pickle, never loaded"},
    ]
    expected = {"bad_image": 2, "empty_image": 1, "too_large": 1, "no_caption": 2, "empty_caption": 1,
                "bad_caption": 3, "no_image": 2}  # fmt: skip
    return samples, expected


def test_every_bad_input_is_skipped_and_counted_exactly(tmp_path: Path) -> None:
    Path("/tmp/aimpre-was-unpickled").unlink(missing_ok=True)
    samples, expected = bad_samples()
    shard = write_tar(tmp_path / "bad.tar", samples)
    report = inspect_shards(shard_set(str(shard)), Augment(112), ByteTokenizer(), 96, workers=0)
    assert report["skipped"] == expected
    assert report["read"] == len(samples) and report["kept"] == 7
    assert report["truncated_captions"] == 1
    # the training stream counts the same in its batch state (bad samples first, so all are read by batch 1)
    bad_first = write_tar(tmp_path / "bad-first.tar", sorted(samples, key=lambda s: s["__key__"].startswith("ok")))
    batches = _take(ImageTextStream([shard_set(str(bad_first))], ByteTokenizer(), 96, 1, Augment(32), shuffle=0), 7)
    assert [b["key"][0] for b in batches] == [s["__key__"] for s in samples if s["__key__"].startswith("ok")]
    assert batches[0]["state"]["skipped"] == expected and batches[-1]["state"]["truncated"] == 1
    assert not Path("/tmp/aimpre-was-unpickled").exists()  # nothing from a shard is unpickled or executed


def _take(ds: ImageTextStream, n: int = 1) -> list[dict]:
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_odd_image_modes_decode_to_sane_rgb() -> None:
    aug, rng = Augment(16, train=False), np.random.default_rng(0)
    samples = {s["__key__"]: s for s in bad_samples()[0]}
    alpha = decode_image(samples["ok-alpha"]["png"], aug, rng)
    deep = decode_image(samples["ok-16bit"]["png"], aug, rng)
    cmyk = decode_image(samples["ok-cmyk"]["jpg"], aug, rng)
    assert isinstance(alpha, torch.Tensor) and (alpha == 255).all()  # transparent -> white
    assert isinstance(deep, torch.Tensor) and abs(float(deep.float().mean()) - 40000 / 65535 * 255) <= 1
    assert isinstance(cmyk, torch.Tensor) and cmyk.shape == (3, 16, 16)


def _photo(size: tuple[int, int], progressive: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    field = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    field.save(buf, format="JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("draft", [None, (200, 150)])
def test_jpeg_fast_path_gives_pillows_pixels(progressive: bool, draft: tuple[int, int] | None) -> None:
    data = _photo((800, 600), progressive)
    ref = Image.open(io.BytesIO(data))
    if draft is not None:
        ref.draft("RGB", draft)
    expected = np.asarray(ref.convert("RGB"))
    assert jpeg_frame(data) == (800, 600, 3)
    got = _jpeg_rgbx(data, (800, 600), 4 if draft else 1)
    assert got.shape == (*expected.shape[:2], 4) and (got[..., :3] == expected).all()
    assert got.shape[:2] == ((150, 200) if draft else (600, 800))
    with pytest.raises(OSError):
        _jpeg_rgbx(data[: len(data) // 2], (800, 600), 1)


def test_jpeg_fast_path_stops_at_the_crop_only_on_whole_data() -> None:
    data = _photo((800, 600))
    full = _jpeg_rgbx(data, (800, 600), 1)
    top = _jpeg_rgbx(data, (800, 600), 1, rows=100)
    assert top.shape == (100, 800, 4) and (top == full[:100]).all()
    assert _jpeg_rgbx(data + b"\0" * 16, (800, 600), 1, rows=100).shape == (600, 800, 4)  # no end marker last
    with pytest.raises(OSError):  # truncated: decoded to its end and refused, whatever the crop
        _jpeg_rgbx(data[: len(data) // 2], (800, 600), 1, rows=100)
    dht = data.index(b"\xff\xc4")
    broken = data[: dht + 4] + bytes(40) + data[dht + 44 :]  # a zeroed Huffman table: libjpeg gives up early
    with pytest.raises(OSError):
        _jpeg_rgbx(broken, (800, 600), 1, rows=100)


def test_jpeg_frame_reads_sizes_past_other_segments() -> None:
    img = Image.new("RGB", (123, 45))
    for kw in ({}, {"exif": b"Exif\0\0" + bytes(300), "icc_profile": bytes(5000)}, {"progressive": True}):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", **kw)  # type: ignore[arg-type]
        assert jpeg_frame(buf.getvalue()) == (123, 45, 3)
    assert jpeg_frame(jpeg(mode="CMYK")) == (64, 48, 4)
    assert jpeg_frame(png(img)) is None and jpeg_frame(b"\xff\xd8\xff") is None


def test_jpeg_and_lossless_copy_crop_and_resize_alike() -> None:
    data = _photo((512, 384))
    lossless = png(Image.open(io.BytesIO(data)))  # Pillow's own decode of the JPEG, through the generic path
    for seed in range(8):
        a = decode_image(data, Augment(224), np.random.default_rng(seed))
        b = decode_image(lossless, Augment(224), np.random.default_rng(seed))
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)


def test_truncated_tar_loses_only_its_tail(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "t.tar", good_samples("t", 10))
    with tarfile.open(shard) as tar:
        tenth = tar.getmember("t00009.jpg")
    shard.write_bytes(shard.read_bytes()[: tenth.offset_data + tenth.size // 2])  # cut inside the 10th image
    write_index(tmp_path, {"t.tar": 10})
    report = inspect_shards(shard_set(str(shard)), Augment(32), ByteTokenizer(), 16, workers=0)
    assert report["read"] == 10 and report["kept"] == 9 and report["skipped"] == {"missing": 1}
    assert sum(report["errors"].values()) >= 1


def test_bad_samples_cost_no_sleep(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "junk.tar", [{"__key__": f"j{i}", "jpg": b"junk", "txt": "x"} for i in range(300)])
    t0 = time.perf_counter()
    report = inspect_shards(shard_set(str(shard)), Augment(32), ByteTokenizer(), 16, workers=0)
    assert report["skipped"] == {"bad_image": 300}
    assert time.perf_counter() - t0 < 3.0  # webdataset's warn-and-continue would sleep 0.5 s per error


def test_make_shards_from_a_folder(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    Image.new("RGB", (800, 600), (10, 120, 200)).save(src / "a.jpg")
    (src / "a.txt").write_text("a blue photo")
    Image.new("RGB", (100, 50), (0, 0, 0)).save(src / "sub" / "b.png")
    (src / "sub" / "b.json").write_text(json.dumps({"caption": "a black png"}))
    Image.new("RGB", (10, 10)).save(src / "c.jpg")  # no caption
    (src / "d.jpg").write_bytes(b"broken")
    (src / "d.txt").write_text("broken image")
    out = tmp_path / "shards"
    summary = make_shards(from_folder(src), out, per_shard=1, max_side=256)
    assert summary.written == 2 and dict(summary.skipped) == {"no_caption": 1, "bad_image": 1}
    index = json.loads((out / "index.json").read_text())
    assert index["max_side"] == 256 and index["shards"] == {"shard-000000.tar": 1, "shard-000001.tar": 1}
    samples = list(wds.WebDataset(f"{out}/shard-{{000000..000001}}.tar", shardshuffle=False))
    assert [s["txt"].decode() for s in samples] == ["a blue photo", "a black png"]
    assert Image.open(io.BytesIO(samples[0]["jpg"])).size == (256, 192)  # shrunk to max_side
    assert "png" in samples[1]  # small enough: stored as it came
    assert json.loads(samples[1]["json"])["source"] == "sub/b.png"
    with pytest.raises(FileExistsError):
        make_shards(from_folder(src), out)


def test_make_shards_from_csv_and_reshard(tmp_path: Path) -> None:
    for i in range(5):
        Image.new("RGB", (30, 20), (i * 40, 0, 0)).save(tmp_path / f"{i}.jpg")
    table = tmp_path / "pairs.tsv"
    rows = [f"{i}.jpg\tred number {i}" for i in range(5)] + ["missing.jpg\tgone", "3.jpg\t"]
    table.write_text("path\tcaption\n" + "\n".join(rows) + "\n")
    first = make_shards(from_csv(table), tmp_path / "a", per_shard=2)
    assert first.written == 5 and dict(first.skipped) == {"no_image": 1, "no_caption": 1}
    assert first.shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    again = make_shards(from_shards(f"{tmp_path}/a/shard-{{000000..000002}}.tar"), tmp_path / "b", per_shard=5)
    assert again.written == 5 and again.shards == ["shard-000000.tar"]
    assert [s.samples for s in shard_set(f"{tmp_path}/b/shard-000000.tar")] == [5]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,text\nx.jpg,y\n")
    with pytest.raises(ValueError, match="no column 'path'"):
        list(from_csv(bad))


def test_inspect_cli_json(tmp_path: Path) -> None:
    samples, expected = bad_samples()
    write_tar(tmp_path / "bad.tar", samples)
    out = subprocess.run(
        [sys.executable, "-m", "aimpre", "data", "inspect", str(tmp_path / "bad.tar"), "--json", "--workers", "1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert report["read"] == len(samples) and report["kept"] == 7 and report["skipped"] == expected


def test_inspect_finds_a_directorys_shards_and_reports_damage_by_reason(tmp_path: Path) -> None:
    """Damaged shards are errors by reason, with the shard and the byte offset where reading stopped; the samples
    after damage are read; a set with nothing usable exits non-zero."""
    good = write_tar(tmp_path / "a-good.tar", good_samples("g", 6)).read_bytes()
    with tarfile.open(tmp_path / "a-good.tar") as tar:
        third = tar.getmember("g00002.jpg").offset  # its pax header
    huge = tarfile.TarInfo("huge.jpg")
    huge.size = 2 << 30  # a header claiming 2 GiB, with no data behind it
    (tmp_path / "b-huge.tar").write_bytes(good[:third] + huge.tobuf(tarfile.USTAR_FORMAT) + good[third:])
    noisy = bytearray(good)
    noisy[third + 700 : third + 700 + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (tmp_path / "c-noisy.tar").write_bytes(noisy)
    (tmp_path / "d-random.tar").write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (tmp_path / "e-empty.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a shard")

    def inspect(spec: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "aimpre", "data", "inspect", spec, "--json", "--workers", "1"]
        return subprocess.run(cmd, capture_output=True, text=True)

    out = inspect(str(tmp_path))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    damage = {(Path(d["shard"]).name, d["reason"], d["offset"]) for d in report["damage"]}
    assert damage == {("b-huge.tar", "oversized_member", third), ("c-noisy.tar", "bad_header", third + 1024),
                      ("d-random.tar", "not_a_tar", 0), ("e-empty.tar", "empty_shard", 0)}  # fmt: skip
    assert report["shards"] == 5 and report["kept"] == report["read"] == 6 + 6 + 4
    assert report["errors"]["samples_lost"] == 1 + 2 and report["errors"]["samples_recovered"] == 4 + 3
    out = inspect(str(tmp_path / "d-random.tar"))
    assert out.returncode == 1 and "no usable sample" in out.stderr
    assert json.loads(out.stdout)["damage"][0]["reason"] == "not_a_tar"
    (tmp_path / "empty-dir").mkdir()
    out = inspect(str(tmp_path / "empty-dir"))
    assert out.returncode == 2 and "without *.tar files" in out.stderr and out.stderr.count("\n") == 1


BOMB_SCRIPT = """
import resource, struct, sys, zlib
import numpy as np
from aimpre.data.decode import Augment, decode_image

def one_bit_png(w, h):  # zeros compress to almost nothing: 12 KB for 10^8 pixels
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z, row = zlib.compressobj(9), bytes(1 + (w + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")

def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))

side = int(sys.argv[1])
data = one_bit_png(side, side)
aug = Augment(224, train=sys.argv[2] == "train")
base = status("VmRSS")
try:  # reset the peak to now (Linux), so that a transient peak while importing torch does not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    peak_of = lambda: status("VmHWM")
except OSError:
    peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = decode_image(data, aug, np.random.default_rng(0))
peak = peak_of()
print(len(data), out if isinstance(out, str) else "decoded", peak - base)
"""


@pytest.mark.parametrize(("side", "train"), [(10_000, "train"), (10_000, "eval"), (7_000, "eval"), (6_000, "eval")])
def test_a_12_kb_png_bomb_decodes_in_bounded_memory(side: int, train: str) -> None:
    """A 1-bit PNG of exactly max_pixels pixels (Pillow holds a byte per pixel, then RGB copies: 1.1 GB to decode
    before) is refused from its header; a smaller one within max_bytes decodes, inside the bound."""
    assert side * side <= Augment(224).max_pixels
    out = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(side), train], capture_output=True, text=True)
    size, result, extra = out.stdout.split()
    assert int(size) < 13_000
    assert result == ("decoded" if side == 6_000 else "too_large")  # 36 Mpx: 396 MB by decode_bytes
    assert int(extra) < 0.5e9  # peak resident memory above what the process held before decoding


def test_sample_byte_cap_is_a_config_key() -> None:
    aug = Augment(32, max_bytes=20_000)  # the file's bytes and the decoded pixels count
    small, big = jpeg(size=(64, 48)), _photo((800, 600))
    assert len(small) + 64 * 48 * 4 < 20_000 < len(big)
    assert isinstance(decode_image(small, aug, np.random.default_rng(0)), torch.Tensor)
    assert decode_image(big, aug, np.random.default_rng(0)) == "too_large"
    flat = png(Image.new("RGB", (64, 48)))  # a few hundred bytes, 64 * 48 * 14 decoded
    assert decode_image(flat, aug, np.random.default_rng(0)) == "too_large"
    assert isinstance(decode_image(flat, Augment(32), np.random.default_rng(0)), torch.Tensor)
    assert load_config(None, ["data.max_sample_bytes=1000"]).data.max_sample_bytes == 1000
    with pytest.raises(ConfigError, match=r"'data\.max_sample_bytes': 0 must be positive"):
        load_config(None, ["data.max_sample_bytes=0"])
