"""The embedded demo data set: images whose captions describe them, written as real webdataset shards.

Two sources, no download:
- rendered scenes of one or two shapes with named colours, sizes and vertical positions on a coloured
  background, captioned from the scene description ("large red circle at the top and small blue square in the
  middle, on gray"; at most ~85 bytes, so the byte tokenizer's 96 tokens hold every caption);
- the 1797 handwritten digits that ship with scikit-learn (real 8x8 scans, UCI), upscaled and captioned by
  their label. A fixed, stratified 30% of the digits is held out of pretraining for probing.

Splits written: ``pretrain-*.tar`` (shapes + training digits), ``val-*.tar`` (unseen shapes),
``digits-train.tar`` and ``digits-test.tar``, and ``index.json``.

Every sample has a ``.cls`` label, so classification pretrains on the same data as the other objectives. The 14
classes (``CLASSES``; ``splits[NAME]["classes"]`` in ``index.json``): a digit is its digit (0..9); a scene is
10 + the index in SHAPES of its top-most shape (the only one, or the upper of two; shapes sit in distinct rows, so
one is always the upper). Colour, size and background are drawn independently of the shape, so the class can only
be told by form, as a digit's can. A training crop of a two-shape scene may cut the upper shape out; the label
still names what the full picture shows (label noise that RandomResizedCrop brings to any classification data).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from aimpre.data.shards import encode_jpeg, publish_dir, write_shards
from aimpre.data.shardset import Shard, expand_shards, shard_set, write_index

VERSION = 3  # bump when the written data changes: the cache is keyed by it
IMAGE_SIZE = 128
COLOURS = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (240, 205, 35),
    "orange": (245, 135, 25), "purple": (135, 55, 175), "pink": (245, 130, 190), "black": (25, 25, 25),
}  # fmt: skip
BACKGROUNDS = {"white": (250, 250, 250), "gray": (150, 150, 150), "beige": (235, 220, 190), "teal": (40, 130, 130)}
SHAPES = ("circle", "square", "triangle", "diamond")
ROWS = {"top": 0.25, "middle": 0.5, "bottom": 0.75}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a handwritten digit {w}", "the number {d}, written by hand", "a scanned handwritten {w}")
CLASSES = (*DIGIT_WORDS, *SHAPES)  # label -> class name: digits 0..9, then a scene's top-most shape


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: Any) -> None:
    """Draws ``shape`` centred at (cx, cy) with half-width ``r`` pixels (a mask when ``draw`` is on an "L" image)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def render_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[Image.Image, str, int]:
    """One picture of shapes, the sentence that describes it, and its label (its top-most shape, in CLASSES)."""
    img, caption, label, _ = render_scene_facts(rng, size)
    return img, caption, label


def render_scene_facts(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[Image.Image, str, int, dict]:
    """``render_scene`` (the same draws from ``rng``, so the same picture) and the facts it drew: ``background``
    and ``objects``, in drawing order (a later one may cover part of an earlier one), each with ``shape``,
    ``colour``, ``large``, ``row`` and its geometry in pixels ``cx``, ``cy``, ``r`` (see ``draw_shape``)."""
    bg = str(rng.choice(list(BACKGROUNDS)))
    img = Image.new("RGB", (size, size), BACKGROUNDS[bg])
    draw = ImageDraw.Draw(img)
    rows = rng.permutation(list(ROWS))[: rng.integers(1, 3)]  # one shape per row: positions stay distinct
    palette = [c for c in COLOURS if not (bg == "white" and c == "white")]
    parts: list[str] = []
    shapes: dict[float, str] = {}  # row height -> shape
    objects: list[dict[str, Any]] = []
    for row in rows:
        colour, shape = str(rng.choice(palette)), str(rng.choice(SHAPES))
        large = bool(rng.random() < 0.5)
        r = size * (rng.uniform(0.14, 0.2) if large else rng.uniform(0.06, 0.1))
        cx = rng.uniform(r + 2, size - r - 2)
        cy = ROWS[str(row)] * size + rng.uniform(-0.05, 0.05) * size
        draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
        where = "in the middle" if row == "middle" else f"at the {row}"
        parts.append(f"{'large' if large else 'small'} {colour} {shape} {where}")
        shapes[ROWS[str(row)]] = shape
        objects.append({"shape": shape, "colour": colour, "large": large, "row": str(row), "cx": cx, "cy": cy, "r": r})
    facts = {"background": bg, "objects": objects}
    return img, " and ".join(parts) + f", on {bg}", CLASSES.index(shapes[min(shapes)]), facts


def render_digit(pixels: np.ndarray, size: int = IMAGE_SIZE) -> Image.Image:
    """An 8x8 scan (0..16, ink high) as dark ink on white paper, upscaled smoothly."""
    ink = (pixels.reshape(8, 8) / 16.0 * 255.0).astype(np.uint8)
    return Image.fromarray(255 - ink, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def digit_split(labels: np.ndarray, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split of the digits: (train indices, test indices)."""
    rng = np.random.default_rng(seed)
    test = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.extend(idx[: round(len(idx) * test_fraction)].tolist())
    test_arr = np.sort(np.array(test))
    return np.setdiff1d(np.arange(len(labels)), test_arr), test_arr


def _scene_samples(n: int, seed: int, tag: str) -> Iterator[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    for i in range(n):
        img, caption, label = render_scene(rng)
        yield {"__key__": f"{tag}{i:06d}", "jpg": encode_jpeg(img), "txt": caption, "cls": str(label)}


def _digit_samples(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in idx:
        d = int(labels[i])
        caption = str(rng.choice(DIGIT_TEMPLATES)).format(w=DIGIT_WORDS[d], d=d)
        jpg = encode_jpeg(render_digit(images[i]))
        out.append({"__key__": f"digit{i:04d}", "jpg": jpg, "txt": caption, "cls": str(d)})
    return out


def write_demo(out: Path, n_scenes: int = 6000, n_val: int = 512, per_shard: int = 500) -> Path:
    """Writes the demo shards into ``out`` (created whole, atomically; an existing one is an error)."""
    from sklearn.datasets import load_digits

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    digits = load_digits()
    train_idx, test_idx = digit_split(digits.target)
    digit_train = _digit_samples(digits.data, digits.target, train_idx, seed=1)
    pretrain = list(_scene_samples(n_scenes, seed=2, tag="scene")) + digit_train
    order = np.random.default_rng(3).permutation(len(pretrain))  # mix sources across shards
    splits = {
        "pretrain": write_shards((pretrain[i] for i in order), tmp, "pretrain", per_shard),
        "val": write_shards(_scene_samples(n_val, seed=4, tag="val"), tmp, "val", per_shard),
        "digits-train": write_shards(iter(digit_train), tmp, "digits-train", 10**6),
        "digits-test": write_shards(
            iter(_digit_samples(digits.data, digits.target, test_idx, seed=5)), tmp, "digits-test", 10**6
        ),
    }
    counts = {"pretrain": len(pretrain), "val": n_val, "digits-train": len(train_idx), "digits-test": len(test_idx)}
    write_index(
        tmp,
        {name: n for written in splits.values() for name, n in written.items()},
        demo_version=VERSION,
        image_size=IMAGE_SIZE,
        splits={
            k: {"shards": list(v), "samples": counts[k], "classes": list(DIGIT_WORDS if "digits" in k else CLASSES)}
            for k, v in splits.items()
        },
        sources={"scenes": "rendered shapes", "digits": "sklearn.datasets.load_digits (UCI, 8x8 scans)"},
    )
    return publish_dir(tmp, out)


def cache_root() -> Path:
    if "AIMPRE_CACHE" in os.environ:
        return Path(os.environ["AIMPRE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aimpre"


def demo_dir() -> Path:
    """The demo data in the cache directory, written on first use."""
    path = cache_root() / f"demo-v{VERSION}"
    if not (path / "index.json").exists():
        write_demo(path)
    return path


def demo_shards(split: str, root: Path | None = None) -> list[str]:
    """Shard paths of one demo split ("pretrain", "val", "digits-train", "digits-test")."""
    root = demo_dir() if root is None else root
    index = json.loads((root / "index.json").read_text())
    if split not in index["splits"]:
        raise ValueError(f"demo data has no split {split!r}; splits: {list(index['splits'])}")
    return [str(root / name) for name in index["splits"][split]["shards"]]


def demo_spec(spec: str, default_split: str | None = None) -> list[str] | None:
    """Shard paths for the shard spec ``demo:SPLIT`` (or ``demo``: ``default_split``); None for any other spec."""
    if spec != "demo" and not spec.startswith("demo:"):
        return None
    split = spec.partition(":")[2] or default_split
    if split is None:
        raise ValueError(f"shard spec {spec!r}: name a split, as demo:SPLIT")
    try:
        return demo_shards(split)
    except ValueError as e:
        raise ValueError(f"shard spec {spec!r}: {e}") from e


def spec_urls(spec: str, default_split: str | None = None) -> list[str]:
    """Shard paths of one spec: ``demo`` (the demo's ``default_split``), ``demo:SPLIT``, or a shard spec."""
    return demo_spec(spec, default_split) or expand_shards(spec)


def sources(spec: str | list[str], demo_split: str, need_counts: bool, index: str | None) -> list[list[Shard]]:
    """One shard set per source; "demo" is the embedded demo data's ``demo_split``, "demo:SPLIT" another split."""
    specs = spec if isinstance(spec, list) else [spec]
    out = []
    for s in specs:
        urls = demo_spec(s, demo_split)
        out.append(shard_set(s, need_counts, index) if urls is None else shard_set(urls, need_counts))
    return out
