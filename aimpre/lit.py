"""LiT zero-shot: a text tower trained contrastively against a frozen image encoder, then zero-shot classification.

LiT (Zhai et al. 2022, "Locked-image text Tuning"): the pretrained image tower is locked and a text tower learns to
read out its representation from image-text pairs; class names in prompt templates then make a zero-shot
classifier. The AIMv2 paper reports its zero-shot numbers this way. SigLIP's sigmoid loss is the default here (Zhai
et al. 2023 found it ahead of the softmax loss at small batches, our regime); CLIP's is ``loss="clip"``. Which of
the two the AIMv2 paper's LiT used was not checked against its text.

Choices and departures:
- The image side keeps a trainable ``ImageHead`` (attention pooling, or mean pooling, + a bias-free projection) on
  the frozen tokens. LiT locks the whole image tower, head included, but its towers came with a pooled embedding;
  ours give a token sequence and no embedding (AIMv2 pretrains no pooling head), so something must pool and
  project to the shared width. A frozen random head would throw information away, so the head trains (our
  choice; it costs little). ``ImageHead`` is the one the siglip/clip objectives use, so a LiT folder and a
  contrastive run hold the same tensors and are read the same way.
- The frozen tokens are standardised per position and channel with the training set's statistics (``TokenNorm``,
  stored in the LiT folder) before the head: without it both losses collapsed on the demo digits under a random
  tiny encoder (zero-shot at chance); with it CLIP's loss reached 69% top-1 there.
- The encoder runs once per image and its tokens are cached on disk (as ``aimpre.probe`` does), keyed by its
  weights, its preprocessing and the shard bytes: centre square crop, no augmentation (LiT trains with random
  crops; with a frozen encoder on a CPU the encoder would otherwise cost nearly all the time).
- The encoder's weights are not copied into the LiT folder: ``lit.json`` names it and records a hash of its
  weights (and preprocessing), checked when the folder is read.

Zero-shot (CLIP's prompt ensemble): each class name goes through every template, each prompt is embedded and
L2-normalised, the class embedding is their re-normalised mean; an image's class is its most similar class
embedding. Labels come from ``KEY.cls`` (or ``label``/``cls`` in ``KEY.json``), as the probe reads them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aimpre import __version__
from aimpre.config import model_size_problem
from aimpre.data import Augment, build_tokenizer, encode_captions, spec_urls
from aimpre.data.decode import decode_sample
from aimpre.data.demo import cache_root
from aimpre.data.reader import ReadErrors, shard_samples
from aimpre.data.tokenizer import Tokenizer
from aimpre.export import _load_tensors, _read_header, _read_json, load
from aimpre.files import UntrustedInputError, atomic_path, file_present, read_text, save_safetensors, write_text
from aimpre.model import AIMv2Encoder, ModelConfig
from aimpre.model.sizes import SIZES
from aimpre.objectives.contrastive import ClipLoss, SigLipLoss, clamp_temperatures
from aimpre.objectives.towers import ImageHead, TextTower
from aimpre.probe import ProbeError, _device, _digest, _lr_at, _weights_hash, features, read_cache, shard_urls
from aimpre.progress import progress

LOSSES = ("siglip", "clip")
LIT_JSON = "lit.json"
WEIGHTS = "model.safetensors"
# ModelConfig fields that size the towers (the encoder's own fields come from the encoder)
TOWER_KEYS = ("pool", "embed_dim", "text_width", "text_depth", "text_heads", "text_mlp_hidden", "text_len")
# a small CLIP-style ensemble; the last two match how the demo's digits are captioned
TEMPLATES = ("a photo of a {}.", "a handwritten {}.", "the number {}.", "a handwritten digit {}.")
CAPTION_SKIPS = ("no_caption", "empty_caption", "bad_caption")


class LitError(ValueError):
    """LiT's or zero-shot's input is unusable; the message names the file, shard, key or option."""


@dataclass
class LitSettings:
    """Training of the towers on cached tokens: AdamW, linear warmup then cosine decay.

    ``steps`` (when given) replaces ``epochs``. Weight decay applies to matrices only (not norms, the pooling
    query or the loss's temperature and bias).

    Measured on the demo digits with a random tiny encoder: SigLIP with attention pooling stays near its
    collapsed loss for the first ~200 steps at batch 64 (zero-shot at chance), then learns: 600 steps on
    ``demo:digits-train`` gave 76% top-1 on ``demo:digits-test``. On the whole pretrain split (digits are 17% of
    it, batch 128) 5 epochs (280 steps) stayed at chance (9.8%), 20 epochs (1120 steps, the default) gave 65.9%
    top-1 and 96.1% top-5.
    """

    loss: str = "siglip"
    epochs: int = 20
    steps: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    seed: int = 0


def tower_config(encoder: ModelConfig, vocab_size: int, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """The encoder's config with the tower fields of its named size (ModelConfig's defaults for sizes that set
    none: a CLIP-B-like 12x768 text tower), ``overrides`` on top, and the tokenizer's vocabulary."""
    given = overrides or {}
    unknown = sorted(set(given) - set(TOWER_KEYS))
    if unknown:
        raise LitError(f"unknown tower setting(s) {unknown}; known: {', '.join(TOWER_KEYS)}")
    size = SIZES.get(encoder.size, {})
    towers = {k: size.get(k, getattr(ModelConfig(), k)) for k in TOWER_KEYS}
    cfg = replace(encoder, **{**towers, **given}, vocab_size=vocab_size)
    for k in TOWER_KEYS[1:]:
        if not isinstance(getattr(cfg, k), int) or getattr(cfg, k) <= 0:
            raise LitError(f"tower setting {k!r} must be a positive integer, got {getattr(cfg, k)!r}")
    if cfg.text_width % cfg.text_heads:
        raise LitError(f"text_width {cfg.text_width} is not divisible by text_heads {cfg.text_heads}")
    problem = model_size_problem(replace(cfg, objective="siglip"))  # counts the text tower, whatever the encoder was
    if problem is not None:
        raise LitError(f"tower setting {problem[0]!r}: {problem[1]}")
    return cfg


def _run_config_file(path: Path) -> Path | None:
    """The config.yaml of the run that ``path`` (a run directory or one of its checkpoints) belongs to."""
    cand = path.parent.parent / "config.yaml" if path.suffix == ".ckpt" else path / "config.yaml"
    return cand if file_present(cand, "run config") else None


def encoder_tokenizer(encoder_path: str | Path) -> tuple[str, bool]:
    """(tokenizer spec, lowercase) of the run the encoder comes from; ("bytes", True) when that is unknown."""
    from aimpre.config import load_config

    cfg_file = _run_config_file(Path(encoder_path))
    if cfg_file is None:
        return "bytes", True
    data = load_config(cfg_file).data
    return data.tokenizer, data.lowercase


def captioned_features(
    encoder: AIMv2Encoder, pre: dict[str, Any], urls: list[str], cache: Path | None, weights: Any
) -> tuple[Tensor, list[str], Counter[str]]:
    """Tokens [N, T, C] (float16) and captions of the captioned images in ``urls``, from the cache if there.

    Images are decoded and encoded a batch at a time (centre crop, no augmentation), so only tokens are held.
    Samples without a caption or a readable image are skipped and counted; shards with no captioned sample at
    all are an error naming the first key without a caption.
    """
    file = None if cache is None else cache / f"{_digest(weights, urls)}.pt"
    saved = None if file is None else read_cache(file, {"tokens": Tensor, "captions": list, "skipped": dict})
    if saved is not None:
        return saved["tokens"], saved["captions"], Counter(saved["skipped"])
    dev = next(encoder.parameters()).device
    mean, std = (torch.tensor(pre[k], device=dev).view(1, 3, 1, 1) for k in ("mean", "std"))
    aug, rng, errors = Augment(pre["img_size"], train=False), np.random.default_rng(0), ReadErrors()
    tokens: list[Tensor] = []
    captions: list[str] = []
    images: list[Tensor] = []
    skipped, uncaptioned = Counter[str](), None

    def flush() -> None:
        if images:
            x = (torch.stack(images).to(dev).float() / 255 - mean) / std  # [B, 3, S, S]
            with torch.no_grad():
                tokens.append(encoder(x).half().cpu())
            images.clear()

    for s in progress((s for u in urls for s in shard_samples(u, errors)), "encoder tokens", unit="img"):
        out = decode_sample(s, aug, rng)
        if isinstance(out, str):
            skipped[out] += 1
            if out in CAPTION_SKIPS and uncaptioned is None:
                uncaptioned = s.get("__key__")
            continue
        images.append(out[0])
        captions.append(out[1])
        if len(images) == 64:
            flush()
    flush()
    skipped.update({k: n for k, n in errors.counts.items() if k != "samples_recovered"})
    where = f"{urls[0]}{' ...' if len(urls) > 1 else ''}"
    if not captions:
        if uncaptioned is not None:
            raise LitError(f"{where}: no sample has a caption (KEY.txt, or 'caption' in KEY.json); the first "
                           f"without one is {uncaptioned!r} (skipped: {dict(skipped)})")  # fmt: skip
        raise LitError(f"{where}: no usable image-caption sample (skipped: {dict(skipped)})")
    out_tokens = torch.cat(tokens)
    if file is not None:
        with atomic_path(file) as tmp:
            torch.save({"tokens": out_tokens, "captions": captions, "skipped": dict(skipped)}, tmp)
    return out_tokens, captions, skipped


class TokenNorm(nn.Module):
    """Standardises frozen tokens [B, T, C] with the per-position, per-channel mean and std of the training set's
    tokens (fixed buffers, as the probes' BatchNorm without affine parameters does for their features).

    Why: the tokens of an encoder that was never trained on such images (a random or young one) differ between
    images by a small fraction of their size; unnormalised, every image embedding starts in one direction and both
    contrastive losses settle at their collapsed value (seen on the demo digits: chance-level zero-shot)."""

    mean: Tensor
    std: Tensor

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(tokens, width))
        self.register_buffer("std", torch.ones(tokens, width))

    @torch.no_grad()
    def fit(self, tokens: Tensor, chunk: int = 1024) -> None:
        """Sets the statistics from tokens [N, T, C] (float16 is fine: summed in float64 a chunk at a time)."""
        total = torch.zeros(2, *tokens.shape[1:], dtype=torch.float64)
        for i in range(0, len(tokens), chunk):
            x = tokens[i : i + chunk].double()
            total += torch.stack([x.sum(0), (x * x).sum(0)])
        mean = total[0] / len(tokens)
        var = (total[1] / len(tokens) - mean * mean).clamp_min(0)
        self.mean.copy_(mean.float())
        self.std.copy_(var.sqrt().float().clamp_min(1e-6))

    def forward(self, tokens: Tensor) -> Tensor:
        return (tokens - self.mean) / self.std


def _towers(cfg: ModelConfig, loss: str, tokens: Tensor | None = None) -> nn.ModuleDict:
    """The trainable parts, named as in a siglip/clip model (so checkpoint keys match: ``image_head.*`` ...), and
    the token standardisation, fitted to ``tokens`` [N, T, C] when given."""
    norm = TokenNorm(cfg.num_patches, cfg.width)
    if tokens is not None:
        norm.fit(tokens)
    return nn.ModuleDict(
        {
            "token_norm": norm,
            "image_head": ImageHead(cfg),
            "text_tower": TextTower(cfg, cfg.vocab_size or 0),
            "loss": SigLipLoss() if loss == "siglip" else ClipLoss(),
        }
    )


def _train(parts: nn.ModuleDict, tokens: Tensor, text: Tensor, mask: Tensor, s: LitSettings) -> tuple[list[float], int]:
    """Trains ``parts`` on cached tokens [N, T, C] and captions [N, L]; returns the per-step losses and steps."""
    n = len(tokens)
    batch = min(s.batch_size, n)
    per_epoch = n // batch  # full batches only: a contrastive loss over a 1-sample batch has no negatives
    total = s.steps or s.epochs * per_epoch
    warmup = max(1, round(s.warmup_fraction * total))
    dev = _device()
    parts.to(dev).train()
    decay = [p for p in parts.parameters() if p.dim() >= 2]
    rest = [p for p in parts.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=s.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_at(i, total, warmup))
    g = torch.Generator().manual_seed(s.seed)
    losses: list[float] = []
    order = torch.randperm(n, generator=g)
    bar = progress(range(total), f"LiT ({s.loss})", unit="step")
    for step in bar:
        i = step % per_epoch
        if i == 0 and step:
            order = torch.randperm(n, generator=g)
        idx = order[i * batch : (i + 1) * batch]
        L = int(mask[idx].sum(1).max())  # the pad columns past the longest caption change nothing (causal
        # blocks, pooling over real tokens): cut them, the text tower's cost is linear to quadratic in L
        image = parts["image_head"](parts["token_norm"](tokens[idx].to(dev).float()))  # [B, embed_dim]
        caption = parts["text_tower"](text[idx, :L].to(dev), mask[idx, :L].to(dev))  # [B, embed_dim]
        loss = parts["loss"](image, caption)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clamp_temperatures(parts)  # CLIP's scale, after the step (open_clip's order)
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses, total


def train_lit(
    encoder_path: str | Path,
    out: str | Path,
    shards: str = "demo",
    settings: LitSettings | None = None,
    towers: dict[str, Any] | None = None,
    tokenizer: str | None = None,
    cache: bool = True,
) -> dict[str, Any]:
    """Trains a LiT text tower and image head against the frozen encoder and writes the LiT folder ``out``.

    Args:
        encoder_path: anything ``aimpre.export.load`` reads (a run, checkpoint, export, timm/HF AIMv2 directory).
        out: the folder to create (written whole under a temporary name, then renamed).
        shards: captioned shards: a spec, ``demo`` (the demo's pretrain split) or ``demo:SPLIT``.
        settings: training settings (loss, steps or epochs, batch size, lr, seed).
        towers: tower size overrides, keys from ``TOWER_KEYS`` (default: the encoder's size's, see
            ``tower_config``).
        tokenizer: "bytes" or a tokenizer.json; default: the encoder's run's tokenizer, else "bytes".
        cache: keep the encoder's tokens under ``$AIMPRE_CACHE/lit-features``.

    Returns:
        The record written to ``lit.json``.
    """
    s = settings or LitSettings()
    if s.loss not in LOSSES:
        raise LitError(f"unknown LiT loss {s.loss!r}; losses: {', '.join(LOSSES)}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out or remove it")
    start = time.time()
    loaded = load(encoder_path)
    pre = loaded.info.get("preprocessing") or {}
    if pre.get("mean") is None or pre.get("std") is None:
        raise LitError(f"{encoder_path}: its normalisation (mean/std) is unknown; LiT needs it")
    spec, lowercase = (tokenizer, True) if tokenizer else encoder_tokenizer(encoder_path)
    tok = build_tokenizer(spec, lowercase)
    cfg = tower_config(loaded.encoder.cfg, tok.vocab_size, towers)
    urls = spec_urls(shards, "pretrain")
    encoder = loaded.encoder.to(_device()).eval().requires_grad_(False)  # locked: eval mode, no gradients
    weights = _weights_hash(encoder, pre)
    tokens, captions, skipped = captioned_features(
        encoder, pre, urls, cache_root() / "lit-features" if cache else None, weights
    )
    if skipped:
        print(f"lit: skipped {dict(skipped)} samples in {urls[0]}...", flush=True)
    if len(captions) < 2:
        raise LitError(f"{shards}: {len(captions)} captioned image(s); a contrastive loss needs at least 2")
    text, mask = encode_captions(tok, captions, cfg.text_len)
    torch.manual_seed(s.seed)
    parts = _towers(cfg, s.loss, tokens)
    losses, steps = _train(parts, tokens, text, mask, s)
    tail = losses[-max(1, min(10, len(losses) // 10)) :]
    record = {
        "format": "aimpre-lit",
        "encoder": {
            "path": str(Path(encoder_path).resolve()),
            "sha256": weights.hexdigest(),
            "info": loaded.info,
        },
        "preprocessing": {**pre, "crop": "centre square crop, no augmentation (tokens cached once)"},
        "towers": {k: getattr(cfg, k) for k in TOWER_KEYS},
        "tokenizer": {"spec": spec, "lowercase": lowercase, "identity": tok.identity()},
        "loss": s.loss,
        "shards": shards,
        "samples": len(captions),
        "skipped": dict(skipped),
        "settings": vars(s),
        "steps": steps,
        "loss_initial": losses[0],
        "loss_final": sum(tail) / len(tail),
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()},
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.time() - start, 1),
        "aimpre_version": __version__,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in parts.state_dict().items()}
    with atomic_path(out) as tmp:  # the folder appears complete or not at all
        tmp.mkdir()
        save_safetensors(tensors, tmp / WEIGHTS, {"format": "pt"})  # a full disk: WriteError naming the file
        (tmp / LIT_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return record


# ---- zero-shot ---------------------------------------------------------------------------------------------------


@dataclass
class ZeroShotModel:
    """What zero-shot classification needs: the frozen encoder and its preprocessing, the two towers, the
    tokenizer and caption length, and the encoder's ``_weights_hash`` (the feature cache key)."""

    encoder: AIMv2Encoder
    pre: dict[str, Any]
    image_head: ImageHead
    token_norm: nn.Module  # TokenNorm in a LiT folder; a contrastive run trained its head on raw tokens
    text_tower: TextTower
    tokenizer: Tokenizer
    text_len: int
    weights: Any


def _check_part(module: nn.Module, state: dict[str, Tensor], prefix: str, where: str) -> dict[str, Tensor]:
    """The ``prefix`` tensors of ``state`` (real, or a header's meta tensors), once their names, shapes and dtypes
    match ``module``'s."""
    part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    want = module.state_dict()
    missing, unexpected = sorted(set(want) - set(part)), sorted(set(part) - set(want))
    if missing or unexpected:
        raise LitError(f"{where}: '{prefix}*' tensors do not match the configured tower: missing "
                       f"{missing[:4]}, unexpected {unexpected[:4]}")  # fmt: skip
    for k, v in part.items():
        if v.shape != want[k].shape:
            raise LitError(f"{where}: tensor {prefix}{k} has shape {tuple(v.shape)}, the config implies "
                           f"{tuple(want[k].shape)}")  # fmt: skip
        if not v.is_floating_point():
            raise LitError(f"{where}: tensor {prefix}{k} is {v.dtype}, not a floating-point type")
    return part


def _load_state(module: nn.Module, state: dict[str, Tensor], prefix: str, where: str) -> None:
    part = _check_part(module, state, prefix, where)
    # the module was built on the meta device: take the file's tensors
    module.load_state_dict({k: v.float() for k, v in part.items()}, assign=True)


def _load_lit(folder: Path) -> ZeroShotModel:
    where = folder / LIT_JSON
    rec = _read_json(where, "LiT record")
    for key in ("encoder", "towers", "tokenizer", "preprocessing"):
        if not isinstance(rec.get(key), dict):
            raise LitError(f"{where}: missing or malformed {key!r}")
    enc_path = rec["encoder"].get("path")
    if not isinstance(enc_path, str) or not Path(enc_path).exists():
        raise FileNotFoundError(f"{where}: its encoder {enc_path} does not exist (LiT folders hold no encoder)")
    loaded = load(enc_path)
    pre = loaded.info.get("preprocessing") or {}
    weights = _weights_hash(loaded.encoder, pre)
    if weights.hexdigest() != rec["encoder"].get("sha256"):
        raise LitError(f"{where}: the encoder at {enc_path} is not the one this LiT model was trained on (its "
                       f"weights or preprocessing hash to {weights.hexdigest()[:12]}, lit.json records "
                       f"{str(rec['encoder'].get('sha256'))[:12]}); retrain with aimpre lit")  # fmt: skip
    t = rec["tokenizer"]
    tok = build_tokenizer(str(t.get("spec", "bytes")), bool(t.get("lowercase", True)))
    if t.get("identity") is not None and tok.identity() != t["identity"]:
        raise LitError(f"{where}: tokenizer {t.get('spec')!r} is not the one trained with ({tok.identity()} != "
                       f"{t['identity']})")  # fmt: skip
    try:
        cfg = tower_config(loaded.encoder.cfg, tok.vocab_size, rec["towers"])
    except LitError as e:
        raise LitError(f"{where}: {e}") from None
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS} beside {LIT_JSON}")
    with torch.device("meta"):  # lit.json's sizes allocate nothing before they are checked against the file
        head, text, norm = ImageHead(cfg), TextTower(cfg, tok.vocab_size), TokenNorm(cfg.num_patches, cfg.width)
    parts = ((head, "image_head."), (text, "text_tower."), (norm, "token_norm."))
    file = folder / WEIGHTS
    declared = _read_header(file)[0]  # the header only: a claimed tensor costs nothing until it is checked
    for module, prefix in parts:
        _check_part(module, declared, prefix, str(file))
    state = _load_tensors(file, [k for k in declared if k.startswith(tuple(p for _, p in parts))])
    for module, prefix in parts:
        _load_state(module, state, prefix, str(file))
    return ZeroShotModel(loaded.encoder, pre, head, norm, text, tok, cfg.text_len, weights)


def _load_run(path: Path) -> ZeroShotModel:
    """A siglip/clip pretraining run (or one of its checkpoints): its own image head and text tower."""
    from aimpre.export import read_run

    run = read_run(path)
    cfg, where = run.cfg.model, str(run.path)
    if cfg.objective not in LOSSES:
        raise LitError(f"{path}: a {cfg.objective} run has no text tower; zero-shot needs a LiT folder "
                       f"(aimpre lit {path} --out DIR) or a siglip/clip run")  # fmt: skip
    tok = build_tokenizer(run.cfg.data.tokenizer, run.cfg.data.lowercase)
    vocab = run.state.get("text_tower.embed.weight")
    if vocab is None:
        raise LitError(f"{where}: no 'model.text_tower.*' tensors in its state_dict")
    cfg = replace(cfg, vocab_size=vocab.shape[0])
    with torch.device("meta"):  # sizes from config.yaml allocate nothing before _load_state checks the tensors
        head, text = ImageHead(cfg), TextTower(cfg, vocab.shape[0])
    _load_state(head, run.state, "image_head.", where)
    _load_state(text, run.state, "text_tower.", where)
    loaded = load(path)
    pre = loaded.info.get("preprocessing") or {}
    weights = _weights_hash(loaded.encoder, pre)
    return ZeroShotModel(loaded.encoder, pre, head, nn.Identity(), text, tok, cfg.text_len, weights)


def load_zero_shot_model(path: str | Path) -> ZeroShotModel:
    """A LiT folder (``lit.json``) or a siglip/clip run directory or checkpoint, ready for zero-shot."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or directory: {p}")
    if (p / LIT_JSON).is_file():
        return _load_lit(p)
    if _run_config_file(p) is not None:
        return _load_run(p)
    raise LitError(f"{p}: neither a LiT folder (no {LIT_JSON}) nor a siglip/clip run (no config.yaml)")


def read_classes_file(path: str | Path) -> list[str]:
    """Class names, one a line in label order (blank lines ignored)."""
    p = Path(path)
    if not file_present(p, "class names file"):
        raise FileNotFoundError(f"class names file {p} does not exist")
    try:
        names = [line.strip() for line in read_text(p, "class names file").splitlines() if line.strip()]
    except UntrustedInputError as e:
        raise LitError(str(e)) from None
    if not names:
        raise LitError(f"class names file {p} names no class")
    return names


def class_names(urls: list[str]) -> list[str]:
    """The class names of a labelled shard set, from beside its shards: ``index.json``'s
    ``splits[NAME]["classes"]`` for the split holding these shards, else ``classes.txt``."""
    folder = Path(urls[0]).parent
    index = folder / "index.json"
    if index.is_file():
        data, names = _read_json(index, "shard index"), {Path(u).name for u in urls}
        for split, info in (data.get("splits") or {}).items():
            if not isinstance(info, dict) or not names <= set(info.get("shards") or ()):
                continue
            classes = info.get("classes")
            if classes is not None:
                if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
                    raise LitError(f"{index}: splits[{split!r}]['classes'] must be a list of class names")
                return classes
    if (folder / "classes.txt").is_file():
        return read_classes_file(folder / "classes.txt")
    raise LitError(f"no class names for {urls[0]}: pass --classes or --classes-file, or put classes.txt (one name "
                   f"a line, in label order) or index.json splits[NAME]['classes'] beside the shards")  # fmt: skip


def _check_templates(templates: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    if not templates:
        raise LitError("no prompt templates given")
    for t in templates:
        if t.count("{}") != 1:
            raise LitError(f"prompt template {t!r} must hold exactly one '{{}}' for the class name")
    return tuple(templates)


@torch.no_grad()
def class_embeddings(m: ZeroShotModel, names: list[str], templates: tuple[str, ...]) -> Tensor:
    """[K, D]: per class, the re-normalised mean of its L2-normalised prompt embeddings (CLIP's ensemble)."""
    dev = next(m.text_tower.parameters()).device
    out = []
    for name in names:
        ids, mask = encode_captions(m.tokenizer, [t.format(name) for t in templates], m.text_len)
        emb = F.normalize(m.text_tower(ids.to(dev), mask.to(dev)), dim=-1)  # [templates, D]
        out.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(out)


def degenerate(pred: Tensor, labels: Tensor, names: list[str]) -> list[str]:
    """Why a zero-shot top-1 means nothing, if it does: the predictions collapsed onto one class (more than 90% of
    them), or top-1 is not above chance (1 / classes, plus two standard errors of a top-1 measured on this many
    images). A collapsed classifier scores exactly that class's share, which can look like a result.

    Args:
        pred: the predicted class of each image [N].
        labels: the true class of each image [N].
        names: the class names, in label order.
    """
    n, k = len(labels), len(names)
    out = []
    counts = torch.bincount(pred, minlength=k)
    top = int(counts.argmax())
    if k > 1 and counts[top] > 0.9 * n:
        out.append(f"predictions collapsed: {int(counts[top])} of the {n} images ({int(counts[top]) / n:.0%}) got "
                   f"class {names[top]!r}")  # fmt: skip
    top1, chance = (pred == labels).float().mean().item(), 1 / k
    margin = 2 * math.sqrt(chance * (1 - chance) / n)
    if top1 <= chance + margin:
        out.append(f"top-1 {top1:.1%} is not above chance ({chance:.1%} with {k} classes; two standard errors at "
                   f"{n} images: {margin:.1%})")  # fmt: skip
    return out


def zero_shot(
    model_path: str | Path,
    shards: str,
    classes: list[str] | None = None,
    templates: tuple[str, ...] | list[str] | None = None,
    out: Path | None = None,
    cache: bool = True,
) -> dict[str, Any]:
    """Zero-shot top-1 (and top-5 with >= 5 classes) of a LiT folder or siglip/clip run on labelled shards.

    Args:
        model_path: a LiT folder (``aimpre lit``), or a siglip/clip run directory or checkpoint.
        shards: labelled shards (``demo:SPLIT`` or a spec); labels index ``classes``.
        classes: class names in label order; default: from beside the shards (see ``class_names``).
        templates: prompt templates with one ``{}``; default ``TEMPLATES``.
        out: results JSON to write (atomically), if anywhere.
        cache: keep the encoder's tokens under ``$AIMPRE_CACHE/features`` (shared with the probe).

    Returns:
        "top1" (a fraction), "top5" (with >= 5 classes), "classes", "n", "chance", "per_class" top-1,
        "warnings" (``degenerate``'s, empty for a sound result) and the settings.
    """
    start = time.time()
    temps = _check_templates(TEMPLATES if templates is None else templates)
    try:
        urls = shard_urls(shards)
    except ProbeError as e:
        raise LitError(str(e)) from None
    names = list(classes) if classes is not None else class_names(urls)
    if not names or len(set(names)) != len(names):
        raise LitError(f"class names must be non-empty and distinct, got {names[:10]}")
    m = load_zero_shot_model(model_path)
    dev = _device()
    for part in (m.encoder, m.image_head, m.token_norm, m.text_tower):
        part.to(dev).eval()
    try:
        tokens, labels = features(m.encoder, m.pre, urls, cache_root() / "features" if cache else None, m.weights)
    except ProbeError as e:
        raise LitError(f"zero-shot needs labelled images (KEY.cls, or 'label'/'cls' in KEY.json): {e}") from None
    if int(labels.max()) >= len(names):
        raise LitError(f"{shards}: label {int(labels.max())} has no class name ({len(names)} given: "
                       f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''})")  # fmt: skip
    text = class_embeddings(m, names, temps)  # [K, D]
    with torch.no_grad():
        image = torch.cat([
            F.normalize(m.image_head(m.token_norm(tokens[i : i + 256].to(dev).float())), dim=-1)
            for i in range(0, len(tokens), 256)
        ])  # fmt: skip
        ranked = (image @ text.T).topk(min(5, len(names)), dim=-1).indices.cpu()  # [N, k]
    hit = ranked[:, 0] == labels
    res: dict[str, Any] = {
        "top1": hit.float().mean().item(),
        "top5": (ranked == labels[:, None]).any(-1).float().mean().item() if len(names) >= 5 else None,
        "classes": names,
        "n": len(labels),
        "chance": 1 / len(names),
        "per_class": {c: hit[labels == i].float().mean().item() for i, c in enumerate(names) if (labels == i).any()},
        "warnings": degenerate(ranked[:, 0], labels, names),  # empty unless the result is degenerate
        "model": str(model_path),
        "shards": shards,
        "templates": list(temps),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.time() - start, 1),
    }
    if res["top5"] is None:
        del res["top5"]
    if out is not None:
        write_text(out, json.dumps(res, indent=2) + "\n")
    return res


__all__ = ["LOSSES", "TEMPLATES", "LitError", "LitSettings", "class_names", "train_lit", "zero_shot"]
