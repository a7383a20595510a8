"""Typed run configuration: dataclasses, loaded from YAML with dotted command-line overrides.

``load_config("configs/aimv2_large.yaml", ["model.depth=12", "optim.lr=3e-4"])``. A YAML file holds only
differences from the defaults, which are the default job (``tiny`` on the demo data, CPU). ``model.size``
picks a named size (``aimpre.model.sizes.SIZES``) whose values the other ``model.*`` keys then override.
Unknown keys, wrong types and impossible values raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import reprlib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aimpre.files import UntrustedInputError, check_depth, file_present, read_bytes
from aimpre.kernels import available_backends, fused
from aimpre.model.sizes import OBJECTIVES, SIZES, ModelConfig, model_config
from aimpre.objectives.towers import POOLS
from aimpre.quoting import one_line, plain_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an impossible value; the message names the key."""


class RunError(RuntimeError):
    """A run stopped for a reason its message explains (what happened, what is on disk, what to do); the
    ``aimpre`` command prints it as one line, like a ConfigError."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def short(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to about ``limit`` characters: error messages quote values a user typed or a file held,
    which may be megabytes long or deeply nested; reprlib stops early instead of building the whole repr."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases: a few hundred bytes of nested aliases ("billion laughs") expand to
    gigabytes once anything walks the result, and our configs never need them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(
                problem=f"YAML aliases (*{event.anchor[:40]}) are not supported; write the value out",
                problem_mark=event.start_mark,
            )
        return super().compose_node(parent, index)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line from PyYAML's multi-line message: where, then what."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        m = e.problem_mark
        return f"line {m.line + 1}, column {m.column + 1}: {e.problem}"
    return " ".join(str(e).split())


# PyYAML parses about a megabyte a second: a config, sweep or run file is a few kilobytes
MAX_YAML_BYTES = 4 << 20


def load_yaml(path: str | Path, what: str = "config file") -> Any:
    """A YAML file's content, or a ConfigError naming the file (missing, not text, not YAML, aliases)."""
    p = Path(path)
    try:
        if not file_present(p, what):  # a FIFO or a directory is named as such, not "not found"
            raise ConfigError(f"{what} not found: {p}")
        data = yaml.load(read_bytes(p, what, MAX_YAML_BYTES).decode("utf-8"), Loader=_NoAliasLoader)  # a SafeLoader
        check_depth(data, f"{what} {p}")
        return data
    except UntrustedInputError as e:
        raise ConfigError(str(e)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {p} is not UTF-8 text (byte {e.start})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {_yaml_problem(e)}") from e
    except RecursionError as e:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{what} {p} nests lists or mappings too deeply") from e


def _is_demo(spec: str | list[str]) -> bool:
    """Whether every source of a shard spec is the embedded demo set (``demo`` or ``demo:SPLIT``)."""
    specs = spec if isinstance(spec, list) else [spec]
    return all(s == "demo" or s.startswith("demo:") for s in specs)


@dataclass
class DataConfig:
    # a webdataset shard spec (braces, "::" joins specs, pipe: URLs), or a list of them: one source each;
    # "demo" is the embedded demo set
    train_shards: str | list[str] = "demo"
    # the same forms; null: no validation; auto (the default): the demo's val split when every train source is
    # the demo, else none (validating on the demo scenes says nothing about a model trained on other data: give
    # your own held-out shards); the run's start line says which
    val_shards: str | list[str] | None = "auto"
    # resampled: draw shards with replacement forever (sample-count training, source mixing by `weights`);
    # otherwise epochs, each sample once per epoch, the same number of batches on every rank
    resampled: bool = False
    weights: list[float] | None = None  # sampling weight of each train_shards source; needs resampled
    index: str | None = None  # shard sample counts for pipe:/remote shards (aimpre data index SPEC --out FILE)
    tokenizer: str = "bytes"  # "bytes" (byte-level, no file) or the path of a Hugging Face tokenizer.json
    lowercase: bool = True  # lower-case captions before tokenizing (as AIMv2)
    batch_size: int = 32  # samples per device per micro-batch
    num_workers: int = 1  # DataLoader worker processes per device
    shuffle_buffer: int = 1000  # samples per chunk of the chunked permutation shuffle (exactly resumable)
    max_pixels: int = 100_000_000  # larger images are skipped unread (decompression bombs)
    # memory one image may take to decode (its bytes + every decoded copy, from its header): skipped if more
    max_sample_bytes: int = 512 << 20
    crop_scale: tuple[float, float] = (0.4, 1.0)  # AIMv2: RandomResizedCrop(scale 0.4-1) + horizontal flip
    hflip: bool = True  # random horizontal flip in training
    # AIMv2's reference trained with ImageNet statistics; every export records what was used
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel mean of 0..1 pixels
    std: tuple[float, float, float] = IMAGENET_STD  # per-channel std of 0..1 pixels
    # native resolution (AIMv2's native model, Fini et al. 2024 sec. 3): each step draws an area of A = 2^n patches,
    # n from a normal truncated to [-1, 1] mapped linearly onto native_log2_area (the paper: 7..12, 128..4096
    # patches) and rounded; every image is resized, aspect kept, to fit that step's grid (2^floor(n/2) x
    # 2^ceil(n/2) patches, or its transpose) and zero-padded; the batch holds tokens_per_batch / A images over all
    # ranks, so tokens per step stay constant. Needs model.pos_embed=sincos2d; data.batch_size is then the
    # validation batch only (validation stays square at model.img_size). aimpre.data.pipeline says when an epoch ends.
    native: bool = False
    native_log2_area: tuple[int, int] = (7, 12)  # lo, hi of n (areas 2^lo .. 2^hi patches)
    tokens_per_batch: int | None = None  # native: image tokens per step over all ranks; a multiple of 2^hi x ranks

    def __post_init__(self) -> None:
        # val_shards=auto resolves here, so every Config (loaded or built in code) and config.yaml hold the real value
        if self.val_shards == "auto":
            self.val_shards = "demo" if _is_demo(self.train_shards) else None


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak; AIMv2: 1e-3 (L), 8e-4 (H, 1B), 4e-4 (3B)
    min_lr: float = 1e-5  # the cosine decays to it; the cooldown ends at it
    warmup_steps: int = 30  # linear warm-up from 0 to lr
    schedule: str = "cosine"  # cosine (warmup, cosine to min_lr) | constant (warmup, then flat)
    # constant schedule only: the last cooldown_steps before trainer.max_steps decay linearly from lr to min_lr
    # (the cooldown branches of AIMv2's scaling protocol; 0 = none)
    cooldown_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    # decoupled: each step p <- p * (1 - weight_decay * lr_t / lr), as AIMv2's AdamW; torch gets weight_decay / lr
    weight_decay: float = 1e-4
    grad_clip: float = 1.0  # gradient-norm clip; 0 = none


@dataclass
class TrainerConfig:
    max_steps: int = 300  # optimiser steps of the whole run
    accelerator: str = "auto"  # Lightning accelerator: auto | cpu | gpu | cuda | mps
    devices: int | str = "auto"  # devices per node: a count, or auto (a launcher's processes per node, else all)
    num_nodes: int = 1  # machines in the job
    # auto: bf16-mixed where the accelerator supports it, else 32-true; fp8: bf16-mixed plus float8 GEMMs in the
    # transformer blocks' linears (torchao: pip install 'aimpre[fp8]'; GPUs of compute capability >= 8.9, or CPU)
    precision: str = "auto"
    # trainer.precision=fp8's torchao recipe: tensorwise (one dynamic scale per tensor, the fastest) | rowwise
    fp8_recipe: str = "tensorwise"
    # auto (Lightning's choice) | ddp | fsdp (FSDP2 fully_shard per block: bf16 params, fp32 reduce, DCP checkpoints)
    strategy: str = "auto"
    accumulate_grad_batches: int = 1  # micro-batches per optimiser step
    # if set, accumulate_grad_batches = global_batch_size / (data.batch_size x world size), which must divide
    global_batch_size: int | None = None
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute each block in backward
    max_bad_steps: int = 10  # non-finite gradients: the step is skipped; this many in a row stops the run
    log_every: int = 10  # steps between logged metrics
    # where the metrics go, besides metrics.csv (always written): csv | tensorboard | wandb (offline; WANDB_MODE)
    loggers: list[str] = field(default_factory=lambda: ["csv"])
    val_every: int = 100  # steps between validations
    val_batches: int = 4  # batches per validation; 0 = none
    ckpt_every: int = 100  # steps between checkpoints (step-N.ckpt and last.ckpt)
    keep_last: int = 2  # step-N.ckpt files kept besides last.ckpt; -1 keeps all
    deterministic: bool = False  # torch deterministic algorithms (slower)


@dataclass
class RunConfig:
    name: str | None = None  # default: "<size>-<date>-<time>"
    out_dir: str = "runs"  # runs are written to out_dir/name
    seed: int = 0  # model init, data order, prefixes
    # start from weights, not a resume (`aimpre train --init SOURCE`): a run directory or checkpoint, an aimpre
    # export, or a released timm / Hugging Face AIMv2 encoder. The encoder is loaded (pos_embed resampled to
    # model.img_size), the decoder and heads where a run of the same objective has them; optimiser, schedule and
    # step start fresh. init.json in the run records the source, its SHA-256 and what was dropped
    init: str | None = None


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=lambda: model_config("tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def _known(cls: type, prefix: str, key: Any) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    hint = difflib.get_close_matches(str(key), names, n=1)
    extra = f"; did you mean {prefix + hint[0]!r}?" if hint else f"; known keys: {', '.join(names)}"
    return ConfigError(f"unknown config key {short(prefix + str(key))}{extra}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` (YAML and CLI strings for numbers are accepted)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1])
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r} must be a list, got {short(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"config key {key!r} must be a list of {len(args)} values, got {short(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"config key {key!r} must be {getattr(tp, '__name__', tp)}, got {short(value)}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {prefix.rstrip('.')!r} must be a mapping, got {short(raw)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise _known(cls, prefix, key)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return kwargs


def _build_model(raw: dict[str, Any]) -> ModelConfig:
    kwargs = _build(ModelConfig, raw, "model.")
    size = kwargs.pop("size", "tiny")
    if size not in SIZES:
        raise ConfigError(f"config key 'model.size': unknown size {short(size)}; known sizes: {', '.join(SIZES)}")
    return model_config(size, **kwargs)


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


# Lightning's precisions, and fp8 (bf16-mixed with float8 linears in the blocks, aimpre.train.parallel.convert_fp8)
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "fp8")
FP8_RECIPES = ("tensorwise", "rowwise")  # torchao's Float8LinearRecipeName values we offer

# Lightning's accelerator names that aimpre runs on (TPUs would need torch_xla, which aimpre does not support)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def _devices_ok(devices: int | str) -> bool:
    """What Lightning accepts for ``devices``: "auto", a count (-1: all), or device indices "0,1"."""
    if isinstance(devices, str) and re.fullmatch(r"\s*-?\d+\s*", devices):
        devices = int(devices)  # Lightning reads "2" as a count, like 2
    if isinstance(devices, int):
        return devices > 0 or devices == -1
    return devices == "auto" or re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*,?", devices) is not None


def _listed(spec: str | list[str]) -> list[str]:
    return spec if isinstance(spec, list) else [spec]


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: {why}")


# Plausibility limits on sizes, checked before anything is built: a config, run, export or LiT folder someone hands
# us may name any number, and these numbers become tensor allocations (model.width=10**7 asks for terabytes).
# Each limit is far above any model we know of (AIMv2-3B: width 3072, SwiGLU 8192, 24 blocks, 256 patches, 77
# tokens; SigLIP's vocabulary 32k-256k) and far below what would exhaust a machine by itself; MAX_PARAMS then
# bounds the whole model, about 10x AIMv2-3B's complete pretraining model (2.95B: encoder, decoder, heads).
SIZE_LIMITS: dict[str, int] = {
    **dict.fromkeys(("width", "dec_width", "text_width", "embed_dim", "head_width"), 1 << 16),
    **dict.fromkeys(("mlp_hidden", "dec_mlp_hidden", "text_mlp_hidden"), 1 << 18),
    **dict.fromkeys(("depth", "dec_depth", "text_depth", "head_depth"), 1024),
    **dict.fromkeys(("heads", "dec_heads", "text_heads"), 1024),
    "img_size": 1 << 14,
    "patch_size": 1 << 10,
    "text_len": 1 << 14,
    "vocab_size": 1 << 22,
    "num_classes": 1 << 22,
    "moe_experts": 1 << 10,
    "moe_hidden": 1 << 18,
}
MAX_PATCHES = 1 << 16  # tokens per image (AIMv2: 256; 448 px at patch 14: 1024)
MAX_PARAMS = 30_000_000_000
# samples held at once: a per-device batch (AIMv2: 8192 over 512 devices = 16), the global batch (AIMv2: 8192),
# the shuffle buffer (decoded samples, about 150 kB each at 224 px)
MAX_BATCH = 1 << 16
MAX_GLOBAL_BATCH = 1 << 24
MAX_SHUFFLE = 1 << 20


def model_size_problem(m: ModelConfig) -> tuple[str, str] | None:
    """The first size field of ``m`` over its plausibility limit, as (field, why), or None.

    Checked arithmetically (no tensor is built), in the order fields are listed, then the patch count and the
    whole model's parameter count (``aimpre.scaling.flops.param_counts``).

    Args:
        m: the model config, from a YAML file, an export's ``aimpre.json``/``config.json`` or a LiT ``lit.json``.
    """
    for k, limit in SIZE_LIMITS.items():
        v = getattr(m, k)
        if isinstance(v, int) and v > limit:
            return k, f"{v} is over the {limit} any model here may have"
    if m.patch_size <= 0:  # no patch count to speak of: validate names the key
        return None
    if m.num_patches > MAX_PATCHES:
        return "img_size", f"{m.img_size} px at patch {m.patch_size} is {m.num_patches} patches, over {MAX_PATCHES}"
    from aimpre.scaling.flops import param_counts  # here: aimpre.scaling imports the model package

    counts = param_counts(m, vocab_size=m.vocab_size or 1)
    if counts["total"] <= MAX_PARAMS:
        return None
    part = max((k for k in counts if k != "total"), key=counts.__getitem__)
    keys = _PART_KEYS[part] if part != "heads" else _HEAD_KEYS.get(m.objective, ("embed_dim",))
    return keys[0], (
        f"the model would have {counts['total'] / 1e9:.1f}B parameters, over the {MAX_PARAMS / 1e9:.0f}B limit "
        f"(its {part}: {counts[part] / 1e9:.1f}B, sized by {', '.join('model.' + k for k in keys)})"
    )


# the keys that size each part of param_counts, the largest first
_PART_KEYS = {
    "encoder": ("width", "depth", "mlp_hidden", "img_size"),
    "decoder": ("dec_width", "dec_depth", "dec_mlp_hidden", "vocab_size"),
    "text": ("text_width", "text_depth", "text_mlp_hidden", "vocab_size"),
}
_HEAD_KEYS = {
    "aimv2": ("vocab_size", "dec_width"),
    "aimv2_distill": ("vocab_size", "dec_width"),
    "aimv1": ("head_width", "head_depth"),
    "classification": ("num_classes", "width"),
}


def _check_run(r: RunConfig) -> None:
    """run.name is one plain path component (it becomes ``out_dir/name`` and a job name in generated scripts: no
    ``..``, ``/`` or newline); run.out_dir is any one-line path (the user's choice of where runs go)."""
    try:
        if r.name is not None:
            plain_name(r.name, "config key 'run.name'")
        one_line(r.out_dir, "config key 'run.out_dir'")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(bool(r.out_dir.strip()), "run.out_dir", "must not be empty")


def validate(cfg: Config) -> Config:
    """Rejects impossible values, naming the key."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.trainer
    _check(m.objective in OBJECTIVES, "model.objective", f"{short(m.objective)} is not one of {', '.join(OBJECTIVES)}")
    # before the size check, which reads the teacher's config (its width sizes the projection)
    if m.objective in ("distill", "aimv2_distill"):
        from aimpre.objectives.distill import LOSSES

        _check(bool(m.distill_teacher), "model.distill_teacher",
               f"objective {m.objective} needs a teacher: a run, checkpoint or export")  # fmt: skip
        _check(
            m.distill_loss in LOSSES, "model.distill_loss", f"{short(m.distill_loss)} is not one of {', '.join(LOSSES)}"
        )
        _check(_finite(m.distill_weight) and m.distill_weight > 0, "model.distill_weight",
               f"{m.distill_weight} must be > 0 and finite")  # fmt: skip
    problem = model_size_problem(m)
    if problem is not None:
        raise ConfigError(f"config key 'model.{problem[0]}': {problem[1]}")
    _check_run(cfg.run)
    _check(cfg.run.init is None or cfg.run.init.strip() != "", "run.init", "must name a run, checkpoint or export")
    _check(m.img_size > 0 and m.patch_size > 0 and m.img_size % m.patch_size == 0, "model.img_size",
           f"{m.img_size} must be a positive multiple of model.patch_size ({m.patch_size})")  # fmt: skip
    _check(m.num_patches >= 2, "model.img_size", "needs at least 2 patches")
    for w, h in (("width", "heads"), ("dec_width", "dec_heads")):
        width, heads = getattr(m, w), getattr(m, h)
        _check(heads > 0 and width > 0 and width % heads == 0, f"model.{w}", f"{width} not divisible by {heads} heads")
    for k in ("depth", "dec_depth", "mlp_hidden", "dec_mlp_hidden"):
        _check(getattr(m, k) > 0, f"model.{k}", "must be positive")
    _check(m.text_len >= 2, "model.text_len", "must be at least 2")
    _check(m.vocab_size is None or m.vocab_size > 2, "model.vocab_size", "must be > 2 or null (the tokenizer's)")
    lo, hi = m.prefix_range
    _check(1 <= lo <= hi <= m.num_patches - 1, "model.prefix_min",
           f"prefix range {lo}..{hi} must lie inside 1..{m.num_patches - 1}")  # fmt: skip
    _check(m.w_text >= 0 and m.w_image >= 0 and m.w_text + m.w_image > 0, "model.w_text", "weights must be >= 0")
    _check(_finite(m.w_text, m.w_image), "model.w_text", "w_text and w_image must be finite")
    _check(_finite(m.norm_eps) and m.norm_eps > 0, "model.norm_eps", f"{m.norm_eps} must be positive and finite")
    _check(m.pool in POOLS, "model.pool", f"{short(m.pool)} is not one of {', '.join(POOLS)}")
    for k in ("embed_dim", "text_width", "text_depth", "text_heads", "text_mlp_hidden", "head_width"):
        _check(getattr(m, k) > 0, f"model.{k}", "must be positive")
    _check(
        m.text_width % m.text_heads == 0, "model.text_width", f"{m.text_width} not divisible by {m.text_heads} heads"
    )
    _check(m.head_depth >= 0, "model.head_depth", "must be >= 0")
    if m.objective == "classification":
        _check(m.num_classes is not None and m.num_classes >= 2, "model.num_classes",
               f"{m.num_classes}: objective=classification needs the number of classes (at least 2)")  # fmt: skip
    if m.objective in ("siglip", "clip"):
        _check(d.batch_size >= 2, "data.batch_size",
               f"{d.batch_size}: a contrastive loss ({m.objective}) needs at least 2 pairs per rank")  # fmt: skip
    if m.moe_experts:
        _check(m.moe_experts >= 1, "model.moe_experts", f"{m.moe_experts} must be >= 1, or 0 for dense blocks")
        _check(1 <= m.moe_top_k <= m.moe_experts, "model.moe_top_k",
               f"{m.moe_top_k} must be in 1..model.moe_experts ({m.moe_experts})")  # fmt: skip
        _check(_finite(m.moe_balance_weight) and m.moe_balance_weight >= 0, "model.moe_balance_weight",
               f"{m.moe_balance_weight} must be >= 0 and finite")  # fmt: skip
        _check(m.moe_hidden is None or m.moe_hidden > 0, "model.moe_hidden", f"{m.moe_hidden} must be positive")
        outside = [b for b in m.moe_blocks or [] if not -m.depth <= b < m.depth]
        _check(not outside and m.moe_blocks != [], "model.moe_blocks",
               f"{outside or '[]'}: block indices must lie in -{m.depth}..{m.depth - 1} (null: all)")  # fmt: skip
        _check(
            m.objective == "aimv2",
            "model.moe_experts",
            f"MoE encoder blocks train with objective aimv2 (its loss adds the balance loss), not {m.objective}",
        )
    else:
        _check(m.moe_experts == 0, "model.moe_experts", f"{m.moe_experts} must be >= 1, or 0 for dense blocks")
    backends = available_backends()
    _check(m.pos_embed in ("learned", "sincos2d"), "model.pos_embed", f"{m.pos_embed!r} is not learned or sincos2d")
    _check(m.pos_embed != "sincos2d" or m.width % 4 == 0, "model.pos_embed",
           f"sincos2d needs model.width divisible by 4, got {m.width}")  # fmt: skip
    if d.native:
        _check(m.pos_embed == "sincos2d", "model.pos_embed",
               f"{m.pos_embed} is a table for one fixed grid: data.native needs model.pos_embed=sincos2d")  # fmt: skip
        _check(m.objective == "aimv2", "data.native", f"native resolution trains aimv2 only, not {m.objective}")
        lo, hi = d.native_log2_area
        _check(1 <= lo <= hi and (1 << hi) <= MAX_PATCHES, "data.native_log2_area",
               f"{lo}..{hi} must satisfy 1 <= lo <= hi and 2^hi <= {MAX_PATCHES} patches")  # fmt: skip
        tpb = d.tokens_per_batch
        _check(tpb is not None and tpb > 0 and tpb % (1 << hi) == 0, "data.tokens_per_batch",
               f"{tpb} must be a positive multiple of the largest area 2^{hi} = {1 << hi} patches")  # fmt: skip
        _check(t.global_batch_size is None, "trainer.global_batch_size",
               "native batches vary in images per step: data.tokens_per_batch sets the global batch")  # fmt: skip
    _check(m.attn_backend in backends, "model.attn_backend", f"{m.attn_backend!r} is not one of {', '.join(backends)}")
    _check(m.fused in fused.MODES, "model.fused", f"{short(m.fused)} is not one of {', '.join(fused.MODES)}")
    _check(m.fused != "liger" or fused.liger_installed(), "model.fused", f"needs liger-kernel: {fused.INSTALL_HINT}")
    _check(d.max_sample_bytes > 0, "data.max_sample_bytes", f"{d.max_sample_bytes} must be positive (bytes)")
    for k in ("train_shards", "val_shards"):  # an empty spec or list names no shards (val: null for none)
        spec = getattr(d, k)
        off = ": null turns validation off" if k == "val_shards" else ""
        _check(spec is None or (bool(spec) and all(isinstance(x, str) and x.strip() for x in _listed(spec))),
               f"data.{k}", f"{short(spec)} names no shards{off}")  # fmt: skip
    _check(0 < d.batch_size <= MAX_BATCH, "data.batch_size", f"{d.batch_size} must lie in 1..{MAX_BATCH} (per device)")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(
        0 <= d.shuffle_buffer <= MAX_SHUFFLE, "data.shuffle_buffer", f"{d.shuffle_buffer} must lie in 0..{MAX_SHUFFLE}"
    )
    _check(d.max_pixels > 0, "data.max_pixels", "must be positive")
    if d.weights is not None:
        n_sources = len(d.train_shards) if isinstance(d.train_shards, list) else 1
        _check(d.resampled, "data.weights", "mixing sources by weight needs data.resampled=true")
        _check(len(d.weights) == n_sources, "data.weights", f"needs one weight per source ({n_sources})")
        _check(all(w > 0 for w in d.weights), "data.weights", "weights must be positive")
    _check(0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale", "needs 0 < lo <= hi <= 1")
    _check(_finite(*d.mean), "data.mean", f"{list(d.mean)} must be finite")
    _check(_finite(*d.std) and all(s > 0 for s in d.std), "data.std", f"{list(d.std)} must be positive and finite")
    _check(_finite(o.lr) and o.lr > 0, "optim.lr", f"{o.lr} must be positive and finite")
    _check(0 <= o.min_lr <= o.lr, "optim.min_lr", f"{o.min_lr} must lie in [0, optim.lr={o.lr}]")
    _check(_finite(o.eps) and o.eps > 0, "optim.eps", f"{o.eps} must be positive and finite")
    _check(o.schedule in ("cosine", "constant"), "optim.schedule", f"{short(o.schedule)} is not cosine or constant")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(o.cooldown_steps == 0 or (o.schedule == "constant" and 2 <= o.cooldown_steps <= t.max_steps),
           "optim.cooldown_steps", "> 0 needs optim.schedule=constant and 2 <= it <= trainer.max_steps")  # fmt: skip
    _check(all(0 <= b < 1 for b in o.betas), "optim.betas", "must lie in [0, 1)")
    _check(_finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", "must be >= 0 and finite")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: no clipping)")
    _check(t.max_steps > 0, "trainer.max_steps", "must be positive")
    _check(t.accelerator in ACCELERATORS, "trainer.accelerator",
           f"{short(t.accelerator)} is not one of {', '.join(ACCELERATORS)}")  # fmt: skip
    _check(_devices_ok(t.devices), "trainer.devices",
           f"{short(t.devices)} is not auto, a positive count, -1 (all) or device indices like '0,1'")  # fmt: skip
    _check(t.strategy in ("auto", "ddp", "fsdp"), "trainer.strategy", f"{short(t.strategy)} is not auto, ddp or fsdp")
    _check(t.global_batch_size is None or 0 < t.global_batch_size <= MAX_GLOBAL_BATCH, "trainer.global_batch_size",
           f"{t.global_batch_size} must lie in 1..{MAX_GLOBAL_BATCH}")  # fmt: skip
    for k in ("log_every", "val_every", "ckpt_every", "accumulate_grad_batches", "num_nodes", "max_bad_steps"):
        _check(getattr(t, k) > 0, f"trainer.{k}", "must be positive")
    _check(t.val_batches >= 0, "trainer.val_batches", "must be >= 0")
    bad = [x for x in t.loggers if x not in ("csv", "tensorboard", "wandb")]
    _check(not bad, "trainer.loggers", f"{', '.join(map(repr, bad))} not one of csv, tensorboard, wandb")
    _check(t.keep_last == -1 or t.keep_last >= 1, "trainer.keep_last", "must be >= 1, or -1 to keep all")
    _check(t.precision in PRECISIONS, "trainer.precision",
           f"{short(t.precision)} is not one of {', '.join(PRECISIONS)}")  # fmt: skip
    _check(t.fp8_recipe in FP8_RECIPES, "trainer.fp8_recipe",
           f"{short(t.fp8_recipe)} is not one of {', '.join(FP8_RECIPES)}")  # fmt: skip
    return cfg


def build_config(raw: dict[str, Any]) -> Config:
    """Builds and validates a Config from a nested dict (the YAML's shape)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in {f.name for f in dataclasses.fields(Config)}:
            raise _known(Config, "", key)
    hints = typing.get_type_hints(Config)
    built: dict[str, Any] = {}
    for name, cls in hints.items():
        section = raw.get(name) or {}
        built[name] = _build_model(section) if name == "model" else cls(**_build(cls, section, f"{name}."))
    return validate(Config(**built))


def validation_line(cfg: Config) -> str:
    """What the run validates on, for its start line: a user who set only train shards must see that it is nothing.

    Args:
        cfg: a resolved config.
    """
    d, t = cfg.data, cfg.trainer
    if not d.val_shards or not t.val_batches:
        why = "trainer.val_batches=0" if d.val_shards else "set data.val_shards to held-out shards to validate"
        return f"validation: none ({why})"
    shown = ", ".join(d.val_shards) if isinstance(d.val_shards, list) else d.val_shards
    where = " (the embedded demo set's val split)" if _is_demo(d.val_shards) else ""
    shown = shown if len(shown) <= 200 else shown[:197] + "..."
    return f"validation: {shown}{where}, {t.val_batches} batches every {t.val_every} steps"


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {short(item)} must look like section.key=value")
    key, _, text = item.partition("=")
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"override key {short(key)} must be section.key (e.g. optim.lr)")
    if not text.strip():
        return path, ""
    try:
        return path, yaml.load(text, Loader=_NoAliasLoader)  # _NoAliasLoader is a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"override {short(item)}: the value is not valid YAML: {_yaml_problem(e)}") from e
    except RecursionError as e:
        raise ConfigError(f"override {short(item)}: the value nests lists or mappings too deeply") from e


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads a YAML config (or the defaults), applies ``section.key=value`` overrides, validates."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        raw = load_yaml(p) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
    for item in overrides:
        (section, key), value = parse_override(item)
        sec = raw.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"config section {short(section)} must be a mapping")
        sec[key] = value
    return build_config(raw)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), the form written to config.yaml."""
    return json.loads(json.dumps(asdict(cfg)))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def field_help(cls: type) -> dict[str, str]:
    """Each field's help text: the comment lines right above it and the comment on its line.

    The dataclasses' comments are the one place a key is documented; ``aimpre config show`` prints them.
    """
    import ast  # here: only ``config show`` reads source
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {  # line number -> comment text; tool directives are not help
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT and not tok.string.lstrip("#").strip().startswith(("fmt:", "noqa", "type:"))
    }
    out = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        i = node.lineno - 1
        while i >= 1 and lines[i - 1].lstrip().startswith("#") and i in comments:
            above.insert(0, comments[i])
            i -= 1
        own = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments]
        out[node.target.id] = "; ".join(t for t in (" ".join(above), *own) if t)  # the lines above are one text
    return out


def describe(cfg: Config) -> list[tuple[str, str, str]]:
    """(``section.key``, value as an override would spell it, help) for every key of ``cfg``."""
    values = to_dict(cfg)
    rows = []
    for section, cls in typing.get_type_hints(Config).items():
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            text = yaml.safe_dump(values[section][f.name], default_flow_style=True, width=1 << 20)
            rows.append((f"{section}.{f.name}", text.removesuffix("\n...\n").strip(), helps.get(f.name, "")))
    return rows
