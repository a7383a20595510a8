"""``aimpre data make-shards``: image-caption pairs -> webdataset shards in the img2dataset layout.

Each sample is ``KEY.jpg`` (or the source's own image format when not resized) + ``KEY.txt`` (the caption) +
``KEY.json`` ({"caption", "source"}), keys numbered in order. Sources: a folder of images with sidecar captions
(``a/b.jpg`` + ``a/b.txt`` or ``a/b.json``), a CSV/TSV with a header (``path,caption`` by default; relative
paths are taken from the CSV's folder), or existing shards (re-sharding). Every image is decoded once to vet it;
``max_side`` shrinks larger ones (JPEG q95), and is recorded in the output's ``index.json`` beside per-shard
counts and the skips by reason.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from aimpre.data.decode import IMAGE_KEYS, MAX_SAMPLE_JSON, caption_of
from aimpre.data.reader import ReadErrors, shard_samples
from aimpre.data.shards import publish_dir, write_shards
from aimpre.data.shardset import expand_shards, write_index
from aimpre.files import UntrustedInputError, read_bytes
from aimpre.progress import progress

Item = tuple[str, bytes | None, str | None, str]  # (source name, image bytes, caption, image extension) or skip


KEEP_NAMES = 100  # skipped files named per reason (in index.json; the CLI prints the first few)


@dataclass
class Summary:
    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_files: dict[str, list[str]] = field(default_factory=dict)  # the first KEEP_NAMES by reason

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason] += 1
        names = self.skipped_files.setdefault(reason, [])
        if len(names) < KEEP_NAMES:
            names.append(name)


def _sidecar_caption(image: Path) -> str | None:
    for ext in ("txt", "json"):
        side = image.with_suffix(f".{ext}")
        if side.exists():
            try:  # bounded: a caption file of gigabytes is no caption (the image is skipped and named)
                data = read_bytes(side, "caption file", MAX_SAMPLE_JSON)
            except (UntrustedInputError, OSError):
                return None
            caption, _ = caption_of({"__key__": str(image), ext: data})
            return caption
    return None


def from_folder(root: Path) -> Iterator[Item]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_KEYS and p.is_file())
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_KEYS)}) under {root}")
    for p in images:
        yield str(p.relative_to(root)), p.read_bytes(), _sidecar_caption(p), p.suffix.lower().lstrip(".")


def from_csv(path: Path, path_col: str = "path", caption_col: str = "caption") -> Iterator[Item]:
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter=delimiter)
        try:  # csv bounds each field (csv.field_size_limit, 128 KiB) but raises its own csv.Error
            missing = [c for c in (path_col, caption_col) if c not in (rows.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: no column {missing[0]!r} (columns: {rows.fieldnames})")
            for row in rows:
                if row[path_col] is None:  # fewer fields than the header
                    raise ValueError(f"{path}, line {rows.line_num}: no {path_col!r} field")
                p = Path(row[path_col])
                p = p if p.is_absolute() else path.parent / p
                data = p.read_bytes() if p.is_file() else None
                yield row[path_col], data, (row[caption_col] or "").strip() or None, p.suffix.lower().lstrip(".")
        except csv.Error as e:
            raise ValueError(f"{path}, line {rows.line_num + 1}: {e}") from None  # the line it could not read


def from_shards(spec: str) -> Iterator[Item]:
    errors = ReadErrors()
    for url in expand_shards(spec):
        for s in shard_samples(url, errors):
            ext = next((k for k in IMAGE_KEYS if k in s), "")
            caption, _ = caption_of(s)
            yield f"{url}:{s['__key__']}", s.get(ext) if ext else None, caption, ext


def _vet(data: bytes, ext: str, max_side: int | None) -> tuple[bytes, str] | str:
    """The bytes to store (resized if needed) and their extension, or a skip reason."""
    if not data:
        return "empty_image"
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        img.load()
    except Image.DecompressionBombError:
        return "too_large"
    except Exception:
        return "bad_image"
    if max_side is None or max(img.size) <= max_side:
        return data, "jpg" if ext == "jpeg" else ext
    img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    if img.mode != "RGB":
        img = img.convert("RGBA") if "A" in img.mode or "transparency" in img.info else img
        if img.mode == "RGBA":
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            bg.alpha_composite(img)
            img = bg
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), "jpg"


def make_shards(
    items: Iterator[Item], out: Path, per_shard: int = 1000, max_side: int | None = None, prefix: str = "shard"
) -> Summary:
    """Writes shards + ``index.json`` into ``out`` (created whole, atomically; an existing one is an error)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --out directory")
    if per_shard < 1:
        raise ValueError(f"--per-shard must be >= 1, got {per_shard}")
    summary = Summary()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()

    def samples() -> Iterator[dict]:
        for name, data, caption, ext in progress(items, "make-shards", unit="img"):
            if data is None:
                summary.skip("no_image", name)
                continue
            if caption is None:
                summary.skip("no_caption", name)
                continue
            vetted = _vet(data, ext, max_side)
            if isinstance(vetted, str):
                summary.skip(vetted, name)
                continue
            key = f"{summary.written:09d}"
            summary.written += 1
            meta = json.dumps({"caption": caption, "source": name}, ensure_ascii=False)
            yield {"__key__": key, vetted[1]: vetted[0], "txt": caption, "json": meta}

    counts = write_shards(samples(), tmp, prefix, per_shard)
    summary.shards = list(counts)
    write_index(
        tmp,
        counts,
        max_side=max_side,
        written=summary.written,
        skipped=dict(summary.skipped),
        skipped_files=summary.skipped_files,
    )
    publish_dir(tmp, out)
    return summary
