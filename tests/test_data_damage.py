"""No silent data loss and bounded shard input (issue 18, points 4 and 5; issue 23, point 7): real tar files
written by tarfile, then damaged byte-wise, read through the same paths as training and ``data inspect``."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import pytest

from aimpre.data.tario import TarError, group_samples, tar_members

N = 40  # samples per test shard: KEY.jpg + KEY.txt each


def _shard(n: int = N, size: int = 700, key: str = "s") -> tuple[bytes, dict[str, int]]:
    """A tar of ``n`` samples s00..; and the offset of each member's header by name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            for ext, data in (("jpg", bytes([i + 1]) * size), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{key}{i:02d}.{ext}")
                info.size, info.mtime = len(data), 1700000000
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        offsets = {m.name: m.offset for m in tar}
    return raw, offsets


def _v7(raw: bytes) -> bytes:
    """The same archive with pre-POSIX (v7) headers: no magic, version, owner names or prefix; checksums redone."""
    out = bytearray(raw)
    at = 0
    while at + 512 <= len(out) and any(out[at : at + 512]):
        header = out[at : at + 512]
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        header[257:512] = bytes(255)
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\0 " % sum(header)
        out[at : at + 512] = header
        at += 512 + -(-size // 512) * 512
    return bytes(out)


def _read(raw: bytes) -> tuple[list[str], list[TarError], Counter[str]]:
    damage: list[TarError] = []
    counts: Counter[str] = Counter()
    keys = [
        str(s["__key__"])
        for s in group_samples(tar_members(io.BytesIO(raw), resync=True), lambda k: counts.update([k]), damage.append)
        if "jpg" in s and "txt" in s
    ]
    return keys, damage, counts


def test_zero_block_over_a_header_mid_shard_is_damage_and_reading_resumes() -> None:
    raw, at = _shard()
    hit = at["s20.jpg"]
    damaged = raw[:hit] + bytes(512) + raw[hit + 512 :]
    keys, damage, counts = _read(damaged)
    assert [(d.reason, d.offset, d.resumed) for d in damage] == [("zero_block", hit, at["s20.txt"])]
    assert "s20" not in keys and len(keys) >= N - 2 and keys[-1] == f"s{N - 1:02d}"  # was 20 of 40, silently
    assert counts["samples_lost"] == N - len(keys)
    with pytest.raises(TarError, match="zero block"):  # without resync it is an error, not an end
        list(tar_members(io.BytesIO(damaged)))


def test_end_of_archive_padding_and_concatenated_archives() -> None:
    raw, _ = _shard()
    keys, damage, _ = _read(raw + bytes(100_000))  # only zeros after the end: no damage
    assert len(keys) == N and damage == []
    second, _ = _shard(3, key="t")
    keys, damage, counts = _read(raw + second)  # `cat a.tar b.tar`: reported, nothing lost
    assert [d.reason for d in damage] == ["zero_block"] and damage[0].resumed == len(raw)
    assert len(keys) == N + 3 and counts["samples_lost"] == 0
    keys, damage, _ = _read(raw + b"junk" * 1000)  # junk after the end: reported, every sample kept
    assert len(keys) == N and [(d.reason, d.resumed) for d in damage] == [("zero_block", None)]


def test_v7_headers_are_read_and_a_broken_one_is_damage_with_recovery() -> None:
    raw, at = _shard()
    v7 = _v7(raw)
    assert b"ustar" not in v7
    with tarfile.open(fileobj=io.BytesIO(v7)) as tar:  # tarfile agrees it is a tar
        assert len(tar.getnames()) == 2 * N
    assert len(_read(v7)[0]) == N
    hit = at["s20.jpg"]
    broken = bytearray(v7)
    broken[hit + 150] ^= 1  # its checksum no longer matches
    keys, damage, counts = _read(bytes(broken))
    assert [(d.reason, d.offset, d.resumed) for d in damage] == [("bad_header", hit, at["s20.txt"])]
    assert keys == [f"s{i:02d}" for i in range(N) if i != 20]  # was 19 of 40, nothing resumed
    assert counts["samples_lost"] == 1
