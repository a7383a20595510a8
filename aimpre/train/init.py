"""Starting a run from weights (``aimpre train --init SOURCE``, or ``run.init``): not a resume.

SOURCE is anything ``aimpre.export.load`` reads: a run directory or one of its checkpoints, an aimpre export, or a
released AIMv2 encoder in timm or Hugging Face layout (``config.json`` + safetensors). The new run takes:

- the encoder, every tensor, with ``pos_embed`` resampled bicubically to the new grid when the resolution differs
  (``aimpre.model.posemb``, as timm does when it loads an AIMv2 at 336 or 448 px); a 2D sin-cos (native) source
  has no table: into a sincos2d run it needs none, into a learned one the table starts as the sin-cos values of the
  run's grid (same features at step 0); a learned table into a sincos2d run is refused (it would be dropped);
- from a run of the same objective (and tokenizer), the decoder and heads wherever a tensor's name and shape match;
  the rest keep their fresh initialisation, and the record lists what was dropped (an export has no decoder);

and starts its own optimiser, schedule and step 0, which is what a resolution stage (AIMv2 fine-tunes its 224 px
encoders at 336 and 448 px) or continued pretraining from a released checkpoint wants. The record, ``init.json`` in
the run directory, holds the source, its SHA-256 and what was loaded, resampled, kept fresh and dropped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aimpre.config import Config, ConfigError, config_hash
from aimpre.export import load, read_run, run_encoder
from aimpre.files import read_json
from aimpre.model import AIMv2Encoder
from aimpre.model.posemb import resample_pos_embed, sincos_2d

RECORD = "init.json"
# encoder fields that must agree between SOURCE and the run: they fix tensor shapes or the function computed
# (img_size may differ: the position embedding is resampled)
MATCHED = ("patch_size", "width", "depth", "heads", "mlp_hidden", "norm_eps")


def _is_run(path: Path) -> bool:
    return path.suffix == ".ckpt" or (path.is_dir() and (path / "config.yaml").is_file())


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def source_hash(path: str | Path) -> tuple[str, dict[str, str]]:
    """The SHA-256 of what ``--init`` reads, and of each file in it.

    A file: its own SHA-256 (what ``sha256sum FILE`` prints). A directory: the SHA-256 of ``sha256sum``'s lines
    (``HASH  NAME``, sorted by name) over its files: a sharded checkpoint's every file, a model directory's
    ``.json`` and ``.safetensors`` files; so ``cd DIR && sha256sum NAMES | sha256sum`` prints the same.

    Args:
        path: the file or directory read (a run's checkpoint, not the run directory).
    """
    path = Path(path)
    if path.is_file():
        digest = _sha256(path)
        return digest, {path.name: digest}
    if path.suffix == ".ckpt":  # a sharded (torch.distributed.checkpoint) checkpoint
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
    per = {p.relative_to(path).as_posix(): _sha256(p) for p in files}
    lines = "".join(f"{h}  {name}\n" for name, h in per.items())
    return hashlib.sha256(lines.encode()).hexdigest(), per


def _source(path: Path, objective: str, tokenizer: dict[str, Any] | None) -> tuple[AIMv2Encoder, dict, dict, str]:
    """The source's encoder, its other tensors that may be reused (decoder, heads), its info, and why the other
    tensors are not reused (empty when they are)."""
    if not _is_run(path):
        loaded = load(path)
        return loaded.encoder, {}, loaded.info, "the source is an encoder export"
    run = read_run(path)
    encoder = run_encoder(run)  # every name and shape checked, as export checks them
    info = {"source": str(run.path), "format": "run", "run": run.cfg.run.name, "step": run.step,
            "config_hash": config_hash(run.cfg), "objective": run.cfg.model.objective}  # fmt: skip
    rest = {k: v for k, v in run.state.items() if not k.startswith("encoder.")}
    if run.cfg.model.objective != objective:
        return encoder, rest, info, f"the source trained objective {run.cfg.model.objective}, this run {objective}"
    tok_file = run.path.parent.parent / "tokenizer.identity.json"
    if tokenizer is not None and tok_file.is_file() and read_json(tok_file, "tokenizer record") != tokenizer:
        return encoder, rest, info, "the source run used another tokenizer (text tables would mean other tokens)"
    return encoder, rest, info, ""


def init_from(model: nn.Module, cfg: Config, tokenizer: dict[str, Any] | None = None, digest: bool = True) -> dict:
    """Loads ``cfg.run.init`` into ``model`` (the run's objective model, freshly built) in place.

    Args:
        model: the objective's model (``.encoder`` plus its heads), as ``aimpre.objectives.build`` makes it.
        cfg: the run config; ``cfg.run.init`` names the source, ``cfg.model`` the run's encoder.
        tokenizer: the run's tokenizer identity: a source run with another one gives no decoder or heads.
        digest: hash the source's files for the record (the run's first process does; the others need not).

    Returns:
        The record: source, sha256, what was loaded, resampled, left fresh and dropped.

    Raises:
        ConfigError: the source's encoder does not fit ``cfg.model`` (a field named, with the value to set).
    """
    assert cfg.run.init is not None
    path = Path(cfg.run.init)
    m = cfg.model
    src, rest, info, no_rest = _source(path, m.objective, tokenizer)
    s = src.cfg
    for key in MATCHED:
        if getattr(s, key) != getattr(m, key):
            raise ConfigError(
                f"run.init {path}: its encoder has {key} {getattr(s, key)}, this run's model.{key} is "
                f"{getattr(m, key)}; set model.{key}={getattr(s, key)} (only model.img_size may differ)"
            )
    state = src.state_dict()
    old, new = s.grid, m.grid
    if s.pos_embed == "learned" and m.pos_embed == "sincos2d":
        raise ConfigError(
            f"run.init {path}: its encoder learned a position table, which model.pos_embed=sincos2d (fixed 2D "
            "sin-cos, no table) would drop; set model.pos_embed=learned to start from it"
        )
    if s.pos_embed == "sincos2d" and m.pos_embed == "learned":
        # the table starts as the sin-cos values of the run's grid: the same features at step 0, then it learns
        state["pos_embed"] = sincos_2d(new, new, m.width)
        how = f"a learned table initialised to the source's 2D sin-cos at {new}x{new}"
    elif m.pos_embed == "sincos2d":
        how = "2D sin-cos, computed for each input's grid (no table)"
    else:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], new, old)
        how = f"resampled {old}x{old} -> {new}x{new} (bicubic, antialiased)" if old != new else "as is"
    target: nn.Module = model.encoder  # type: ignore[assignment]
    with torch.no_grad():
        target.load_state_dict(state, strict=True)
    loaded, fresh, dropped = [], [], []
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    if not no_rest:
        take = {k: v for k, v in rest.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        model.load_state_dict(take, strict=False)
        loaded = sorted(take)
    fresh = sorted(set(own) - set(loaded))
    dropped = sorted(set(rest) - set(loaded))
    record: dict[str, Any] = {
        "source": str(path),
        "sha256": None, "files": None,
        "source_info": {k: info.get(k) for k in ("format", "run", "step", "config_hash", "objective") if k in info},
        "encoder": {"tensors": len(state), "from_img_size": s.img_size, "img_size": m.img_size,
                    "pos_embed": how},
        "loaded": loaded, "fresh": fresh, "dropped": dropped,
        "not_reused": no_rest or None,
        "optimizer": "fresh", "step": 0,
    }  # fmt: skip
    if digest:
        # a run directory holds many checkpoints: the hash is of the one read (last.ckpt)
        record["sha256"], record["files"] = source_hash(info["source"] if info.get("format") == "run" else path)
    return record


def summary_line(record: dict) -> str:
    """One line for the run's start: where the weights came from and what was left out."""
    enc = record["encoder"]
    rest = f"{len(record['loaded'])} decoder/head tensors loaded" if record["loaded"] else "no decoder or heads"
    why = f" ({record['not_reused']})" if record.get("not_reused") and record["dropped"] else ""
    drop = f", {len(record['dropped'])} source tensors dropped{why}" if record["dropped"] else ""
    fresh = f", {len(record['fresh'])} fresh" if record["fresh"] else ""
    sha = f" (sha256 {record['sha256'][:12]})" if record.get("sha256") else ""
    return (f"aimpre: init from {record['source']}{sha}: encoder at {enc['img_size']} px, pos_embed "
            f"{enc['pos_embed']}; {rest}{fresh}{drop}; optimiser, schedule and step start fresh")  # fmt: skip
