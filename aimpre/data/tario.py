"""A small reader of the tar streams that hold shards: ustar members with pax and GNU long-name headers.

``tarfile`` spends about 0.1 ms of Python per sample on header objects we never use; this reads the 512-byte
headers directly (checksum verified) for about a fifth of that. Members are only read: nothing is extracted to
disk, followed (links) or unpickled. A damaged stream raises ``TarError`` at the first bad header or short read
(or a member over ``MAX_MEMBER`` bytes, which would otherwise be read into memory); whatever came before it has
been yielded, and nothing after it can be trusted, so reading that stream stops.

Samples follow webdataset's rule: a sample is the run of consecutive members sharing a key, the member name up to
the first dot of its base name (``abc/000123.jpg`` + ``abc/000123.txt`` -> key ``abc/000123``, fields ``jpg``
and ``txt``, extensions lower-cased); top-level ``__name__`` members are metadata and skipped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import IO

_BLOCK = 512
_ZERO = bytes(_BLOCK)
MAX_MEMBER = 1 << 30  # bytes; a larger member is taken for a damaged header (no image-text sample is that big)
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")


class TarError(Exception):
    """The stream is not a readable tar from here on (bad header, or cut short) at ``member``, if known."""

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message if member is None else f"{message} ({member})")
        self.member = member


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256, for sizes of 8 GiB and more
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * len(field) - 8)) if field[:1] == b"\xff" else n
    digits = field.strip(b"\0 ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarError(f"bad number field {field!r}") from None


def _pax(data: bytes) -> dict[bytes, bytes]:
    """Records ``"LEN KEY=VALUE\\n"`` of a pax extended header."""
    out, i = {}, 0
    try:
        while i < len(data) and data[i] != 0:
            space = data.index(b" ", i)
            n = int(data[i:space])
            key, _, value = data[space + 1 : i + n - 1].partition(b"=")
            out[key] = value
            i += n
    except ValueError:
        raise TarError("bad pax header") from None
    return out


def tar_members(stream: IO[bytes], read: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of each regular file in the stream; with ``read=False`` data is None and seeked over."""
    long_name: str | None = None
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK or header == _ZERO:
            if header and header != _ZERO:
                raise TarError("stream ends inside a header")
            return  # end-of-archive blocks (or a stream that simply ends between members)
        if _number(header[148:156]) != sum(header) - sum(header[148:156]) + 8 * 32:
            raise TarError("header checksum mismatch")
        size, kind = _number(header[124:136]), header[156:157]
        name = long_name
        if name is None:
            base, prefix = header[:100].split(b"\0", 1)[0], header[345:500].split(b"\0", 1)[0]
            name = (prefix + b"/" + base if prefix else base).decode("utf-8", "replace")
        member = None if kind in (b"x", b"L") else name  # what a failure here breaks
        if not 0 <= size <= MAX_MEMBER:
            raise TarError(f"member of {size} bytes (limit {MAX_MEMBER})", member)
        skip = size + (-size % _BLOCK)  # data, padded to whole blocks
        data = None
        if read or kind in (b"x", b"L"):
            data = stream.read(size)
            if len(data) < size:
                raise TarError(f"stream ends inside member data ({len(data)} of {size} bytes)", member)
            if skip > size:
                stream.read(skip - size)
        else:
            stream.seek(skip, 1)
        if kind == b"x":  # pax header: applies to the next member
            pax = _pax(data or b"")
            if b"path" in pax:
                long_name = pax[b"path"].decode("utf-8", "replace")
            continue
        if kind == b"L":  # GNU long name: applies to the next member
            long_name = (data or b"").rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind in (b"0", b"\0", b"7"):  # regular files; links, directories and devices are skipped
            yield name, data
        long_name = None


def split_name(name: str) -> tuple[str, str] | None:
    """(sample key, field) of a member name, or None for metadata and names without an extension."""
    m = _KEY.match(name)
    if m is None or _META.match(name):
        return None
    return m.group(1), m.group(2).lower()


def group_samples(
    members: Iterator[tuple[str, bytes | None]], count: Callable[[str], object] | None = None
) -> Iterator[dict[str, bytes | str | None]]:
    """Samples (``{"__key__": key, field: data, ...}``) from consecutive members sharing a key.

    A field repeated inside one sample keeps its first value; each repeat is passed to ``count`` as
    ``"duplicate_member"``.
    """
    sample: dict[str, bytes | str | None] | None = None
    try:
        for name, data in members:
            parts = split_name(name)
            if parts is None:
                continue
            key, field = parts
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            if field in sample:
                if count is not None:
                    count("duplicate_member")
                continue
            sample[field] = data
    except TarError as exn:
        # the sample in progress is whole unless the broken member was one of its own
        broken = split_name(exn.member) if exn.member is not None else None
        if sample is not None and (broken is None or broken[0] != sample["__key__"]):
            yield sample
        raise
    if sample is not None:
        yield sample
