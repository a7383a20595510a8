"""Encoder export (timm, Hugging Face transformers, plain safetensors) and loading any of them, or a run, back.

``aimpre export`` writes the encoder only (no decoder, heads or optimiser) as ``model.safetensors`` plus the config
the target needs (``aimpre.formats`` holds the tensor names and configs, checked against timm 1.0.31 and
transformers 5.23) and ``aimpre.json``: the preprocessing the encoder was trained with (mean/std, resolution) and
its provenance (run, step, config hash). ``load`` reads any of these back, a run or a Lightning checkpoint too,
and released timm/HF AIMv2 directories, into our ``AIMv2Encoder``. An export is a renaming of tensors, never an
approximation: ``tests/test_export.py`` compares features with the real libraries to 1e-5.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from aimpre import __version__
from aimpre.config import Config, config_hash, load_config, short
from aimpre.data.decode import Augment, crop_box
from aimpre.data.native import Area, fit_to_canvas
from aimpre.files import (
    UntrustedInputError,
    atomic_path,
    file_present,
    parse_json,
    read_json_object,
    regular_file,
    save_safetensors,
)
from aimpre.formats import (
    ENCODER_FIELDS,
    MOE_FIELDS,
    POS_FIELDS,
    ExportError,
    State,
    config_from_hf,
    config_from_timm,
    encoder_config,
    from_hf,
    from_timm,
    hf_config,
    hf_mean_head,
    hf_preprocessor,
    timm_config,
    to_hf,
)
from aimpre.model import AIMv2, AIMv2Encoder, ModelConfig

FORMATS = ("timm", "hf", "safetensors")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHTS = "model.safetensors"
INFO = "aimpre.json"
M = TypeVar("M", AIMv2Encoder, AIMv2)


@dataclass(frozen=True)
class Preprocess:
    """An image -> the normalised float tensor the encoder takes, as aimpre evaluates it: centre square crop,
    antialiased bicubic resize in uint8 (``aimpre.data.decode``'s eval path), then (x / 255 - mean) / std per
    channel. A non-square ``img_size`` (H, W) (a sincos2d encoder runs any grid) is the centre H x W of the centre
    square resized to max(H, W), as ``aimpre probe --img-size HxW`` reads it: never stretched.

    ``fit`` is the native model's way instead (aspect kept, zero-padded to a canvas of patches, as it trained)."""

    img_size: int | tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (self.mean, self.std))
        return (x.float() / 255 - mean) / std

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """A PIL image (any mode; alpha is dropped) or a uint8 [3, H, W] tensor -> float32 [3, H, W] (img_size)."""
        image = _uint8_chw(image)
        h, w = (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size
        S = max(h, w)
        _, H, W = image.shape
        x0, y0, x1, y1 = crop_box(W, H, Augment(S, train=False), np.random.default_rng(0))
        top, left, bottom, right = round(y0), round(x0), round(y1), round(x1)  # rounded as the decoder rounds
        x = image[None, :, top:bottom, left:right].contiguous(memory_format=torch.channels_last)  # [1, 3, h, w]
        x = F.interpolate(x, size=(S, S), mode="bicubic", antialias=True)[0]
        top, left = (S - h) // 2, (S - w) // 2
        return self._normalise(x[:, top : top + h, left : left + w])  # [3, S, S] -> [3, h, w], the centre

    def fit(self, image: Image.Image | torch.Tensor, area: Area, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """The native model's preprocessing: ``image`` resized with its aspect kept to fit ``area``'s canvas,
        zero-padded at the bottom and right (``aimpre.data.native.fit_to_canvas``, as native training does), then
        normalised (the padding too, as in training: it is uint8 0 before normalisation).

        Args:
            image: a PIL image or a uint8 [3, H, W] tensor.
            area: the canvas in patches (``canvas(n)`` for one of 2^n patches).
            patch: the encoder's patch size in pixels.

        Returns:
            float32 [3, rows * patch, cols * patch] and the image's own (rows, cols) in patches: the tokens of
            row r, column c (raster index r * area.cols + c) with r >= rows or c >= cols are padding.
        """
        x, grid = fit_to_canvas(_uint8_chw(image), area, patch)
        return self._normalise(x), grid


def canvas(n: int) -> Area:
    """The canvas of 2^n patches that native training draws for n, wide side across: 2^floor(n/2) rows x
    2^ceil(n/2) columns (``aimpre.data.native.draw_area`` before its coin for the transpose).

    Args:
        n: log2 of the patch count (``data.native_log2_area``'s unit; the paper's 7..12 is 128..4096 patches).
    """
    if not 1 <= n <= 16:
        raise ValueError(f"native area 2^{n} patches: n must be 1..16")
    return Area(n, 1 << (n // 2), 1 << (n - n // 2))


def _uint8_chw(image: Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]
    return image


@dataclass
class Loaded:
    """An encoder and what is known about it: ``preprocessing`` (mean, std, img_size) and provenance, and
    ``transform``, the matching image preprocessing (None when the source does not record its mean/std)."""

    encoder: AIMv2Encoder
    info: dict[str, Any]
    transform: Preprocess | None = None


# ---- reading ----------------------------------------------------------------------------------------------------


def preprocessing_info(mean: Any, std: Any, img_size: int) -> dict[str, Any]:
    """The preprocessing an encoder expects, as exports record it.

    Args:
        mean: per-channel mean of 0..1 pixels (None if unknown).
        std: per-channel std (None if unknown).
        img_size: the square input resolution.
    """
    return {
        "mean": None if mean is None else [float(x) for x in mean],
        "std": None if std is None else [float(x) for x in std],
        "img_size": img_size,
        "resize": "centre square crop, bicubic resize to img_size",
    }


@dataclass
class RunCheckpoint:
    """A Lightning checkpoint of a run: its config and the whole model's state dict (``model.`` stripped)."""

    cfg: Config
    state: State
    step: int | None
    path: Path


def read_run(path: str | Path) -> RunCheckpoint:
    """Reads a run directory (its ``checkpoints/last.ckpt``) or one of its checkpoints, with the run's config.

    A sharded (FSDP, ``torch.distributed.checkpoint``) checkpoint directory is consolidated on the fly.

    Args:
        path: ``runs/NAME`` or ``runs/NAME/checkpoints/X.ckpt``.
    """
    path = Path(path)
    ckpt = path / "checkpoints" / "last.ckpt" if (path / "checkpoints").is_dir() else path
    if not ckpt.exists():
        raise FileNotFoundError(f"no checkpoint at {ckpt}")
    cfg_file = ckpt.parent.parent / "config.yaml"
    if not file_present(cfg_file, "run config"):
        raise FileNotFoundError(f"{ckpt}: its run's config {cfg_file} is missing (checkpoints are read with it)")
    cfg = load_config(cfg_file)
    from aimpre.train.checkpoint import load_checkpoint, model_state  # here: it imports Lightning

    obj = load_checkpoint(ckpt)  # a file or a sharded (FSDP) directory; nothing in either can run code
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise ExportError(f"{ckpt}: no 'state_dict' key: not a Lightning checkpoint")
    state = _tensors(obj["state_dict"], f"{ckpt}: 'state_dict'")
    step = obj.get("global_step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
        raise ExportError(f"{ckpt}: 'global_step' is a {type(step).__name__}, not an integer")
    return RunCheckpoint(cfg, model_state({"state_dict": state}), step, ckpt)


def _tensors(obj: Any, where: str) -> State:
    """``obj`` if it maps names to tensors, else an error naming ``where`` and the first bad entry."""
    if not isinstance(obj, dict):
        raise ExportError(f"{where} is a {type(obj).__name__}, not a mapping of tensor names to tensors")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ExportError(f"{where}: entry {str(k)[:80]!r} is a {type(v).__name__}, not a tensor")
    return obj


def _read_checkpoint(path: Path) -> tuple[ModelConfig, State, dict[str, Any]]:
    run = read_run(path)
    state = {k.removeprefix("encoder."): v for k, v in run.state.items() if k.startswith("encoder.")}
    if not state:
        raise ExportError(f"{run.path}: no 'model.encoder.*' tensors in its state_dict")
    c = run.cfg
    info = {
        "source": str(run.path), "run": c.run.name, "step": run.step, "config_hash": config_hash(c),
        "objective": c.model.objective,
        "preprocessing": preprocessing_info(c.data.mean, c.data.std, c.model.img_size),
    }  # fmt: skip
    return c.model, state, info


# safetensors' dtype names (its own table, in safetensors.torch, is private)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _read_header(file: Path) -> tuple[State, dict[str, str]]:
    """Every tensor a safetensors file declares, as a meta tensor of its shape and dtype, and its header metadata.

    Only the JSON header is read, so a header that claims huge tensors (a sparse file can back any claim) costs
    nothing until the claims are checked against the model; safetensors itself refuses claims past the file's end.
    """
    try:
        regular_file(file, "safetensors file")  # a FIFO would block safe_open forever
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
            decl = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    except UntrustedInputError as e:
        raise ExportError(str(e)) from None
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise ExportError(f"{file}: not a readable safetensors file ({e})") from e
    state = {}
    for k, (shape, dtype) in decl.items():
        if dtype not in _ST_DTYPES:
            raise ExportError(f"{file}: tensor {short(k, 80)} has dtype {dtype}, which aimpre does not read")
        state[k] = torch.empty(shape, dtype=_ST_DTYPES[dtype], device="meta")
    return state, meta


def _load_tensors(file: Path, keys: Iterable[str]) -> State:
    """The tensors ``keys`` of a safetensors file, whose header has been checked (``_read_header``)."""
    try:
        with safe_open(str(file), "pt") as f:
            return {k: f.get_tensor(k) for k in keys}
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise ExportError(f"{file}: not a readable safetensors file ({e})") from e


def _weight_files(folder: Path) -> list[Path]:
    """``model.safetensors``, or the shards named by ``model.safetensors.index.json``."""
    if file_present(folder / WEIGHTS, "safetensors file"):
        return [folder / WEIGHTS]
    index = folder / f"{WEIGHTS}.index.json"
    if file_present(index, "safetensors index"):
        weight_map = _read_json(index, "safetensors index").get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise ExportError(f"{index}: weight_map must be an object, got {short(weight_map, 60)}")
        names: set[str] = set()
        for name in weight_map.values():
            if not isinstance(name, str) or Path(name).name != name:  # shards live beside the index
                raise ExportError(f"{index}: weight_map names {short(name, 60)}, not a file name in {folder}")
            names.add(name)
        return [folder / name for name in sorted(names)]
    raise FileNotFoundError(f"{folder}: no {WEIGHTS} (or {WEIGHTS}.index.json); only safetensors weights are read")


def _read_weights(folder: Path, cfg: ModelConfig, fmt: str, claim: str) -> State:
    """The weights of ``folder``, loaded once their headers show as many blocks as ``claim`` (a file) says in
    ``cfg`` and the names, shapes and dtypes the encoder needs; tensors the encoder does not use are not loaded."""
    files = _weight_files(folder)
    headers = {file: _read_header(file)[0] for file in files}
    declared = {k: v for h in headers.values() for k, v in h.items()}
    _check_depth(cfg.depth, _rename(fmt, declared, folder), claim, str(files[0]))
    _check_state(cfg, _rename(fmt, declared, folder), str(folder))
    unused = _unused(fmt, declared)
    return {k: v for f, h in headers.items() for k, v in _load_tensors(f, [k for k in h if k not in unused]).items()}


def _check_depth(depth: int, state: State, claim: str, weights: str, prefix: str = "", key: str = "depth") -> None:
    """The claimed depth must match the blocks the tensors hold, before a model of that depth is built.

    Building costs memory per block even on the meta device (a claimed depth of 200000 took 7.75 GB); widths
    cost nothing there, and ``_build`` checks every shape after.
    """
    blocks = {int(m[1]) for k in state if (m := re.match(rf"{re.escape(prefix)}blocks\.(\d+)\.", k))}
    if depth != len(blocks):
        raise ExportError(f"{claim} says {key} {depth}, but {weights} holds {len(blocks)} blocks")


def _read_json(file: Path, what: str = "metadata file") -> dict[str, Any]:
    """A JSON object from ``file``, its size and nesting bounded (``aimpre.files.read_json``)."""
    try:
        return read_json_object(file, what)
    except UntrustedInputError as e:
        raise ExportError(str(e)) from None


def _rename(fmt: str, state: State, file: Path) -> State:
    return from_hf(state, str(file)) if fmt == "hf" else from_timm(state)


def _unused(fmt: str, names: Iterable[str]) -> set[str]:
    """The tensors ``_rename`` drops (a classifier or pooling head, the text tower of an ``Aimv2Model``), which are
    then never loaded. It mirrors ``from_hf`` and ``from_timm``: a name it misses is only loaded for nothing."""
    if fmt == "hf" and any(k.startswith("vision_model.") for k in names):
        return {k for k in names if not k.startswith("vision_model.") or k.startswith("vision_model.head.")}
    return {k for k in names if k.startswith(("head.", "trunk.head."))}


def _check_info(info: Any, where: str) -> dict[str, Any]:
    """An export's ``aimpre.json`` record: the fields ``load`` uses, each of the right kind."""
    if not isinstance(info, dict):
        raise ExportError(f"{where}: expected a JSON object, got {short(info, 60)}")
    for key in ("format", "encoder"):
        if key not in info:
            raise ExportError(f"{where}: missing key {key!r}")
    if info["format"] not in FORMATS:
        raise ExportError(f"{where}: 'format' is {short(info['format'], 60)}, not one of {', '.join(FORMATS)}")
    pre = info.get("preprocessing")
    if pre is not None:
        if not isinstance(pre, dict):
            raise ExportError(f"{where}: 'preprocessing' must be an object, got {short(pre, 60)}")
        _check_preprocessing(pre.get("mean"), pre.get("std"), where)
    return info


def _check_preprocessing(mean: Any, std: Any, where: str) -> None:
    for key, value in (("mean", mean), ("std", std)):
        ok = value is None or (
            isinstance(value, list)
            and len(value) == 3
            and all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value)
        )
        if not ok or (key == "std" and value is not None and min(value) <= 0):
            raise ExportError(f"{where}: {key} must be 3 finite numbers (std positive), got {short(value, 60)}")


def _read_export(folder: Path) -> tuple[ModelConfig, State, dict[str, Any]]:
    """A directory written by ``export_encoder`` (its ``aimpre.json`` says the format and the encoder)."""
    info = _check_info(_read_json(folder / INFO, "export record"), str(folder / INFO))
    cfg = encoder_config(info["encoder"], str(folder / INFO))
    return cfg, _rename(info["format"], _read_weights(folder, cfg, info["format"], str(folder / INFO)), folder), info


def _read_dir(folder: Path) -> tuple[ModelConfig, State, dict[str, Any]]:
    if file_present(folder / "config.yaml", "run config"):
        return _read_checkpoint(folder)
    if file_present(folder / INFO, "export record"):
        return _read_export(folder)
    conf_file = folder / "config.json"
    if not file_present(conf_file, "model config"):
        raise ExportError(
            f"{folder}: not a run (no config.yaml), an aimpre export (no {INFO}) or a timm/HF model (no config.json)"
        )
    conf = _read_json(conf_file, "model config")
    if "architecture" in conf:  # timm hub layout
        cfg = config_from_timm(conf, str(conf_file))
        pc, where = conf.get("pretrained_cfg") or {}, f"{conf_file}: pretrained_cfg"
        if not isinstance(pc, dict):
            raise ExportError(f"{where} must be an object, got {short(pc, 60)}")
        mean, std = pc.get("mean"), pc.get("std")
        fmt = "timm"
    elif "model_type" in conf:  # transformers layout
        cfg = config_from_hf(conf, str(conf_file))
        proc = folder / "preprocessor_config.json"
        pc = _read_json(proc, "preprocessor config") if file_present(proc, "preprocessor config") else {}
        where = str(proc)
        mean, std = pc.get("image_mean"), pc.get("image_std")
        fmt = "hf"
    else:
        raise ExportError(f"{conf_file}: neither timm's ('architecture') nor transformers' ('model_type') config")
    mean, std = (list(v) if isinstance(v, tuple) else v for v in (mean, std))
    _check_preprocessing(mean, std, where)
    info = {"source": str(folder), "format": fmt, "preprocessing": preprocessing_info(mean, std, cfg.img_size)}
    return cfg, _rename(fmt, _read_weights(folder, cfg, fmt, str(conf_file)), folder), info


def _read(path: Path) -> tuple[ModelConfig, State, dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.is_dir():
        return _read_dir(path)
    if path.suffix == ".ckpt":
        return _read_checkpoint(path)
    if path.suffix != ".safetensors":
        raise ExportError(f"{path}: expected a run or model directory, a .ckpt or a .safetensors file")
    declared, meta = _read_header(path)
    if "aimpre" not in meta:  # a timm or HF weights file: its directory holds the config
        return _read_dir(path.parent)
    where = f"{path}: header metadata 'aimpre'"  # our exports describe themselves: the file alone is enough
    try:
        info = _check_info(parse_json(meta["aimpre"], where), where)
    except UntrustedInputError as e:
        raise ExportError(str(e)) from None
    cfg = encoder_config(info["encoder"], where)
    _check_depth(cfg.depth, _rename(info["format"], declared, path), where, "the file")
    _check_state(cfg, _rename(info["format"], declared, path), str(path))  # before a byte of data is read
    unused = _unused(info["format"], declared)
    return cfg, _rename(info["format"], _load_tensors(path, [k for k in declared if k not in unused]), path), info


def _check_state(cfg: ModelConfig, state: State, source: str, cls: type[M] = AIMv2Encoder) -> M:  # type: ignore[assignment]
    """Our encoder (or, with ``cls=AIMv2``, the whole model) built on the meta device, where a forged shape allocates
    nothing, once every name, shape and dtype of ``state`` (real tensors or a header's meta ones) matches it."""
    claim = f"{source}: the config"
    if cls is AIMv2Encoder:
        _check_depth(cfg.depth, state, claim, "the state dict")
    else:
        _check_depth(cfg.depth, state, claim, "the state dict", "encoder.")
        _check_depth(cfg.dec_depth, state, claim, "the state dict", "decoder.", "dec_depth")
    with torch.device("meta"):
        encoder = cls(cfg)
    want = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise ExportError(
            f"{source}: tensor names do not match a {cfg.depth}-block {cls.__name__}: "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise ExportError(f"{source}: tensor {k!r} has shape {tuple(state[k].shape)}, the config implies {shape}")
        if not state[k].is_floating_point():  # .float() would turn integers or booleans into weights silently
            raise ExportError(f"{source}: tensor {k!r} is {state[k].dtype}, not a floating-point type")
    return encoder


def _build(cfg: ModelConfig, state: State, source: str, cls: type[M] = AIMv2Encoder) -> M:  # type: ignore[assignment]
    """Our encoder (or, with ``cls=AIMv2``, the whole model) holding ``state`` (float32), after ``_check_state``."""
    encoder = _check_state(cfg, state, source, cls)
    encoder.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return encoder.eval()


def run_encoder(run: RunCheckpoint) -> AIMv2Encoder:
    """The encoder of a run checkpoint of any objective (its ``encoder.*`` tensors), checked as ``_build`` checks."""
    state = {k.removeprefix("encoder."): v for k, v in run.state.items() if k.startswith("encoder.")}
    return _build(run.cfg.model, state, str(run.path))


def run_model(run: RunCheckpoint) -> AIMv2:
    """The whole AIMv2 model of an aimv2 run checkpoint (float32, eval mode), checked as ``_build`` checks."""
    return _build(run.cfg.model, run.state, str(run.path), AIMv2)


def load(path: str | Path) -> Loaded:
    """Our encoder from a run, a Lightning checkpoint, or a timm / HF / safetensors export (ours or released).

    Args:
        path: a run directory, a ``.ckpt`` file, an export directory (or its ``model.safetensors``), or a timm hub
            or transformers model directory (``config.json`` + safetensors weights), e.g. a released AIMv2.

    Returns:
        The encoder (float32, eval mode) and ``info``: ``preprocessing`` (mean/std, None where the source does not
        say, and img_size) and, where known, ``run``, ``step`` and ``config_hash``.
    """
    cfg, state, info = _read(Path(path))
    pre = info.get("preprocessing") or {}
    known = pre.get("mean") is not None and pre.get("std") is not None
    transform = Preprocess(cfg.img_size, tuple(pre["mean"]), tuple(pre["std"])) if known else None
    return Loaded(_build(cfg, state, str(path)), info, transform)


def load_encoder(path: str | Path) -> AIMv2Encoder:
    """Our encoder from ``path`` (see ``load``): ``forward(images)`` on normalised [B, 3, H, W] gives [B, N, width].

    ``load(path).transform`` is the image preprocessing that matches it.
    """
    return load(path).encoder


# ---- writing ----------------------------------------------------------------------------------------------------


def export_encoder(src: str | Path, fmt: str, out: str | Path, dtype: str = "fp32") -> Path:
    """Writes the encoder of ``src`` (anything ``load`` reads) as a ``fmt`` export in the new directory ``out``.

    Args:
        src: a run directory, checkpoint or export.
        fmt: "timm", "hf" or "safetensors" (our names plus ``aimpre.json``; what ``load`` reads fastest).
        out: the directory to create.
        dtype: "fp32" or "bf16".
    """
    loaded = load(src)  # checks every tensor name and shape before anything is written
    return write_export(loaded.encoder, fmt, out, dtype, {**loaded.info, "exported_from": str(src)})


def write_export(
    encoder: AIMv2Encoder, fmt: str, out: str | Path, dtype: str = "fp32", info: dict | None = None
) -> Path:
    """Writes ``encoder`` as a ``fmt`` export: built under a temporary name, renamed into place when complete.

    Args:
        encoder: the encoder to write.
        fmt: "timm", "hf" or "safetensors".
        out: the directory to create (an existing one is an error).
        dtype: "fp32" or "bf16".
        info: ``preprocessing`` (mean, std, img_size) and provenance (``run``, ``objective``, ``step``,
            ``config_hash``, ``exported_from``) to record.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; dtypes: {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out or remove it")
    cfg, given = encoder.cfg, info or {}
    pre = given.get("preprocessing") or preprocessing_info(None, None, cfg.img_size)
    if fmt != "safetensors" and (pre["mean"] is None or pre["std"] is None):
        raise ExportError(f"the encoder's normalisation (mean/std) is unknown, and a {fmt} export must declare it")
    if fmt != "safetensors" and cfg.moe_experts:
        raise ExportError(f"{'timm' if fmt == 'timm' else 'Hugging Face transformers'} has no MoE AIMv2 (this encoder "
                          f"has {cfg.moe_experts} experts per MoE block): export with --format safetensors, which "
                          "aimpre.export.load_encoder reads")  # fmt: skip
    if fmt == "timm" and cfg.pos_embed == "sincos2d":
        # checked against timm 1.0.31 (timm is not a dependency of ours: no import here)
        raise ExportError("timm has no native-resolution AIMv2 (its VisionTransformer takes a learned position "
                          "table or none, not 2D sin-cos for any grid; checked in timm 1.0.31): export this sincos2d "
                          "encoder with --format hf (Aimv2VisionModel, is_native) or --format safetensors")  # fmt: skip
    if fmt == "timm" and cfg.norm_eps != 1e-5:
        raise ExportError(f"norm_eps={cfg.norm_eps}, but timm's aimv2 models fix RMSNorm eps at 1e-5")
    record = {
        "format": fmt, "dtype": dtype,
        "encoder": {k: getattr(cfg, k) for k in ENCODER_FIELDS + (MOE_FIELDS if cfg.moe_experts else ())
                    + (POS_FIELDS if cfg.pos_embed != "learned" else ())},
        "preprocessing": pre,
        **{k: given.get(k) for k in ("run", "objective", "step", "config_hash", "exported_from")},
        "aimpre_version": __version__, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in encoder.state_dict().items()}
    if fmt == "hf":
        tensors = {**to_hf(tensors), **hf_mean_head(cfg.width, DTYPES[dtype])}
    files: dict[str, dict] = {INFO: record}
    if fmt == "timm":
        files["config.json"] = timm_config(cfg, pre)
    elif fmt == "hf":
        files["config.json"] = hf_config(cfg, dtype)
        files["preprocessor_config.json"] = hf_preprocessor(pre)
    with atomic_path(out) as tmp:  # the directory appears complete or not at all
        tmp.mkdir()
        # a full disk: WriteError naming the file and the free space
        save_safetensors(tensors, tmp / WEIGHTS, {"format": "pt", "aimpre": json.dumps(record)})
        for name, data in files.items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
    return out
