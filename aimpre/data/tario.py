"""A small reader of the tar streams that hold shards: ustar members with pax and GNU long-name headers.

``tarfile`` spends about 0.1 ms of Python per sample on header objects we never use; this reads the 512-byte
headers directly (checksum verified) for about a fifth of that. Members are only read: nothing is extracted to
disk, followed (links) or unpickled. Damage (a bad header, a member over ``MAX_MEMBER`` bytes, which would
otherwise be read into memory, a short read, a stream with no members) is a ``TarError`` with a reason and the
byte offset where reading stopped. By default it is raised; with ``resync=True`` it is yielded instead and reading
goes on at the next plausible header (found by its ``ustar`` magic at any byte offset, or for pre-POSIX v7 headers,
which have no magic but the same checksum, at a 512-byte boundary; then its checksum and fields checked), so one
damaged stretch costs only the samples it touches.

The end of the archive is a zero block followed by nothing but zeros to the end of the stream. Zero blocks with more
data after them (a header wiped out, or archives joined end to end) are damage (``zero_block``), not an end: tar
would stop there, and every sample after them would be lost without a word.

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


# why reading stopped (counted by these names)
DAMAGE_REASONS = ("not_a_tar", "empty_shard", "bad_header", "zero_block", "oversized_member", "truncated")
_TYPES = frozenset(b"01234567xgLK\0"[i : i + 1] for i in range(13))  # the type flags a plausible header has


class TarError(Exception):
    """The stream is not a readable tar from ``offset`` on, for ``reason`` (one of DAMAGE_REASONS).

    ``member``: the member the damage breaks, when its header was read intact; ``guess``: the name in a header
    that failed its checksum (a hint only); ``resumed``: the offset where reading went on (resync), None if never.
    """

    def __init__(
        self, message: str, member: str | None = None, *, reason: str = "bad_header", offset: int | None = None
    ) -> None:
        super().__init__(message if member is None else f"{message} ({member})")
        self.member, self.reason, self.offset = member, reason, offset
        self.guess: str | None = None
        self.resumed: int | None = None
        # no sample lost a member: a damaged pax/long-name header, and reading resumed right after its data; or
        # an end-of-archive marker with another archive after it
        self.metadata_only = False


class _Source:
    """A stream read forward, counting the bytes consumed (``offset``), with bytes put back by ``unread``."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.pending, self.offset = stream, b"", 0

    def read(self, n: int) -> bytes:
        if self.pending:
            out, self.pending = self.pending[:n], self.pending[n:]
            if len(out) < n:
                out += self.stream.read(n - len(out))
        else:  # the usual case: no damage seen
            out = self.stream.read(n)
        self.offset += len(out)
        return out

    def skip(self, n: int) -> None:
        head = min(n, len(self.pending))
        self.pending = self.pending[head:]
        if n > head:
            self.stream.seek(n - head, 1)
        self.offset += n

    def unread(self, data: bytes) -> None:
        self.pending = data + self.pending
        self.offset -= len(data)

    def resync(self) -> bool:
        """Moves to the next plausible header at or after the current offset; False if the stream ends first.

        Headers are found by their ``ustar`` magic (offset 257) at any byte offset, not only at 512-byte
        boundaries, so junk of any length inserted into a shard is passed over too; pre-POSIX (v7) headers, which
        have no magic, by their checksum at 512-byte boundaries. Memory stays bounded.
        """
        buf, self.pending, base = self.pending, b"", self.offset
        while True:
            at = _first_header(buf, base)
            if at is not None:
                self.pending, self.offset = buf[at:], base + at
                return True
            drop = max(0, len(buf) - _BLOCK + 1)  # every header start before this was tried; one may straddle
            buf, base = buf[drop:], base + drop
            more = self.stream.read(1 << 16)
            if not more:
                self.offset = base + len(buf)
                return False
            buf += more

    def only_zeros_left(self) -> bool:
        """Reads on over zero bytes: True if nothing else is left (end-of-archive padding). Otherwise the bytes
        from the 512-byte block holding the first non-zero byte on are put back, and the offset is that block's."""
        while True:
            chunk = self.read(1 << 16)
            if not chunk:
                return True
            rest = chunk.lstrip(b"\0")
            if rest:
                first = len(chunk) - len(rest)
                self.unread(chunk[first - first % _BLOCK :])
                return False


def _first_header(buf: bytes, base: int) -> int | None:
    """Where in ``buf`` (which starts at stream offset ``base``) the first plausible header that fits whole
    starts: a ustar header at any offset, or a v7 one (no magic) at a 512-byte boundary of the stream."""
    last = len(buf) - _BLOCK
    best = None
    i = buf.find(b"ustar", 257)
    while i != -1 and i - 257 <= last:
        if _plausible(buf[i - 257 : i - 257 + _BLOCK]):
            best = i - 257
            break
        i = buf.find(b"ustar", i + 1)
    h = -base % _BLOCK
    while h <= last and (best is None or h < best):
        # cheap tests first: most blocks are member data
        if buf[h] != 0 and buf[h + 156 : h + 157] in _TYPES and _plausible(buf[h : h + _BLOCK]):
            return h
        h += _BLOCK
    return best


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256, for sizes of 8 GiB and more
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * len(field) - 8)) if field[:1] == b"\xff" else n
    digits = field.strip(b"\0 ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarError(f"bad number field {field!r}") from None


def _checksum_ok(header: bytes) -> bool:
    try:
        return _number(header[148:156]) == sum(header) - sum(header[148:156]) + 8 * 32
    except TarError:  # not even a number
        return False


def _plausible(header: bytes) -> bool:
    """A header worth resuming at: checksum right, a known type, a name, a size we would read."""
    try:
        ok = _checksum_ok(header) and 0 <= _number(header[124:136]) <= MAX_MEMBER
    except TarError:
        return False
    return ok and header[156:157] in _TYPES and header[0] != 0


def _name(header: bytes) -> str:
    base, prefix = header[:100].split(b"\0", 1)[0], header[345:500].split(b"\0", 1)[0]
    return (prefix + b"/" + base if prefix else base).decode("utf-8", "replace")


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


def tar_members(
    stream: IO[bytes], read: bool = True, resync: bool = False
) -> Iterator[tuple[str, bytes | None] | TarError]:
    """(name, data) of each regular file in the stream; with ``read=False`` data is None and seeked over.

    Damage raises ``TarError``; with ``resync=True`` the error is yielded (``resumed`` set) and reading goes on
    at the next plausible header, if there is one.
    """
    src = _Source(stream)
    long_name: str | None = None
    seen = False  # any header read (intact or not): a stream without one is empty
    zeros_end = -1  # where the last run of zero blocks ended
    while True:
        start = src.offset
        header = src.read(_BLOCK)
        data = pad = None
        try:
            if len(header) < _BLOCK or header == _ZERO:
                if header.strip(b"\0"):  # zeros cut short are only end-of-archive padding
                    exn = TarError("stream ends inside a header", reason="truncated", offset=start)
                    exn.guess = _name(header)
                    raise exn
                if header and not src.only_zeros_left():  # zeros over a header, not the end of the archive
                    seen, zeros_end = True, src.offset
                    raise TarError("zero block inside the archive", reason="zero_block", offset=start)
                if not seen:
                    raise TarError("no tar members", reason="empty_shard", offset=start)
                return  # end-of-archive blocks (or a stream that simply ends between members)
            seen = True
            if not _checksum_ok(header):
                exn = TarError(
                    "header checksum mismatch" if start else "not a tar file (no valid header at its start)",
                    reason="bad_header" if start else "not_a_tar",
                    offset=start,
                )
                exn.guess = _name(header)
                raise exn
            size, kind = _number(header[124:136]), header[156:157]
            name = long_name if long_name is not None else _name(header)
            member = None if kind in (b"x", b"L") else name  # what a failure here breaks
            if not 0 <= size <= MAX_MEMBER:
                raise TarError(f"member of {size} bytes (limit {MAX_MEMBER})", member, reason="oversized_member")
            skip = size + (-size % _BLOCK)  # data, padded to whole blocks
            if read or kind in (b"x", b"L"):
                data = src.read(size)
                if len(data) < size:
                    raise TarError(
                        f"stream ends inside member data ({len(data)} of {size} bytes)", member, reason="truncated"
                    )
                if skip > size:
                    pad = src.read(skip - size)
            else:
                src.skip(skip)
            if kind == b"x":  # pax header: applies to the next member
                pax = _pax(data or b"")
                if b"path" in pax:
                    long_name = pax[b"path"].decode("utf-8", "replace")
                continue
        except TarError as exn:
            if exn.offset is None:
                exn.offset = start
            exn.args = (f"{exn.args[0]} at byte {exn.offset}",)
            if not resync or exn.reason == "empty_shard":
                if resync:
                    yield exn
                    return
                raise exn
            # go on from the byte after the damaged header (what was read past it is put back)
            # (after zero blocks, the offset is already at the first non-zero block)
            if exn.reason != "zero_block" and src.offset > start:
                src.unread(header[1:] + (data or b"") + (pad or b""))
            found = exn.reason != "truncated" and src.resync()
            exn.resumed = src.offset if found else None
            if found and header[156:157] in (b"x", b"g", b"L", b"K"):
                try:
                    extent = _BLOCK + -(-_number(header[124:136]) // _BLOCK) * _BLOCK
                except TarError:
                    extent = -1
                exn.metadata_only = exn.resumed == start + extent  # so the next header is its member's
            if found and exn.reason == "zero_block":
                # an end-of-archive marker (two zero blocks or more) right before a header: archives joined end to
                # end (`cat a.tar b.tar`), which lost nothing; one zero block is a header wiped out
                exn.metadata_only = exn.resumed == zeros_end and zeros_end - start >= 2 * _BLOCK
            long_name = None
            yield exn
            if not found:
                return
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


def _key(name: str | None) -> str | None:
    parts = split_name(name) if name is not None else None
    return parts[0] if parts is not None else None


def _hinted(guess: str | None, key: str | None) -> bool:
    """Whether a damaged header's name names sample ``key``. A pax header's name (``dir/PaxHeaders.N/base``,
    as tarfile writes it) keeps only the member's base name."""
    hint = _key(guess.rpartition("PaxHeaders")[2].rpartition("/")[2] if guess and "PaxHeaders" in guess else guess)
    return hint is not None and key is not None and (key == hint or key.endswith("/" + hint))


def group_samples(
    members: Iterator[tuple[str, bytes | None] | TarError],
    count: Callable[[str], object] | None = None,
    damaged: Callable[[TarError], object] | None = None,
) -> Iterator[dict[str, bytes | str | None]]:
    """Samples (``{"__key__": key, field: data, ...}``) from consecutive members sharing a key.

    A field repeated inside one sample keeps its first value; each repeat is passed to ``count`` as
    ``"duplicate_member"``. A ``TarError`` among the members (``tar_members(..., resync=True)``) is passed to
    ``damaged`` (raised without it); the samples it touches are dropped, counted as ``"samples_lost"``, and
    each whole sample after it as ``"samples_recovered"``. Which samples it touches: the one the broken member
    belongs to, when its header was intact; else the sample in progress and the first one after the damage,
    unless the damaged header's name or a sample that straddles the damage tells which of them lost a member.
    """
    sample: dict[str, bytes | str | None] | None = None
    drop: str | None = None  # the key of a sample lost to damage: its members after the damage are dropped
    doubt: TarError | None = None  # a gap whose broken sample the next member decides
    recovering = False
    before = False  # whether the sample in progress at an unattributed gap itself came after an earlier gap

    def tally(kind: str) -> None:
        if count is not None:
            count(kind)

    def done(s: dict[str, bytes | str | None]) -> dict[str, bytes | str | None]:
        if recovering:
            tally("samples_recovered")
        return s

    try:
        for item in members:
            if isinstance(item, TarError):
                if damaged is None:
                    raise item
                damaged(item)
                current = str(sample["__key__"]) if sample is not None else None
                broken = _key(item.member)
                if item.metadata_only:  # only a pax record was lost (a long path: the name gets shorter)
                    pass
                elif item.member is None:  # unattributed: the next member (or the name hint) decides
                    doubt, before = item, recovering
                elif broken == current:
                    sample = None
                    tally("samples_lost")
                else:  # the broken member began a new sample: the one in progress is whole
                    if sample is not None:
                        yield done(sample)
                        sample = None
                    if broken is not None:
                        drop = broken
                        tally("samples_lost")
                recovering = True
                continue
            name, data = item
            parts = split_name(name)
            if parts is None:
                continue
            key, field = parts
            if doubt is not None:
                current = str(sample["__key__"]) if sample is not None else None
                guess = doubt.guess
                doubt = None
                if current is not None and (key == current or _hinted(guess, current)):  # it lost a member
                    sample = None
                    tally("samples_lost")
                    drop = key if key == current else None
                else:  # the sample after the damage may have lost its first member(s)
                    if sample is not None and _hinted(guess, key):  # ... and did: the one in progress is whole
                        if before:
                            tally("samples_recovered")
                        yield sample
                    elif sample is not None:  # either may have lost one: both go
                        tally("samples_lost")
                    sample = None
                    drop = key
                    tally("samples_lost")
            if drop is not None:
                if key == drop:
                    continue
                drop = None
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield done(sample)
                sample = {"__key__": key}
            if field in sample:
                tally("duplicate_member")
                continue
            sample[field] = data
    except TarError as exn:
        # the sample in progress is whole unless the broken member was one of its own
        cut = _key(exn.member)
        if sample is not None and (cut is None or cut != sample["__key__"]):
            yield sample
        raise
    if doubt is not None and sample is not None:  # damage with nothing readable after it
        # a header cut short by the end of the stream, or zeros and junk after the last member, are the next
        # sample's unless its name says otherwise; anything else may have been this sample's last member
        if doubt.reason not in ("truncated", "zero_block") or _hinted(doubt.guess, str(sample["__key__"])):
            tally("samples_lost")
        else:
            if before:
                tally("samples_recovered")
            yield sample
    elif sample is not None:
        yield done(sample)
