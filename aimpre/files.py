"""Atomic file writes: every file aimpre writes appears whole or not at all (temp file beside it, then
``os.replace``), so an interrupted run, sweep, collect or fit never leaves a truncated config, table or
checkpoint."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside ``path`` to write to: renamed onto ``path`` if the block succeeds, removed if not."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        os.replace(tmp, p)
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
