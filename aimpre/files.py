"""Atomic file writes: every file aimpre writes appears whole or not at all (temp file beside it, then
``os.replace``), so an interrupted run, sweep, collect or fit never leaves a truncated config, table or
checkpoint."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


def symlink(target: str, link: str | Path) -> None:
    """Points ``link`` at ``target`` (a path relative to the link's folder), replacing it atomically."""
    with atomic_path(link) as tmp:
        os.symlink(target, tmp)
