"""Our tar reader against Python's tarfile, on the header kinds shards use, and on damaged streams."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pytest

from aimpre.data.tario import TarError, group_samples, split_name, tar_members


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT, extra: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if extra:
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            link = tarfile.TarInfo("alink.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000.5  # a float mtime: webdataset's writer adds pax records
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [
    ("a/000001.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
    ("a/000001.txt", b"a caption"),
    ("a/000002.jpg", b""),  # empty member
    ("a/000002.json", b"x" * 512),  # exactly one block
    ("d" * 150 + "/000003.txt", b"long path"),  # > 100 characters: pax path / GNU long name
    ("a.b/caf\u00e9.TXT", b"non-ASCII name"),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_members_match_tarfile(fmt: int) -> None:
    raw = _tar(MEMBERS, fmt)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]  # type: ignore[union-attr]
    assert list(tar_members(io.BytesIO(raw))) == expected == MEMBERS
    assert [n for n, _ in tar_members(io.BytesIO(raw), read=False)] == [n for n, _ in MEMBERS]


def test_samples_group_by_key_like_webdataset() -> None:
    samples = list(group_samples(tar_members(io.BytesIO(_tar([*MEMBERS, ("__index__", b"meta")])))))
    assert [s["__key__"] for s in samples] == ["a/000001", "a/000002", "d" * 150 + "/000003", "a.b/caf\u00e9"]
    assert samples[0]["txt"] == b"a caption" and set(samples[1]) == {"__key__", "jpg", "json"}
    assert samples[3]["txt"] == b"non-ASCII name"  # extension lower-cased
    assert split_name("x/k.seg.png") == ("x/k", "seg.png") and split_name("noext") is None
    assert split_name("__meta__/x.txt") is None


def test_duplicate_member_is_counted_and_first_kept() -> None:
    counts: Counter[str] = Counter()
    raw = _tar([("k.txt", b"first"), ("k.txt", b"second"), ("j.txt", b"j")], extra=False)
    samples = list(group_samples(tar_members(io.BytesIO(raw)), lambda kind: counts.update([kind])))
    assert samples == [{"__key__": "k", "txt": b"first"}, {"__key__": "j", "txt": b"j"}]
    assert counts == Counter(["duplicate_member"])


def test_cut_stream_keeps_whole_samples_and_drops_the_cut_one() -> None:
    raw = _tar([(f"s{i}.{ext}", bytes(1000)) for i in range(3) for ext in ("jpg", "txt")], extra=False)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        cut = tar.getmember("s2.jpg")
    got: list[str] = []
    with pytest.raises(TarError, match=r"s2\.jpg"):
        for s in group_samples(tar_members(io.BytesIO(raw[: cut.offset_data + 10]))):
            got.append(str(s["__key__"]))
    assert got == ["s0", "s1"]  # s1 is whole although its successor's member broke
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        cut = tar.getmember("s1.txt")
    got = []
    with pytest.raises(TarError):
        for s in group_samples(tar_members(io.BytesIO(raw[: cut.offset_data + 10]))):
            got.append(str(s["__key__"]))
    assert got == ["s0"]  # s1 lost its caption to the cut: dropped, not passed on without it


def test_damaged_header_stops_the_stream() -> None:
    raw = bytearray(_tar([(f"s{i}.txt", b"x") for i in range(3)], fmt=tarfile.USTAR_FORMAT, extra=False))
    raw[2 * 1024 + 5] ^= 0xFF  # the third header's name (each member: a header and a data block)
    it = tar_members(io.BytesIO(bytes(raw)))
    assert [n for n, _ in (next(it), next(it))] == ["s0.txt", "s1.txt"]
    with pytest.raises(TarError, match="checksum"):
        next(it)
    with pytest.raises(TarError, match="inside a header"):
        list(tar_members(io.BytesIO(bytes(raw[: 1024 + 100]))))


def test_a_member_too_big_to_read_is_refused() -> None:
    info = tarfile.TarInfo("huge.jpg")
    info.size = 9 << 30  # a header claiming 9 GiB (a GNU base-256 size field), with no data behind it
    raw = info.tobuf(tarfile.GNU_FORMAT)
    with pytest.raises(TarError, match="9663676416 bytes") as exn:
        list(tar_members(io.BytesIO(raw)))
    assert exn.value.member == "huge.jpg"


def _shard(n: int = 32) -> bytes:
    """A webdataset-layout tar: n samples of a jpg and a txt member (1000 and 20 bytes), as tarfile writes them."""
    return _tar(
        [(f"s{i:03d}.{ext}", bytes([i]) * size) for i in range(n) for ext, size in (("jpg", 1000), ("txt", 20))]
    )


def _read(raw: bytes) -> tuple[list[str], Counter[str], list[TarError]]:
    counts: Counter[str] = Counter()
    damage: list[TarError] = []
    members = tar_members(io.BytesIO(raw), resync=True)
    keys = [str(s["__key__"]) for s in group_samples(members, lambda k: counts.update([k]), damage.append)]
    return keys, counts, damage


def _offset(raw: bytes, name: str, pax: bool = False) -> int:
    """Where a member's own header starts (with ``pax``: the pax header before it)."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        member = tar.getmember(name)
    return member.offset if pax else member.offset_data - 512


ALL = [f"s{i:03d}" for i in range(32)]


def test_reading_resumes_after_a_corrupt_header_and_loses_only_its_sample() -> None:
    raw = bytearray(_shard())
    at, txt, pax = _offset(raw, "s016.jpg"), _offset(raw, "s016.txt", pax=True), _offset(raw, "s016.jpg", pax=True)
    raw[at + 150] ^= 0x11  # the header's checksum field: its name still says whose member it was
    keys, counts, damage = _read(bytes(raw))
    assert keys == [k for k in ALL if k != "s016"]
    assert counts == Counter({"samples_lost": 1, "samples_recovered": 15})
    assert [(d.reason, d.offset) for d in damage] == [("bad_header", at)]
    assert damage[0].resumed == txt
    raw[at + 1] ^= 0x11  # and its name: either neighbour may have lost the member, so both are dropped
    keys, counts, _ = _read(bytes(raw))
    assert keys == [k for k in ALL if k not in ("s015", "s016")] and counts["samples_lost"] == 2
    raw = bytearray(_shard())
    raw[pax + 150] ^= 0x11  # a pax header (an mtime record) before it: its member is whole, nothing is lost
    keys, counts, damage = _read(bytes(raw))
    assert keys == ALL and counts["samples_lost"] == 0 and damage[0].metadata_only
    assert (damage[0].offset, damage[0].resumed) == (pax, at)


@pytest.mark.parametrize("inserted", [False, True])
def test_noise_in_the_middle_loses_only_what_it_covers(inserted: bool) -> None:
    raw = _shard()
    starts = {k: _offset(raw, f"{k}.jpg", pax=True) for k in ALL}
    mid = _offset(raw, "s016.jpg") + 700  # inside a member's data
    noise = np.random.default_rng(0).integers(0, 256, 20_001, dtype=np.uint8).tobytes()
    damaged = raw[:mid] + noise + raw[mid + (0 if inserted else len(noise)) :]  # 20 KB over it, or pushed in
    keys, counts, damage = _read(damaged)
    after = ALL[17:] if inserted else [k for k in ALL if starts[k] > mid + len(noise)]
    assert keys == ALL[:16] + after  # everything before and after the noise, at any byte alignment
    assert counts["samples_recovered"] == len(after) and counts["samples_lost"] >= 1
    assert [d.reason for d in damage] == ["bad_header"] and damage[0].offset is not None
    assert damage[0].offset > mid - 1000 and damage[0].resumed == damaged.index(b"ustar", damage[0].offset + 1) - 257


def test_a_header_claiming_2_gib_loses_its_sample_and_reading_goes_on() -> None:
    raw = _shard()
    at = _offset(raw, "s016.jpg")
    info = tarfile.TarInfo("huge.jpg")
    info.size = 2 << 30
    keys, counts, damage = _read(raw[:at] + info.tobuf(tarfile.USTAR_FORMAT) + raw[at:])
    assert keys == ALL and counts == Counter({"samples_lost": 1, "samples_recovered": 16})
    assert [(d.reason, d.offset, d.member) for d in damage] == [("oversized_member", at, "huge.jpg")]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes(), "not_a_tar"),
        (b"", "empty_shard"),
        (_tar([], extra=False), "empty_shard"),  # only the end-of-archive blocks
    ],
)
def test_streams_without_samples_say_why(raw: bytes, reason: str) -> None:
    keys, _, damage = _read(raw)
    assert keys == [] and [(d.reason, d.offset, d.resumed) for d in damage] == [(reason, 0, None)]
    with pytest.raises(TarError, match="at byte 0"):
        list(tar_members(io.BytesIO(raw)))


def test_header_cut_by_the_end_of_the_stream_keeps_the_whole_sample_before_it() -> None:
    raw = _shard(3)
    keys, _, damage = _read(raw[: _offset(raw, "s002.jpg") + 200])
    assert keys == ["s000", "s001"] and [d.reason for d in damage] == ["truncated"] and damage[0].resumed is None


def test_a_bad_pax_record_costs_only_the_record() -> None:
    """Reading resumes right after the pax header, at its member's own header: the member is whole."""
    raw = bytearray(_shard(4))
    pax = _offset(raw, "s002.jpg", pax=True)
    record = raw.index(b"mtime=", pax + 512)
    raw[record - 3 : record - 1] = b"zz"  # the record's length digits: the header is intact, its data is not
    keys, counts, damage = _read(bytes(raw))
    assert [(d.reason, d.offset, d.resumed) for d in damage] == [("bad_header", pax, _offset(raw, "s002.jpg"))]
    assert keys == ["s000", "s001", "s002", "s003"] and counts["samples_lost"] == 0 and damage[0].metadata_only
    keys, _, damage = _read(_shard(2)[:-100])
    assert keys == ["s000", "s001"] and damage == []  # end-of-archive zeros cut short are no damage
