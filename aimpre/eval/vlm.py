"""The VLM probe: how well a small language model answers questions about an image through a frozen encoder.

The question the seeds ask is which pretraining gives the better vision encoder *for a vision-language model*, so
this probe builds a miniature one (LLaVA's recipe, Liu et al. 2023, at toy size): the frozen encoder's patch tokens
(its output, chosen blocks, or several encoders fused, ``aimpre.eval.fusion``) go through a connector into a small
causal language model trained from scratch on question -> answer text about the image. Connectors: ``linear``
(LLaVA), ``mlp`` (two layers, GELU: LLaVA-1.5; DeepSpeed-VisualChat found such simple ones as good as complex
ones) and ``xattn`` (Qwen-VL's adapter: one cross-attention layer whose learned queries read all the tokens).

Questions come from the demo generator's own scene facts (``aimpre.data.demo.render_scene``; its caption is the
full description of the scene and is parsed back into facts) and from the held-out handwritten digits: colour,
shape, size, position (row), count, which shape is in a row, background, the digit, and "describe the image"
(the demo caption). Held out: scenes (rendered from a seed stream of their own, never the demo's pretraining or
val streams; the digits' test split is the probe's, as ``aimpre probe``'s) and question templates (each type has
two training templates and a third, made of the same words in another order, asked only at test).

Reported: exact-match accuracy per question type on held-out scenes (training templates, and the held-out
template), on training items (lost information vs overfitting), and caption perplexity per word given the image.
Every encoder gets the same budget (steps, batch, model), and a text-only row (the same language model, no image)
says what the questions give away. The vocabulary is words (a closed world), which keeps sequences ~10 tokens long
so the probe runs in minutes on a 2-core CPU at tiny size.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from aimpre.data import demo
from aimpre.data.demo import BACKGROUNDS, COLOURS, DIGIT_TEMPLATES, DIGIT_WORDS, ROWS, SHAPES
from aimpre.eval import finish_record
from aimpre.eval.fusion import FUSIONS, Fuse, align, token_grid
from aimpre.model.layers import Block, RMSNorm

CONNECTORS = ("linear", "mlp", "xattn")
# per type: two training templates, then the held-out one (the same words, in another order)
TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("what colour is the {shape} ?", "which colour does the {shape} have ?", "the {shape} is what colour ?"),
    "shape": ("what shape is the {colour} object ?", "which shape is {colour} ?",
              "the {colour} object is which shape ?"),
    "size": ("is the {shape} large or small ?", "how big is the {shape} ?", "is the {shape} small or large ?"),
    "position": ("where is the {shape} ?", "in which row is the {shape} ?", "the {shape} is in which row ?"),
    "where": ("what shape is in the {row} row ?", "which shape is in the {row} row ?",
              "which shape is there in the {row} row ?"),
    "count": ("how many shapes are there ?", "how many shapes do you see ?", "how many shapes are in the image ?"),
    "background": ("what colour is the background ?", "which colour is the background ?",
                   "the background is what colour ?"),
    "digit": ("which digit is this ?", "what digit is written here ?", "what digit is this ?"),
    "text": ("what number is written ?", "which number is written here ?", "what number is written here ?"),
}  # fmt: skip
CAPTION_PROMPT = "describe the image ."
SPECIALS = ("<pad>", "<bos>", "<answer>", "<eos>")
PAD, BOS, ANSWER, EOS = range(4)
SCENE_SEED = 1019  # the probe's scenes: np.random.default_rng([SCENE_SEED, split]); the demo's are seeds 2 and 4


def words(text: str) -> list[str]:
    """Word tokens: punctuation split off ("on gray, small" -> on, gray, ",", small)."""
    return text.replace(",", " , ").replace("?", " ? ").replace(".", " . ").split()


def vocabulary() -> list[str]:
    """Every word a question, answer or caption can hold, specials first (ids 0..3); fixed by the demo's words."""
    vocab: set[str] = set()
    for templates in TEMPLATES.values():
        for t in templates:
            vocab.update(words(t.format(shape="x", colour="x", row="x")))
    vocab.update(words(CAPTION_PROMPT))
    for t in DIGIT_TEMPLATES:
        vocab.update(words(t.format(w="x", d="x")))
    vocab.update([*COLOURS, *BACKGROUNDS, *SHAPES, *ROWS, *DIGIT_WORDS, *map(str, range(10))])
    vocab.update(["large", "small", "at", "in", "the", "and", "on", ",", "one", "two"])
    vocab.discard("x")
    return [*SPECIALS, *sorted(vocab)]


def scene_facts(caption: str) -> dict[str, Any]:
    """The facts a demo scene's caption states: background and objects (size, colour, shape, row).

    "large red circle at the top and small blue square in the middle, on gray" ->
    {"background": "gray", "objects": [{"size": "large", "colour": "red", "shape": "circle", "row": "top"}, ...]}
    """
    body, _, bg = caption.rpartition(", on ")
    objects = []
    for part in body.split(" and "):
        w = part.split()
        objects.append({"size": w[0], "colour": w[1], "shape": w[2], "row": w[-1]})
    return {"background": bg, "objects": objects}


@dataclass
class Item:
    """One question about one image: word lists, its type, and whether its template was held out."""

    image: int
    kind: str
    question: list[str]
    answer: list[str]
    new_template: bool = False


def scene_questions(facts: dict[str, Any]) -> list[tuple[str, dict[str, str], str]]:
    """(type, template fields, answer) for every question a scene's facts answer unambiguously."""
    objs = facts["objects"]
    out: list[tuple[str, dict[str, str], str]] = []
    for o in objs:
        if sum(p["shape"] == o["shape"] for p in objs) == 1:  # "the circle" names one object
            out += [("colour", {"shape": o["shape"]}, o["colour"]), ("size", {"shape": o["shape"]}, o["size"]),
                    ("position", {"shape": o["shape"]}, o["row"])]  # fmt: skip
        if sum(p["colour"] == o["colour"] for p in objs) == 1:
            out.append(("shape", {"colour": o["colour"]}, o["shape"]))
        out.append(("where", {"row": o["row"]}, o["shape"]))
    out.append(("count", {}, DIGIT_WORDS[len(objs)]))
    out.append(("background", {}, facts["background"]))
    return out


TEXT_SCALE = 3  # the bitmap font's glyphs (~6 x 11 px) upscaled 3x (nearest): ~18 px wide, legible to 14 px patches


def text_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled bitmap font (nothing downloaded): ``load_default_imagefont`` (Pillow >= 10.1, where
    ``load_default`` became a scalable one), else ``load_default``."""
    bitmap = getattr(ImageFont, "load_default_imagefont", None)
    return bitmap() if bitmap is not None else ImageFont.load_default()


def render_text_scene(rng: np.random.Generator, size: int = demo.IMAGE_SIZE) -> tuple[Image.Image, str, tuple]:
    """A demo scene with a 2- or 3-digit number written on a white label over it ("read the text" items): the
    picture, the number and the label's box (x0, y0, x1, y1) in pixels of the IMAGE_SIZE rendering.

    Args:
        rng: draws the scene, the number and where the label goes.
        size: the picture's side; drawn at IMAGE_SIZE and resized (bicubic), as the held-out scenes are.
    """
    img, _, _ = demo.render_scene(rng)
    number = str(int(rng.integers(10, 1000)))  # 10..999: two or three digits
    font = text_font()
    _, _, x1, y1 = font.getbbox(number)
    glyphs = Image.new("L", (int(x1) + 2, int(y1) + 2), 255)  # a 1 px margin of paper around the ink
    ImageDraw.Draw(glyphs).text((1, 1), number, font=font, fill=0)
    glyphs = glyphs.resize((glyphs.width * TEXT_SCALE, glyphs.height * TEXT_SCALE), Image.Resampling.NEAREST)
    x = int(rng.integers(0, demo.IMAGE_SIZE - glyphs.width + 1))
    y = int(rng.integers(0, demo.IMAGE_SIZE - glyphs.height + 1))
    img.paste(glyphs.convert("RGB"), (x, y))
    if size != demo.IMAGE_SIZE:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img, number, (x, y, x + glyphs.width, y + glyphs.height)


@dataclass
class ProbeData:
    """Images (uint8 [N, 3, S, S]) and the questions about them, for one split."""

    images: Tensor
    items: list[Item]
    captions: list[Item]


def make_split(
    split: str,
    n_scenes: int,
    n_digits: int | None,
    size: int,
    seed: int = 0,
    n_text: int = 0,
    scenes: list[tuple[Image.Image, str]] | None = None,
) -> ProbeData:
    """Renders a split's scenes and digits and writes its questions.

    Args:
        split: "train" (training templates only) or "test" (each question twice: a training template and the
            held-out one).
        n_scenes: scenes to render (seed stream [SCENE_SEED, 0 or 1], disjoint from the demo's).
        n_digits: digits from the split's part of ``digit_split`` (None: all of it).
        size: side in pixels of the rendered images.
        seed: template choice.
        n_text: scenes with a number written on them (``render_text_scene``; seed stream [SCENE_SEED, 4 or 5]),
            each asked what the number is; the answer is its digits, one word each ("4 7").
        scenes: pictures (at ``size``) and their demo captions to ask about instead of rendering ``n_scenes``
            (``aimpre compare`` shares its held-out scenes between this and the other scene probes).
    """
    from sklearn.datasets import load_digits

    test = split == "test"
    scene_rng = np.random.default_rng([SCENE_SEED, int(test)])
    pick = np.random.default_rng([SCENE_SEED, 2 + int(test), seed])
    images: list[Image.Image] = []
    items: list[Item] = []
    captions: list[Item] = []

    def ask(i: int, kind: str, fields: dict[str, str], answer: str) -> None:
        t = TEMPLATES[kind]
        items.append(Item(i, kind, words(t[int(pick.integers(0, 2))].format(**fields)), [answer]))
        if test:
            items.append(Item(i, kind, words(t[2].format(**fields)), [answer], new_template=True))

    for n in range(n_scenes):
        img, caption = scenes[n] if scenes is not None else demo.render_scene(scene_rng, size)[:2]
        i = len(images)
        images.append(img)
        for kind, fields, answer in scene_questions(scene_facts(caption)):
            ask(i, kind, fields, answer)
        captions.append(Item(i, "caption", words(CAPTION_PROMPT), words(caption)))
    digits = load_digits()
    idx = demo.digit_split(digits.target)[int(test)]
    for j in idx[:n_digits]:
        d = int(digits.target[j])
        i = len(images)
        images.append(demo.render_digit(digits.data[j], size))
        ask(i, "digit", {}, DIGIT_WORDS[d])
        caption = str(DIGIT_TEMPLATES[int(pick.integers(0, len(DIGIT_TEMPLATES)))]).format(w=DIGIT_WORDS[d], d=d)
        captions.append(Item(i, "caption", words(CAPTION_PROMPT), words(caption)))
    text_rng = np.random.default_rng([SCENE_SEED, 4 + int(test)])
    for _ in range(n_text):
        img, number, _box = render_text_scene(text_rng, size)
        i = len(images)
        images.append(img)
        t = TEMPLATES["text"]
        items.append(Item(i, "text", words(t[int(pick.integers(0, 2))]), list(number)))
        if test:
            items.append(Item(i, "text", words(t[2]), list(number), new_template=True))
    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    return ProbeData(pixels.contiguous(), items, captions)


# ---- sources: what turns images into tokens ----


@dataclass
class Source:
    """A frozen token source: an encoder (``load``-able path, or its random-init twin) or the raw pixels.

    Args:
        name: the row's name.
        path: anything ``aimpre.export.load`` reads, or "pixels" (patches of raw pixels: an oracle "encoder" that
            loses nothing, 16 px patches).
        img_size: the input side in pixels; None: the size the encoder was trained at (pixels: 128). A larger one
            runs the encoder at a grid it was not trained at, its position table resampled
            (``aimpre.model.posemb.at_resolution``).
        blocks: encoder blocks to read (``aimpre.probe.Layers``); None: the output.
        merge: how ``blocks`` combine, "mean" or "concat".
        random_init: the encoder's architecture re-initialised (seeded), instead of its weights.
    """

    name: str
    path: str
    img_size: int | None = None
    blocks: tuple[int, ...] | None = None
    merge: str = "concat"
    random_init: bool = False
    seed: int = 0

    @torch.no_grad()
    def tokens(self, images: Tensor) -> Tensor:
        """Tokens [N, T, C] (float16) of uint8 images [N, 3, S, S]."""
        if self.path == "pixels":
            from aimpre.model.losses import patchify

            size = self.img_size or 128
            x = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True) / 255 - 0.5
            return patchify(x, 16).half()
        from aimpre.export import load
        from aimpre.model import AIMv2Encoder
        from aimpre.model.posemb import at_resolution
        from aimpre.model.vit import block_indices
        from aimpre.probe import Layers, _device, extract

        loaded = load(self.path)
        pre = loaded.info.get("preprocessing") or {}
        if pre.get("mean") is None or pre.get("std") is None:
            raise ValueError(f"{self.path}: its normalisation (mean/std) is unknown; the VLM probe needs it")
        encoder = loaded.encoder
        if self.random_init:
            encoder = AIMv2Encoder(encoder.cfg).eval()
            torch.manual_seed(self.seed)
            encoder.init_weights()
        if self.blocks is not None:
            try:
                block_indices(list(self.blocks), encoder.cfg.depth)
            except ValueError as e:
                raise ValueError(f"--layers: {e}") from None
        encoder = at_resolution(encoder, self.img_size or encoder.cfg.img_size).to(_device()).eval()
        size = encoder.cfg.img_size
        x = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True).clamp(0, 255)
        mean, std = (torch.tensor(pre[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        return extract(encoder, x.round().to(torch.uint8), mean, std, layers=Layers(self.blocks, self.merge))


# ---- the model: fusion -> connector -> language model ----


class Connector(nn.Module):
    """Image tokens [B, T, C] -> language-model inputs [B, K, dim] (K = T, or the adapter's queries).

    Args:
        kind: "linear", "mlp" or "xattn".
        in_dim: the fused token width C.
        dim: the language model's width.
        tokens: T, the number of image tokens (the adapter's key position table).
        queries: the adapter's learned queries (Qwen-VL: 256 for 1024 tokens; here a few).
    """

    def __init__(self, kind: str, in_dim: int, dim: int, tokens: int, queries: int = 16) -> None:
        super().__init__()
        if kind not in CONNECTORS:
            raise ValueError(f"unknown connector {kind!r}; connectors: {', '.join(CONNECTORS)}")
        self.kind = kind
        self.norm = nn.LayerNorm(in_dim)  # encoders' token scales differ by orders of magnitude
        if kind == "linear":
            self.proj: nn.Module = nn.Linear(in_dim, dim)
        elif kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        else:
            self.proj = nn.Linear(in_dim, dim)
            self.key_pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)  # Qwen-VL adds positions to keys
            self.queries = nn.Parameter(torch.randn(1, queries, dim) * 0.02)
            self.attn = nn.MultiheadAttention(dim, max(1, dim // 32), batch_first=True)
            self.out_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(self.norm(x))  # [B, T, C] -> [B, T, dim]
        if self.kind != "xattn":
            return x
        q = self.queries.expand(x.shape[0], -1, -1)
        out, _ = self.attn(q, x + self.key_pos, x, need_weights=False)  # [B, K, dim]
        return self.out_norm(out)


class TinyLM(nn.Module):
    """A causal word-level language model that reads image tokens as a prefix (bidirectional among themselves).

    Positions are learned over the whole sequence, image slots included (an LLM's positions cover its image
    tokens too), so even tokens without a position of their own (raw pixel patches) say where they come from.
    """

    def __init__(self, vocab: int, dim: int, depth: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, 4 * dim, 1e-5, "auto", "torch") for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, image: Tensor | None, text: Tensor) -> Tensor:
        """Logits [B, L, vocab] at the text positions, from image inputs [B, K, dim] (or None) and ids [B, L]."""
        x = self.embed(text)  # [B, L, dim]
        k = 0 if image is None else image.shape[1]
        if image is not None:
            x = torch.cat([image, x], dim=1)  # [B, K + L, dim]
        x = x + self.pos[:, : x.shape[1]]
        prefix = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device) if k else None
        for block in self.blocks:
            x = block(x, "prefix" if k else "causal", prefix)
        return self.head(self.norm(x[:, k:]))


class VLM(nn.Module):
    """Fusion -> connector -> language model; ``sources`` None is the text-only baseline."""

    def __init__(self, widths: list[int] | None, tokens: int, s: VLMSettings, vocab: int) -> None:
        super().__init__()
        self.fuse = None if widths is None else Fuse(widths, s.fuse)
        self.connector = None
        if self.fuse is not None:
            self.connector = Connector(s.connector, self.fuse.out_dim, s.dim, tokens, s.queries)
        k = 0 if widths is None else (s.queries if s.connector == "xattn" else tokens)
        self.lm = TinyLM(vocab, s.dim, s.depth, s.heads, k + s.max_text)

    def forward(self, feats: list[Tensor] | None, text: Tensor) -> Tensor:
        image = None
        if self.fuse is not None and self.connector is not None and feats is not None:
            image = self.connector(self.fuse(feats))
        return self.lm(image, text)


@dataclass
class VLMSettings:
    """The probe's budget, the same for every encoder. The defaults run in a few minutes per encoder on 2 CPU
    cores at tiny size."""

    connector: str = "mlp"
    fuse: str = "concat"
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    dim: int = 128
    depth: int = 2
    heads: int = 4
    queries: int = 16
    max_grid: int = 8  # linear/mlp connectors: token grids average-pooled to at most this side (LM cost)
    max_text: int = 40
    train_scenes: int = 2000
    test_scenes: int = 300
    train_digits: int | None = None  # None: all 1258 of the digits' train split
    test_digits: int | None = 300
    train_text: int = 600  # "read the text" scenes (render_text_scene)
    test_text: int = 150
    seed: int = 0

    def __post_init__(self) -> None:
        if self.connector not in CONNECTORS:
            raise ValueError(f"unknown connector {self.connector!r}; connectors: {', '.join(CONNECTORS)}")
        if self.fuse not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fuse!r}; fusions: {', '.join(FUSIONS)}")
        if self.dim % self.heads:
            raise ValueError(f"language model width {self.dim} is not divisible by {self.heads} heads")


def _sequences(items: list[Item], index: dict[str, int], max_text: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs [N, L], targets [N, L] (PAD where not scored: only the answer and its end are) and image ids [N]."""
    rows = []
    for it in items:
        ids = [BOS, *(index[w] for w in it.question), ANSWER, *(index[w] for w in it.answer), EOS]
        if len(ids) - 1 > max_text:
            raise ValueError(f"a {it.kind} item of {len(ids) - 1} tokens is longer than max_text {max_text}")
        rows.append(ids)
    L = max(len(r) for r in rows) - 1
    inp = torch.full((len(rows), L), PAD)
    tgt = torch.full((len(rows), L), PAD)
    for n, (r, it) in enumerate(zip(rows, items, strict=True)):
        inp[n, : len(r) - 1] = torch.tensor(r[:-1])
        start = len(r) - len(it.answer) - 2  # the position of <answer>: it predicts the first answer word
        tgt[n, start : len(r) - 1] = torch.tensor(r[start + 1 :])
    return inp, tgt, torch.tensor([it.image for it in items])


def _lr(step: int, total: int) -> float:
    warmup = max(1, total // 20)
    return (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def train_vlm(
    feats: tuple[list[Tensor], list[Tensor]] | None, train: ProbeData, test: ProbeData, s: VLMSettings
) -> dict[str, Any]:
    """Trains one probe (fusion + connector + language model) on cached tokens and scores it.

    Args:
        feats: (train tokens, test tokens), one [N, T, C_i] per source on one grid; None: text only.
        train: the training split's images and questions (items and captions both train).
        test: the held-out split.
        s: the budget.

    Returns:
        ``accuracy`` per question type (held-out scenes, training templates), ``new_templates`` (held-out
        template), ``train_accuracy``, ``caption_ppl`` (per word, test captions), ``params`` and ``seconds``.
    """
    start = time.time()
    vocab = vocabulary()
    index = {w: i for i, w in enumerate(vocab)}
    torch.manual_seed(s.seed)
    widths = None if feats is None else [f.shape[-1] for f in feats[0]]
    tokens = 0 if feats is None else feats[0][0].shape[1]
    model = VLM(widths, tokens, s, len(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr(i, s.steps))
    inp, tgt, img = _sequences(train.items + train.captions, index, s.max_text)
    g = torch.Generator().manual_seed(s.seed)
    model.train()
    for _ in range(s.steps):
        b = torch.randint(0, len(inp), (s.batch_size,), generator=g)
        f = None if feats is None else [t[img[b]].float() for t in feats[0]]
        logits = model(f, inp[b])
        loss = F.cross_entropy(logits.flatten(0, 1), tgt[b].flatten(), ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    test_feats = None if feats is None else feats[1]
    rng = np.random.default_rng(s.seed)
    train_sample = [train.items[i] for i in rng.permutation(len(train.items))[:1000]]
    old = [it for it in test.items if not it.new_template]
    new = [it for it in test.items if it.new_template]
    return {
        "accuracy": _accuracy(model, test_feats, old, index),
        "new_templates": _accuracy(model, test_feats, new, index),
        "train_accuracy": _accuracy(model, None if feats is None else feats[0], train_sample, index),
        "caption_ppl": _perplexity(model, test_feats, test.captions, index, s.max_text),
        "final_loss": round(loss.item(), 4),
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.time() - start, 1),
    }


@torch.no_grad()
def _accuracy(model: VLM, feats: list[Tensor] | None, items: list[Item], index: dict[str, int]) -> dict[str, float]:
    """Exact match of greedy answers (words up to <eos>, at most the answer's length + 1) per type and "all"."""
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(items), 256):
        batch = items[i : i + 256]
        prompts = [[BOS, *(index[w] for w in it.question), ANSWER] for it in batch]
        out: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        f = None if feats is None else [t[[it.image for it in batch]].float() for t in feats]
        for _ in range(max(len(it.answer) for it in batch) + 1):
            seqs = [p + o for p, o in zip(prompts, out, strict=True)]
            ids = torch.full((len(seqs), max(map(len, seqs))), PAD)
            for n, q in enumerate(seqs):
                ids[n, : len(q)] = torch.tensor(q)
            logits = model(f, ids)  # right padding: causal positions never see it
            nxt = logits[torch.arange(len(seqs)), torch.tensor([len(q) - 1 for q in seqs])].argmax(-1).tolist()
            for n, t in enumerate(nxt):
                if not done[n]:
                    out[n].append(t)
                    done[n] = t == EOS
        for it, o in zip(batch, out, strict=True):
            want = [index[w] for w in it.answer] + [EOS]
            hits.setdefault(it.kind, []).append(o[: len(want)] == want)
    acc = {k: float(np.mean(v)) for k, v in sorted(hits.items())}
    acc["all"] = float(np.mean([h for v in hits.values() for h in v])) if hits else float("nan")
    return acc


@torch.no_grad()
def _perplexity(
    model: VLM, feats: list[Tensor] | None, items: list[Item], index: dict[str, int], max_text: int
) -> float:
    """exp(mean negative log-likelihood per caption word and its end), teacher-forced."""
    inp, tgt, img = _sequences(items, index, max_text)
    nll, n = 0.0, 0
    for i in range(0, len(inp), 256):
        f = None if feats is None else [t[img[i : i + 256]].float() for t in feats]
        logits = model(f, inp[i : i + 256])
        nll += float(
            F.cross_entropy(logits.flatten(0, 1), tgt[i : i + 256].flatten(), ignore_index=PAD, reduction="sum")
        )
        n += int((tgt[i : i + 256] != PAD).sum())
    return math.exp(nll / n)


@dataclass
class VLMRun:
    """What ``run_vlm_probe`` compares: the sources, each alone and (two or more) fused."""

    sources: list[Source]
    settings: VLMSettings = field(default_factory=VLMSettings)
    text_only: bool = True


def run_vlm_probe(run: VLMRun, out: Path | None = None) -> dict[str, Any]:
    """The VLM probe of every source alone, of their fusion when there are several, and of no image at all.

    Args:
        run: the sources and the budget.
        out: where to write the results JSON (atomically), if anywhere.

    Returns:
        A JSON-able dict: ``results`` maps a row name to ``train_vlm``'s dict, plus the data sizes and settings.
    """

    s, start = run.settings, time.time()
    if not run.sources and not run.text_only:
        raise ValueError("nothing to probe: no encoder and no text-only row")
    sizes = [src.img_size or 0 for src in run.sources]
    render = max([128, *sizes])  # rendered once, at least at the largest input size asked
    train = make_split("train", s.train_scenes, s.train_digits, render, s.seed, s.train_text)
    test = make_split("test", s.test_scenes, s.test_digits, render, s.seed, s.test_text)
    cached = {src.name: (src.tokens(train.images), src.tokens(test.images)) for src in run.sources}
    grids = {name: token_grid(tr) for name, (tr, _) in cached.items()}
    results: dict[str, Any] = {}
    if run.text_only:
        results["text_only"] = train_vlm(None, train, test, s)
    combos = [[src.name] for src in run.sources]
    fused = [src.name for src in run.sources if not src.random_init]  # random twins are baselines, not partners
    if len(fused) > 1:
        combos.append(fused)
    for names in combos:
        grid = grids[names[0]] if s.connector == "xattn" else min(grids[names[0]], s.max_grid)
        feats = (align([cached[n][0] for n in names], grid), align([cached[n][1] for n in names], grid))
        row = " + ".join(names) if len(names) == 1 or s.fuse == "concat" else " (+) ".join(names)
        results[row] = train_vlm(feats, train, test, s)
        results[row]["tokens"] = grid * grid
    res = {
        "sources": [asdict(src) for src in run.sources],
        "grids": grids,
        "settings": asdict(s),
        "n_train_items": len(train.items),
        "n_test_items": len(test.items),
        "held_out": f"scenes: seed stream [{SCENE_SEED}, 1] (the demo's are 2 and 4); text scenes: [{SCENE_SEED}, 5]; "
        f"digits: digit_split's test part; templates: the third of each type",
        "results": results,
    }
    return finish_record(res, start, out)


def vlm_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per probed source (and the text-only baseline) for ``aimpre compare``'s tables: ``vlm_TYPE``
    accuracies on held-out scenes, ``vlm_all``, ``vlm_new_templates``, ``vlm_train_all`` and ``vlm_caption_ppl``.

    Args:
        res: ``run_vlm_probe``'s result.
    """
    rows = []
    for name, r in res["results"].items():
        row: dict[str, Any] = {"source": name}
        row.update({f"vlm_{k}": v for k, v in r["accuracy"].items()})
        row["vlm_new_templates"] = r["new_templates"]["all"]
        row["vlm_train_all"] = r["train_accuracy"]["all"]
        row["vlm_caption_ppl"] = r["caption_ppl"]
        rows.append(row)
    return rows
