"""Atomic file writes: every file aimpre writes appears whole or not at all (temp file beside it, then
``os.replace``), so an interrupted run, sweep, collect or fit never leaves a truncated config, table or
checkpoint."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import resource
import shutil
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


class WriteError(OSError):
    """Writing a file failed for want of room: the message names the file, the free space on its filesystem and
    any file size limit, which is what the user needs to act on (the errors themselves name neither)."""

    def __init__(self, path: Path, reason: str) -> None:
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**30:.2f} GiB free on its filesystem"
        except OSError:
            free = "free space unknown"
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            free += f"; this process may not write files over {limit} bytes (ulimit -f)"
        super().__init__(f"could not write {path}: {reason}; {free}")
        self.filename = str(path)  # OSError's own str() would then print "[Errno None]": keep ours

    def __str__(self) -> str:
        return str(self.args[0])


# a full disk, a quota, a file over RLIMIT_FSIZE
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside ``path`` to write to: renamed onto ``path`` if the block succeeds, removed if not.

    A write that fails for want of room raises WriteError naming ``path`` and the free space."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    if tmp.is_symlink():  # planted under the name we would write through: writing would follow it
        tmp.unlink()
    try:
        yield tmp
        os.replace(tmp, p)
    except OSError as e:
        if e.errno in NO_ROOM:
            raise WriteError(p, e.strerror or str(e)) from e
        raise
    except RuntimeError as e:
        # torch.save's zip writer turns a failed write (ENOSPC, EFBIG) into "[enforce fail at inline_container.cc:
        # ...] ... unexpected pos" or "file write failed", dropping the errno
        if "inline_container" in str(e):
            raise WriteError(p, f"torch.save could not write all of it ({str(e).strip()[:200]})") from e
        raise
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def copy(src: str | Path, dst: str | Path) -> None:
    """Copies a file, or a directory tree (a sharded checkpoint), onto ``dst`` atomically."""
    if Path(src).is_dir():
        with atomic_path(dst) as tmp:
            shutil.copytree(src, tmp)
            if Path(dst).is_dir():  # os.replace cannot replace a non-empty directory: an earlier partial copy
                shutil.rmtree(dst)
        return
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def current_umask() -> int:
    """The process's file-creation mask: from /proc where there is one (reading it there changes nothing), else set
    and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, atomically, with the file mode ``open()`` would have given (0644 under umask
    022; safetensors 0.8 writes a 0600 temp file and renames it, so exported weights were unreadable to the other
    users of a shared cluster). A failed write is the OSError it was (a full disk, a file size limit: WriteError
    naming the file and the free space), not safetensors' SafetensorError, which carries the errno only as text
    ("File too large (os error 27)"; older versions: "code: 27").

    Args:
        tensors: name -> tensor (contiguous, on the CPU).
        path: the file to write.
        metadata: string metadata for the header.
    """
    from safetensors import SafetensorError  # here: files is imported by code that needs no torch
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:
            m = re.search(r"\b(?:os error|code:) (\d+)", str(e))
            if m is None:
                raise
            code = int(m[1])
            raise OSError(code, os.strerror(code), str(path)) from e
        os.chmod(tmp, 0o666 & ~current_umask())


def symlink(target: str, link: str | Path) -> None:
    """Points ``link`` at ``target`` (a path relative to the link's folder), replacing it atomically."""
    with atomic_path(link) as tmp:
        os.symlink(target, tmp)


class UntrustedInputError(ValueError):
    """A file we read is malformed or implausible (too large, nested too deeply, not a regular file): the message
    names the file and what is wrong; nothing was allocated or run on its account."""


# bounds for the small metadata files aimpre reads back (configs, summaries, export metadata, plans, indexes): far
# above anything we write, far below what would hang or exhaust a process
MAX_METADATA_BYTES = 64 * 2**20
MAX_DEPTH = 64


def regular_file(path: str | Path, what: str = "file") -> Path:
    """``path`` if it is a regular file (symlinks followed); FIFOs, devices, sockets and directories are refused,
    since reading one can hang or never end."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {p}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise UntrustedInputError(f"{what} {p} is {kind}")
    return p


def file_present(path: str | Path, what: str = "file") -> bool:
    """Whether the regular file ``path`` is there: False if nothing is (a dangling link included), refused in one
    line if something else is (a FIFO, device, socket or directory), so a caller asking "is this a run?" says what
    is wrong instead of "missing" or "not a run"."""
    try:
        regular_file(path, what)
    except FileNotFoundError:
        return False
    return True


def read_bytes(path: str | Path, what: str = "file", max_bytes: int = MAX_METADATA_BYTES) -> bytes:
    """A regular file's bytes, refused in one line if it is larger than ``max_bytes`` (checked before reading)."""
    p = regular_file(path, what)
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise UntrustedInputError(f"{what} {p} is {size} bytes, over the {max_bytes} this file may have")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while we read it
        raise UntrustedInputError(f"{what} {p} is over the {max_bytes} bytes this file may have")
    return data


def check_depth(obj: object, what: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuses containers nested deeper than ``max_depth`` (iteratively: no recursion to exhaust)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict | list | tuple):
            if d > max_depth:
                raise UntrustedInputError(f"{what} nests lists or mappings deeper than {max_depth} levels")
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))


def parse_json(data: str | bytes, what: str, max_bytes: int = MAX_METADATA_BYTES, max_depth: int = MAX_DEPTH) -> object:
    """JSON text (a file's content, a sample's ``.json``, a metadata string) with its size and depth bounded; any
    failure is one UntrustedInputError naming ``what``."""
    if len(data) > max_bytes:
        raise UntrustedInputError(f"{what} is {len(data)} bytes, over the {max_bytes} it may have")
    try:
        obj = json.loads(data)
    except RecursionError:
        raise UntrustedInputError(f"{what} nests lists or mappings deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UntrustedInputError(f"{what} is not valid JSON ({str(e).splitlines()[0][:200]})") from None
    check_depth(obj, what, max_depth)
    return obj


def read_json(path: str | Path, what: str = "JSON file", max_bytes: int = MAX_METADATA_BYTES) -> object:
    """A JSON file, bounded as ``parse_json`` (and refused if it is not a regular file)."""
    return parse_json(read_bytes(path, what, max_bytes), f"{what} {path}", max_bytes)


def read_json_object(path: str | Path, what: str = "JSON file", max_bytes: int = MAX_METADATA_BYTES) -> dict:
    """A JSON file that must hold an object (our summaries, records and plans), bounded as ``read_json``."""
    obj = read_json(path, what, max_bytes)
    if not isinstance(obj, dict):
        raise UntrustedInputError(f"{what} {path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def read_text(path: str | Path, what: str = "file", max_bytes: int = MAX_METADATA_BYTES) -> str:
    """A regular file's UTF-8 text, bounded as ``read_bytes``; text that is not UTF-8 is one UntrustedInputError."""
    data = read_bytes(path, what, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UntrustedInputError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None


# metrics.csv: the full AIMv2 schedule (1.5M steps) logged every 10 steps is 150k rows, about 40 MB
MAX_CSV_BYTES = 128 * 2**20
MAX_CSV_ROWS = 1_000_000


def read_csv(path: str | Path, what: str = "CSV file", max_bytes: int = MAX_CSV_BYTES) -> list[dict[str, str]]:
    """A CSV file's rows (``csv.DictReader``), bounded: its size before reading, its row count, and each field at
    csv's own limit (131,072 characters). Anything malformed (a longer field, a NUL byte, text that is not UTF-8)
    is one UntrustedInputError naming the file and line: a file we wrote that no longer parses is corrupt, and
    skipping rows of it would report numbers it does not hold."""
    p = regular_file(path, what)
    rows: list[dict[str, str]] = []
    with open(p, newline="", encoding="utf-8-sig") as f:  # -sig: drops the byte-order mark Excel writes
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise UntrustedInputError(f"{what} {p} is {size} bytes, over the {max_bytes} this file may have")
        reader = csv.DictReader(f)
        try:
            for row in reader:
                if len(rows) == MAX_CSV_ROWS:
                    raise UntrustedInputError(f"{what} {p} has over {MAX_CSV_ROWS} rows")
                rows.append(row)
        except csv.Error as e:
            raise UntrustedInputError(f"{what} {p} after line {reader.line_num}: {e}") from None
        except UnicodeDecodeError as e:
            raise UntrustedInputError(f"{what} {p} is not UTF-8 text (byte {e.start})") from None
    return rows


# Files in a run directory are written in place only by appends (metrics.csv, out.log) and the lock; everything
# else goes through atomic_path, whose os.replace replaces a symlink instead of following it. A run directory may
# come from anyone, so these few are opened without following a symlink, and only if they are regular files.


def open_fd_in_run(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` of a file in a run directory that refuses, in one UntrustedInputError naming it, a symlink
    (``O_NOFOLLOW``) and anything but a regular file (a FIFO would block: it is opened non-blocking, then checked).

    Args:
        path: the file.
        flags: ``os.O_*`` flags (``O_NOFOLLOW``, ``O_NONBLOCK`` and ``O_CLOEXEC`` are added).
        mode: permissions of a file this creates.
    """
    p = Path(path)
    try:
        fd = os.open(p, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UntrustedInputError(f"{p} is a symbolic link: aimpre does not write through links in a run "
                                      f"directory (remove it)") from None  # fmt: skip
        if e.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            raise UntrustedInputError(f"{p} is not a regular file (a FIFO, device or socket)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UntrustedInputError(f"{p} is not a regular file (a FIFO, device or socket)")
    os.set_blocking(fd, True)
    return fd


def open_in_run(path: str | Path, mode: str = "a") -> IO[str]:
    """A run directory's text file opened for appending (``"a"``) or reading (``"r"``), as ``open_fd_in_run``;
    rows are written as ``csv`` wants them (``newline=""``)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT if mode == "a" else os.O_RDONLY
    return os.fdopen(open_fd_in_run(path, flags), mode, newline="")


def check_run_dir(run_dir: Path, subdirs: tuple[str, ...] = ("checkpoints", "tensorboard", "wandb")) -> None:
    """Refuses a run directory that is a symlink, or whose ``subdirs`` are: every file written below one would
    land wherever it points. (``run.out_dir`` itself may be a link: it is the user's choice of where runs go.)"""
    for p in (run_dir, *(run_dir / d for d in subdirs)):
        if p.is_symlink():
            raise UntrustedInputError(f"{p} is a symbolic link: aimpre writes a run only into real directories "
                                      f"(point run.out_dir where the run should go instead)")  # fmt: skip
