"""One raw sample -> (uint8 image [3, S, S], caption, label), or the reason it is skipped.

Image: the crop box is chosen from the header alone; JPEGs are then draft-decoded at the smallest DCT scale
(1/2, 1/4, 1/8) that keeps the crop at least S pixels on each side, and the crop is resized once, bicubic with
antialiasing as AIMv2's RandomResizedCrop. The resize runs in torch's uint8 kernels: within 3/255 of PIL's
bicubic (mean 0.01) at about a sixth of its cost, which was most of the loader's time (docs/benchmarks.md).
Colour JPEGs, nearly all of a web-scale set, skip PIL's image object: their size comes from our read of the
frame header and libjpeg-turbo writes the pixels straight into our array (Pillow's pixels, fewer copies).
Images over ``max_pixels``, or whose decoding would hold more than ``max_bytes`` (the encoded bytes plus every
decoded copy of the pixels, worked out from the header: a 12 KB 1-bit PNG of 10^8 pixels takes 0.8 GB), are
refused before decoding (decompression bombs). Pillow decodes only JPEGs at a reduced scale (``draft``); other
formats decode whole, so for them the byte bound is what holds.
Palette, alpha, CMYK and 16-bit images are converted to 8-bit RGB, transparency composited on white.
Caption: ``KEY.txt`` (UTF-8), else ``KEY.json``'s "caption" (or "text") string.
Label: ``KEY.cls`` (an integer), else ``KEY.json``'s "label" (or "cls") field; classes are 0..num_classes-1.
Only the fields an objective reads are required (``need``): an image-only objective keeps uncaptioned samples.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from aimpre.data.native import fit_size
from aimpre.files import parse_json

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
# Reasons a sample is skipped (each counted); every reader reports these keys.
SKIP_REASONS = (
    "missing", "no_image", "empty_image", "too_large", "bad_image", "no_caption", "empty_caption", "bad_caption",
    "no_label", "bad_label",
)  # fmt: skip
FIELDS = frozenset({"text", "label"})  # what a sample may have to carry besides its image (objectives.needs)
MAX_SAMPLE_JSON = 1 << 20  # bytes of a sample's .json: captions and metadata are a few KB
MAX_TOKEN_BYTES = 64  # bytes of caption one token may stand for, generously (byte-level: 1; a BPE: a word or two)
MAX_CLASSES = 1_000_000  # labels must lie below: a probe or classifier head is sized by them (ImageNet-21k: 21841)


@dataclass(frozen=True)
class Augment:
    size: int
    scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    train: bool = True  # False: centre square crop, no flip
    max_pixels: int = 100_000_000
    max_bytes: int = 512 << 20  # memory one image's decoding may take (see decode_bytes)
    # native resolution: (height, width) in pixels of the batch's canvas; the whole image is resized, aspect kept,
    # to the largest size that fits it (no crop, so no square), flipped as ``hflip`` says; ``size`` is unused
    canvas: tuple[int, int] | None = None


def crop_box(W: int, H: int, aug: Augment, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """RandomResizedCrop's box (torchvision semantics), or the centre square when not training."""
    if aug.train:
        for _ in range(10):
            area = W * H * rng.uniform(*aug.scale)
            ar = math.exp(rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1])))
            w, h = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
            if 0 < w <= W and 0 < h <= H:
                x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
                return x, y, x + w, y + h
    side = min(W, H)
    left, top = (W - side) / 2, (H - side) / 2
    return left, top, left + side, top + side


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    elif img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)  # 16-bit, 32-bit int or float grey
        top = 65535.0 if img.mode.startswith("I") and a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_bytes(mode: str, w: int, h: int) -> int:
    """Peak bytes of pixels decoding a ``w`` x ``h`` image of ``mode`` to our RGB array takes (``_to_rgb``).

    Pillow holds 1 byte per pixel for modes 1, L and P (a 1-bit image costs 8 times its bits), 2 for 16-bit grey,
    4 for the rest; the RGB image adds 4, and our array 3 + 3 (numpy copies the bytes Pillow packs it into);
    compositing alpha adds up to three RGBA images, scaling 16/32-bit grey three float64 arrays and a few bytes.
    Measured: a 1-bit 7000 x 7000 PNG peaks at 541 MB above the process's baseline, this says 539 MB.
    """
    held = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    extra = 12 if mode in ("RGBA", "LA", "PA", "P") else 28 if mode.startswith("I") or mode == "F" else 0
    return w * h * (held + 4 + 6 + extra)


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (0xC4, 0xC8, 0xCC are other segments)


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header, without Pillow; None if there is none."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 10 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker in _SOF:
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big"), data[i + 9]
        if marker == 0xFF:  # fill byte
            i += 1
        elif 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _jpeg_rgbx(data: bytes, size: tuple[int, int], scale: int, rows: int | None = None) -> np.ndarray:
    """Decodes a 3-component JPEG at 1/``scale`` straight into a new uint8 [h, w, 4] array (RGB + padding),
    or only its first ``rows`` rows when the data is whole (ends with the end-of-image marker).

    Pillow holds RGB as RGBX in its own memory and packs it to RGB when asked for an array (one copy, two for
    ``np.array``). Here libjpeg-turbo writes RGBX into our array instead, through the decoder object that
    ``ImageFile.load`` uses, with the settings Pillow's ``draft`` would give: the same pixels, about 0.15 ms
    less per 512x384 image. Stopping at the crop's last row saves the rest (6% of a bench image on average).
    Truncated data is always decoded to its end, so it fails here whatever the crop, as it does in Pillow.
    """
    w, h = -(-size[0] // scale), -(-size[1] // scale)  # libjpeg's scaled size, rounded up
    n = min(rows, h) if rows is not None and data.endswith(b"\xff\xd9") else h
    out = np.empty((n, w, 4), dtype=np.uint8)
    out[-1, 0, 3] = 0  # libjpeg writes 255 to the padding channel: shows whether the last row came
    target = Image.frombuffer("RGBX", (w, n), out, "raw", "RGBX", 0, 1)
    decoder = Image._getdecoder("RGB", "jpeg", ("RGBX", ""), (scale, 0))
    try:
        decoder.setimage(target.im, (0, 0, w, n))
        consumed, err = decoder.decode(data)
    finally:
        decoder.cleanup()
    # consumed >= 0: it wants more data (truncated); err < 0: libjpeg gave up, which it also does, after the
    # last row we asked for, when we stop before the end of the image
    if consumed >= 0 or out[-1, 0, 3] != 255 or (err < 0 and n == h):
        raise OSError("truncated or broken JPEG data")
    return out


def decode_image(data: bytes, aug: Augment, rng: np.random.Generator) -> Tensor | str:
    """Bytes -> uint8 [3, S, S] (channels-last in memory, possibly a view of 4 channels), or a skip reason; with
    ``aug.canvas`` [3, h, w], the image's aspect kept inside the canvas."""
    if not data:
        return "empty_image"
    if len(data) > aug.max_bytes:
        return "too_large"
    frame = jpeg_frame(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image | None = None
            if frame is not None and frame[2] == 3:  # a colour JPEG: the fast path below
                W, H = frame[:2]
            else:
                img = Image.open(io.BytesIO(data))
                W, H = img.size
            if aug.max_pixels < W * H:
                return "too_large"
            if aug.canvas is None:
                x0, y0, x1, y1 = crop_box(W, H, aug, rng)
                oh = ow = aug.size
            else:  # native: the whole image, aspect kept
                x0, y0, x1, y1 = 0, 0, W, H
                oh, ow = fit_size(H, W, *aug.canvas)
            # JPEG decodes at 1/2, 1/4, 1/8 scale: take the smallest that keeps the crop at >= its output size
            need = (math.ceil(W * ow / (x1 - x0)), math.ceil(H * oh / (y1 - y0)))
            if img is None:  # Pillow's draft scale, computed as Pillow does
                most = min(W // need[0], H // need[1])
                scale = next((s for s in (8, 4, 2) if most >= s), 1)
                w, h = -(-W // scale), -(-H // scale)
                held = w * h * 4  # the RGBX array libjpeg writes into
            else:
                img.draft("RGB", need)
                w, h = img.size
                held = decode_bytes(img.mode, w, h)
            if len(data) + held > aug.max_bytes:
                return "too_large"
            sx, sy = w / W, h / H  # the crop box in decoded pixels, never empty:
            top, left = min(round(y0 * sy), h - 1), min(round(x0 * sx), w - 1)
            bottom, right = max(round(y1 * sy), top + 1), max(round(x1 * sx), left + 1)
            # [<= h, w, 4] from the fast path (rows below the crop not decoded), else [h, w, 3]
            pixels = _jpeg_rgbx(data, (W, H), scale, rows=bottom) if img is None else np.array(_to_rgb(img))
    except Image.DecompressionBombError:
        return "too_large"
    except Exception:  # PIL raises many types on corrupt or truncated data: every one is a bad sample
        return "bad_image"
    x = torch.from_numpy(pixels[top:bottom, left:right]).permute(2, 0, 1)[None]  # [1, C, h, w], channels-last:
    out = F.interpolate(x, size=(oh, ow), mode="bicubic", antialias=True)[0, :3]  # torch's fast path
    if aug.train and aug.hflip and rng.random() < 0.5:
        out = out.flip(-1)
    return out


def caption_bytes(text_len: int) -> int:
    """The most caption bytes ``text_len`` tokens can use: a token of any tokenizer we know is far below
    ``MAX_TOKEN_BYTES`` bytes, so a caption cut there still fills the budget (and still counts as truncated)."""
    return text_len * MAX_TOKEN_BYTES


def _cut_utf8(data: bytes, n: int) -> bytes:
    """The first ``n`` bytes or fewer, not splitting a UTF-8 character."""
    if len(data) <= n:
        return data
    end = n
    while end > max(0, n - 3) and data[end] & 0xC0 == 0x80:  # a continuation byte: the cut is inside a character
        end -= 1
    return data[:end]


def _meta(sample: dict[str, Any]) -> Any:
    """A sample's ``.json``, bounded in size and depth (UntrustedInputError, a ValueError, if over)."""
    return parse_json(sample["json"], f"sample {sample.get('__key__')!r} .json", MAX_SAMPLE_JSON)


def caption_of(sample: dict[str, Any], max_bytes: int | None = None) -> tuple[str | None, str | None]:
    """(caption, None), or (None, skip reason).

    Args:
        sample: raw sample fields.
        max_bytes: cut the caption to this many bytes (``KEY.txt``) or characters (a ``.json`` caption) before
            decoding it (``caption_bytes``): a 100 MB caption costs no more than the tokens it can use.
    """
    try:
        if "txt" in sample:
            raw = sample["txt"] if max_bytes is None else _cut_utf8(sample["txt"], max_bytes)
            text: Any = raw.decode("utf-8")
        elif "json" in sample:
            meta = _meta(sample)
            text = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
            if text is None:
                return None, "no_caption"
            if not isinstance(text, str):
                return None, "bad_caption"
            text = text if max_bytes is None else text[:max_bytes]
        else:
            return None, "no_caption"
    except (UnicodeDecodeError, ValueError):  # UntrustedInputError (too large, too deep) is a ValueError
        return None, "bad_caption"
    text = text.strip()
    return (text, None) if text else (None, "empty_caption")


def sample_label(sample: dict[str, Any]) -> tuple[int | None, str | None]:
    """(label, None), or (None, skip reason): "no_label" when the sample has none, "bad_label" when it is not a
    non-negative integer below ``MAX_CLASSES`` (a bool or a fractional number is no class index either)."""
    try:
        if "cls" in sample:
            if len(sample["cls"]) > 64:  # int() of a long digit string is quadratic
                return None, "bad_label"
            value: Any = int(sample["cls"].decode().strip())
        elif "json" in sample:
            meta = _meta(sample)
            value = meta.get("label", meta.get("cls")) if isinstance(meta, dict) else None
            if value is None:
                return None, "no_label"
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                return None, "bad_label"
            value = int(value)
        else:
            return None, "no_label"
    except (ValueError, TypeError, AttributeError, OverflowError):  # UnicodeDecodeError is a ValueError
        return None, "bad_label"
    return (value, None) if 0 <= value < MAX_CLASSES else (None, "bad_label")


def decode_fields(
    sample: dict[str, Any] | None,
    aug: Augment,
    rng: np.random.Generator,
    need: frozenset[str],
    num_classes: int | None = None,
    text_len: int | None = None,
) -> tuple[Tensor, str | None, int | None] | str:
    """A raw sample -> (image, caption, label), or a reason from SKIP_REASONS.

    Only the fields in ``need`` are read (the other is None), so a sample lacking one nobody reads is kept.
    A label of ``num_classes`` or more is a "bad_label". The cheap checks come first: no image is decoded for a
    sample that is skipped anyway. ``text_len`` (tokens) bounds the caption bytes read (``caption_bytes``).
    """
    if sample is None:
        return "missing"  # lost to a truncated or unreadable shard
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        return "no_image"
    caption = label = None
    if "text" in need:
        caption, reason = caption_of(sample, None if text_len is None else caption_bytes(text_len))
        if caption is None:
            return reason or "no_caption"
    if "label" in need:
        label, reason = sample_label(sample)
        if label is None:
            return reason or "no_label"
        if num_classes is not None and label >= num_classes:
            return "bad_label"
    image = decode_image(sample[image_key], aug, rng)
    return image if isinstance(image, str) else (image, caption, label)


def decode_sample(
    sample: dict[str, Any] | None, aug: Augment, rng: np.random.Generator, text_len: int | None = None
) -> tuple[Tensor, str] | str:
    """A raw sample -> (image, caption), or a reason from SKIP_REASONS: what an image-text objective reads."""
    out = decode_fields(sample, aug, rng, frozenset({"text"}), text_len=text_len)
    if isinstance(out, str):
        return out
    assert out[1] is not None  # a needed caption is always there
    return out[0], out[1]
