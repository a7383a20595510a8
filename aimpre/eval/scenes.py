"""Held-out scenes for judging a frozen encoder: pictures from the demo renderer with the facts they were drawn from.

The pictures are ``aimpre.data.demo.render_scene_facts``'s, so they look exactly like the pretraining scenes, but
none of them is one: the demo seeds its scene streams with the single integers 2 (pretraining) and 4 (validation),
and every held-out stream here is seeded with the pair ``(HELD_OUT, split)``, an entropy no demo stream uses, so the
streams are independent; positions and radii are continuous, so a held-out scene repeating a pretraining one has
probability zero (``tests/test_eval_attributes.py`` checks the first thousands of both).

Each judged "encoder" turns uint8 images into tokens [N, T, C]: the encoder given, the same architecture at random
initialisation (what pretraining started from), and the raw pixels themselves, patchified as the model patchifies
them (the identity encoder: whatever a probe reads from it was in the pixels without any learning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from aimpre.data.demo import BACKGROUNDS, COLOURS, IMAGE_SIZE, ROWS, SHAPES, draw_shape, render_scene_facts
from aimpre.eval.names import ATTRIBUTE_NAMES

if TYPE_CHECKING:
    from aimpre.probe import Layers

HELD_OUT = 19  # the first word of every held-out stream's seed (issue 19); the demo's own seeds are single ints
SPLITS = {"train": 0, "test": 1}  # the second word: probe heads train on one stream and are scored on another
COLUMNS = ("left", "centre", "right")  # thirds of the picture's width, by the object's centre
# What the attribute probe asks about a scene: how many objects, and the facts of its upper object (the only one,
# or the higher of two: they sit in distinct rows), the object the demo's class label already names.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "count": ("one", "two"),
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": ("small", "large"),
    "row": tuple(ROWS),
    "column": COLUMNS,
    "background": tuple(BACKGROUNDS),
}
assert tuple(ATTRIBUTES) == ATTRIBUTE_NAMES


@dataclass
class Scenes:
    """Held-out pictures: ``images`` uint8 [N, 3, S, S] at the encoder's size, and each one's ``facts`` (as
    ``render_scene_facts`` returns them, geometry in pixels of the IMAGE_SIZE rendering)."""

    images: Tensor
    facts: list[dict[str, Any]]
    captions: list[str] = field(default_factory=list)  # the demo's sentence for each (the VLM probe asks about it)


def render_scenes(n: int, img_size: int, split: str) -> Scenes:
    """``n`` held-out scenes of ``split`` ("train" or "test"), rendered as the demo renders them and resized (bicubic,
    as the demo's pictures are resized for a model of another size) to ``img_size``.

    Args:
        n: how many scenes.
        img_size: the encoder's input size in pixels.
        split: which held-out stream.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown scene split {split!r}; splits: {', '.join(SPLITS)}")
    rng = np.random.default_rng([HELD_OUT, SPLITS[split]])
    images, facts, captions = [], [], []
    for _ in range(n):
        img, caption, _, f = render_scene_facts(rng)
        if img_size != IMAGE_SIZE:
            img = img.resize((img_size, img_size), Image.Resampling.BICUBIC)
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))  # [S, S, 3] -> [3, S, S]
        facts.append(f)
        captions.append(caption)
    return Scenes(torch.stack(images), facts, captions)


def upper(facts: dict[str, Any]) -> dict[str, Any]:
    """The scene's upper object (the smallest row height)."""
    return min(facts["objects"], key=lambda o: ROWS[o["row"]])


def attribute_labels(facts: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Per attribute in ATTRIBUTES, the class index of every scene: int64 [N]."""
    values: dict[str, list[str]] = {k: [] for k in ATTRIBUTES}
    for f in facts:
        o = upper(f)
        values["count"].append(ATTRIBUTES["count"][len(f["objects"]) - 1])
        values["shape"].append(o["shape"])
        values["colour"].append(o["colour"])
        values["size"].append("large" if o["large"] else "small")
        values["row"].append(o["row"])
        values["column"].append(COLUMNS[min(2, int(3 * o["cx"] / IMAGE_SIZE))])
        values["background"].append(f["background"])
    return {k: torch.tensor([ATTRIBUTES[k].index(v) for v in vs]) for k, vs in values.items()}


def visible_masks(facts: dict[str, Any]) -> list[np.ndarray]:
    """Each object's visible pixels, bool [IMAGE_SIZE, IMAGE_SIZE]: drawn with the renderer's own ``draw_shape``,
    less what the objects drawn after it cover."""
    masks = []
    for o in facts["objects"]:
        m = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        draw_shape(ImageDraw.Draw(m), o["shape"], o["cx"], o["cy"], o["r"], 255)
        masks.append(np.asarray(m) > 127)
    for i in range(len(masks)):
        for later in masks[i + 1 :]:
            masks[i] = masks[i] & ~later
    return masks


def patch_coverage(mask: np.ndarray, grid: int) -> Tensor:
    """The fraction of each of ``grid`` x ``grid`` patches that ``mask`` covers: float [grid * grid], raster order
    (the encoder's token order)."""
    m = torch.from_numpy(mask).float()[None, None]  # [1, 1, S, S]
    return torch.nn.functional.adaptive_avg_pool2d(m, grid).flatten()


def mask_box(mask: np.ndarray) -> Tensor:
    """The box around ``mask``'s pixels as (x0, y0, x1, y1), each in 0..1 of the picture's side: float [4]."""
    ys, xs = np.nonzero(mask)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32) / mask.shape[0]


# ---- encoders to judge -------------------------------------------------------------------------------------------

Tokens = Callable[[Tensor], Tensor]  # uint8 images [N, 3, S, S] -> tokens [N, T, C]


@dataclass
class Judged:
    """The encoders a scene probe compares: name -> tokens function, and the input size and patch grid they share.

    ``widths`` names the fused rows: their tokens are their sources' concatenated (each resampled to ``grid``), and
    ``widths[name]`` is each source's width, for a probe that projects and sums them (``aimpre.eval.fusion``)."""

    tokens: dict[str, Tokens]
    img_size: int
    grid: int
    widths: dict[str, list[int]] = field(default_factory=dict)


def judged_record(options: dict[str, Any]) -> dict[str, Any]:
    """What a scene probe's results JSON says it judged, from the ``judged_encoders`` options its rows function
    took: the encoders fused with it, how, and the layers read ("output", or the blocks and how they merge)."""
    layers: Layers | None = options.get("layers")
    read: Any = "output"
    if layers is not None and layers.blocks is not None:
        read = {"blocks": list(layers.blocks), "merge": layers.merge}
    return {"fuse": list(options.get("fuse", ())), "fusion": options.get("fusion", "concat"), "layers": read}


def pixel_tokens(images: Tensor, patch: int, mean: Tensor, std: Tensor) -> Tensor:
    """The raw-pixel "encoder": normalised pixels patchified as the model patchifies them, [N, T, patch*patch*3]."""
    from aimpre.model.losses import patchify

    return patchify((images.float() / 255 - mean) / std, patch)


def _encoder_tokens(path: str | Path, grid: int) -> tuple[Tokens, Any]:
    """A loaded encoder's tokens function and config: pictures resized to its input size when they are not, its
    tokens resampled to ``grid`` x ``grid`` (``aimpre.eval.fusion.resample_tokens``)."""
    from aimpre.eval.fusion import resample_tokens
    from aimpre.export import load
    from aimpre.probe import ProbeError, _device, extract

    loaded = load(path)
    pre = loaded.info.get("preprocessing") or {}
    if pre.get("mean") is None or pre.get("std") is None:
        raise ProbeError(f"{path}: its normalisation (mean/std) is unknown; probing needs it")
    mean, std = (torch.tensor(pre[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    encoder, size = loaded.encoder.to(_device()), loaded.encoder.cfg.img_size

    def tokens(images: Tensor) -> Tensor:
        if images.shape[-1] != size:  # another encoder's size: resized as render_scenes resizes
            x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
            images = x.clamp(0, 255).round().to(torch.uint8)
        return resample_tokens(extract(encoder, images, mean, std), grid)

    return tokens, loaded.encoder.cfg


def judged_encoders(
    encoder_path: str | Path,
    seed: int = 0,
    random_init: bool = True,
    pixels: bool = True,
    fuse: tuple[str, ...] = (),
    fusion: str = "concat",
    layers: Layers | None = None,
) -> Judged:
    """The encoder at ``encoder_path`` and the baselines it is judged against, as tokens functions.

    Args:
        encoder_path: anything ``aimpre.export.load`` reads.
        seed: seeds the random-init twin (as ``aimpre probe --compare-random`` does).
        random_init: add "random_init", the same architecture re-initialised.
        pixels: add "pixels", the raw patchified pixels.
        fuse: more encoders (paths, or "pixels") to judge alone, each a row named by its path, and fused with the
            encoder in one more row (``aimpre.eval.fusion.fused_name``); each sees the pictures at its own input
            size and its tokens are resampled to the encoder's grid.
        fusion: how the fused row's probes combine the sources: "concat" or "sum" (projected and summed).
        layers: the blocks both encoders are read at (``aimpre.probe.Layers``; None: the output), so a layer
            sweep compares the trained and the random-init encoder at the same depth.
    """
    from aimpre.eval.fusion import FUSIONS, align, fused_name
    from aimpre.export import load
    from aimpre.model import AIMv2Encoder
    from aimpre.model.vit import block_indices
    from aimpre.probe import Layers, ProbeError, _device, extract

    if fusion not in FUSIONS:
        raise ProbeError(f"unknown fusion {fusion!r}; fusions: {', '.join(FUSIONS)}")
    loaded = load(encoder_path)
    pre = loaded.info.get("preprocessing") or {}
    if pre.get("mean") is None or pre.get("std") is None:
        raise ProbeError(f"{encoder_path}: its normalisation (mean/std) is unknown; probing needs it")
    mean, std = (torch.tensor(pre[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    cfg = loaded.encoder.cfg
    layers = layers or Layers()
    if layers.blocks is not None:
        try:
            block_indices(list(layers.blocks), cfg.depth)
        except ValueError as e:
            raise ProbeError(f"--layers: {e}") from None
    encoders = {"encoder": loaded.encoder.to(_device())}
    if random_init:
        twin = AIMv2Encoder(cfg).eval()
        torch.manual_seed(seed)
        twin.init_weights()
        encoders["random_init"] = twin.to(_device())

    def encoded(e: AIMv2Encoder) -> Tokens:
        return lambda images: extract(e, images, mean, std, layers=layers).float()

    tokens = {name: encoded(e) for name, e in encoders.items()}

    def raw(images: Tensor) -> Tensor:
        return pixel_tokens(images, cfg.patch_size, mean, std)

    if pixels:
        tokens["pixels"] = raw
    if len(set(fuse)) != len(fuse) or "encoder" in fuse:
        raise ProbeError(f"--fuse names an encoder twice: {' '.join(map(str, fuse))}")
    # the fused row's sources, each computed once per picture set (the rows alone reuse them)
    parts: dict[str, tuple[Tokens, int]] = {"encoder": (tokens["encoder"], cfg.width)}
    for path in fuse:
        if path == "pixels":
            parts["pixels"] = (raw, cfg.patch_size**2 * 3)
        else:  # on the encoder's grid, alone too: the localization targets are drawn on it
            fn, other = _encoder_tokens(path, cfg.img_size // cfg.patch_size)
            parts[str(path)] = (fn, other.width)
    memo: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}

    def once(name: str, fn: Tokens) -> Tokens:
        def tokens_of(images: Tensor) -> Tensor:
            key = (name, id(images))
            if key not in memo:
                memo[key] = (images, fn(images))  # the images kept too: their id stays theirs
            return memo[key][1]

        return tokens_of

    for name, (fn, _) in parts.items():
        tokens[name] = once(name, fn)
    judged = Judged(tokens, cfg.img_size, cfg.img_size // cfg.patch_size)
    if fuse:
        names = list(parts)

        def fused(images: Tensor) -> Tensor:
            return torch.cat(align([tokens[n](images) for n in names], judged.grid), dim=-1)

        name = fused_name(names, fusion)
        tokens[name] = fused
        judged.widths[name] = [w for _, w in parts.values()]
    return judged
