"""Our tar reader against Python's tarfile, on the header kinds shards use, and on damaged streams."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

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
