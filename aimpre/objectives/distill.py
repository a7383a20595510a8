"""Distillation: a student encoder regresses a frozen teacher encoder's final-layer patch features.

As ml-aim's AIMv2-L distilled from AIMv2-3B (and feature distillation in general: Wei et al. 2022, "Contrastive
Learning Rivals Masked Image Modeling in Fine-tuning via Feature Distillation"): the student's patch tokens go
through a small projection (one bias-free linear, student width -> teacher width) and regress the teacher's
final-layer patch tokens, each normalised (a parameter-free LayerNorm over the width), by ``model.distill_loss``:
``cosine`` (1 - cosine similarity, per patch) or ``smooth_l1``. Two objectives:

- ``distill``: that loss alone; the student trains with full attention, as the teacher runs.
- ``aimv2_distill``: AIMv2's loss plus ``model.distill_weight`` x that loss, from one prefix-attention forward
  of the student (the distillation targets are the teacher's full-attention features: a student token after the
  prefix sees only the tokens before it, so this term asks more of it than pure distillation does).

The teacher (``model.distill_teacher``: anything ``aimpre.export.load_encoder`` reads) is frozen and runs without
gradients in the training precision (under the trainer's autocast; cast to the student's dtype when the student is
cast whole). It is held outside the module tree (``Distiller.teacher`` is a plain attribute), so it is neither in
``parameters()`` (no optimiser state, no FSDP sharding: each rank holds a copy), nor in checkpoints, nor exported.
It sees the student's batch resized to its own resolution; its features are resampled (bilinear, on the patch
grid) to the student's grid, so width, depth and resolution may differ. Its patch size must be the student's.
Its forward FLOPs count in the run's compute (``aimpre.scaling.flops``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aimpre.model.sizes import ModelConfig
from aimpre.model.vit import AIMv2Encoder
from aimpre.objectives.aimv2 import AIMv2Objective
from aimpre.objectives.base import Objective, count

LOSSES = ("cosine", "smooth_l1")
KEY = "model.distill_teacher"


def _teacher_path(cfg: ModelConfig) -> str:
    from aimpre.config import ConfigError  # here: aimpre.config imports aimpre.objectives

    if not cfg.distill_teacher:
        raise ConfigError(
            f"config key '{KEY}': objective {cfg.objective} needs a teacher (a run, checkpoint or export)"
        )
    return cfg.distill_teacher


def _check_teacher(cfg: ModelConfig, teacher: ModelConfig) -> ModelConfig:
    from aimpre.config import ConfigError

    if teacher.patch_size != cfg.patch_size:
        raise ConfigError(
            f"config key '{KEY}': the teacher {cfg.distill_teacher} has patch size {teacher.patch_size}, the student "
            f"model.patch_size {cfg.patch_size}: their patch grids cannot be matched"
        )
    return teacher


@lru_cache(maxsize=8)
def _config_of(path: str) -> ModelConfig:
    p = Path(path)
    run_config = p / "config.yaml" if p.is_dir() else p.parent.parent / "config.yaml" if p.suffix == ".ckpt" else None
    if run_config is not None and run_config.is_file():  # a run: its config alone, no checkpoint read
        from aimpre.config import load_config

        return load_config(run_config).model
    if p.is_dir() and (p / "aimpre.json").is_file():  # our export: its record names the encoder
        from aimpre.files import read_json_object
        from aimpre.formats import encoder_config

        record = read_json_object(p / "aimpre.json", "export record")
        return encoder_config(record.get("encoder"), str(p))  # type: ignore[arg-type]  # it checks the type
    return load_teacher(path)[0].cfg  # anything else: built once (small next to the run that will load it anyway)


def teacher_config(cfg: ModelConfig) -> ModelConfig:
    """The teacher encoder's config (the FLOP count needs it), checked against the student's.

    Args:
        cfg: the student's model config (``model.distill_teacher`` set).
    """
    from aimpre.config import ConfigError

    try:
        teacher = _config_of(_teacher_path(cfg))
    except (OSError, ValueError) as e:  # a missing or broken teacher: the key that names it, then why
        raise ConfigError(f"config key '{KEY}': {e}") from None
    return _check_teacher(cfg, teacher)


def load_teacher(path: str) -> tuple[AIMv2Encoder, tuple[list[float], list[float]] | None]:
    """The frozen teacher encoder (float32, eval mode, no gradients) from anything ``load_encoder`` reads, and the
    (mean, std) its source records for its inputs (None where it records none).

    Args:
        path: a run, checkpoint, export or timm/HF model directory.
    """
    from aimpre.export import load  # here: aimpre.export imports aimpre.objectives' siblings

    with torch.device("cpu"):  # real tensors even when the student is built on the meta device
        loaded = load(path)
    pre = loaded.info.get("preprocessing") or {}
    norm = (list(pre["mean"]), list(pre["std"])) if pre.get("mean") and pre.get("std") else None
    return loaded.encoder.requires_grad_(False).eval(), norm


def normalize(x: Tensor) -> Tensor:
    """Per-token LayerNorm without parameters: the targets' and predictions' scale and offset are not learnt."""
    return F.layer_norm(x, x.shape[-1:])


def feature_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """The distillation loss between projected student tokens and teacher tokens, both [B, N, D], normalised here.

    Args:
        pred: the student's projected patch tokens.
        target: the teacher's patch tokens on the student's grid.
        kind: ``cosine`` (mean of 1 - cosine similarity per patch) or ``smooth_l1`` (beta 1, mean).
    """
    pred, target = normalize(pred.float()), normalize(target.float())
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    return F.smooth_l1_loss(pred, target)


class Distiller(nn.Module):
    """The projection (a parameter) and the teacher (not a submodule: see the module docstring)."""

    teacher: AIMv2Encoder

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        teacher_config(cfg)  # the key named if the teacher is missing, broken or of another patch size
        teacher, self.teacher_norm = load_teacher(_teacher_path(cfg))
        object.__setattr__(self, "teacher", teacher)  # outside the module tree: not saved, trained or exported
        self.renorm: tuple[Tensor, Tensor] | None = None  # student-normalised -> teacher-normalised (set_input_norm)
        self.cfg = cfg
        self.proj = nn.Linear(cfg.width, teacher.cfg.width, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.xavier_uniform_(self.proj.weight)

    def set_input_norm(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """The per-channel mean/std the student's images are normalised with (the trainer's ``data.mean/std``):
        the teacher then sees its images normalised with the mean/std its source records (a released AIMv2 says
        CLIP's, our runs ImageNet's), x_t = (x * std + mean - mean_t) / std_t. A teacher that records none is fed
        the student's normalisation."""
        if self.teacher_norm is None:
            return
        m_s, s_s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        m_t, s_t = (torch.tensor(v).view(1, 3, 1, 1) for v in self.teacher_norm)
        self.renorm = (s_s / s_t, (m_s - m_t) / s_t)

    def targets(self, images: Tensor) -> Tensor:
        """The teacher's final-layer patch tokens [B, N_student, teacher width] for normalised ``images``."""
        t = self.teacher
        dtype = self.proj.weight.dtype
        if next(t.parameters()).device != images.device or next(t.parameters()).dtype != dtype:
            t.to(device=images.device, dtype=dtype)  # follows the student (device, and a whole-model cast)
        size = t.cfg.img_size
        with torch.no_grad():
            x = images.to(dtype)
            if self.renorm is not None:
                scale, shift = (v.to(device=x.device, dtype=dtype) for v in self.renorm)
                x = x * scale + shift
            if x.shape[-1] != size or x.shape[-2] != size:
                # resized in float32: CPU has no antialiased bicubic kernel for bf16 (a bf16-true run would stop here)
                x = F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
                x = x.to(dtype)
            feats = t(x)  # [B, Nt, Dt], full attention
            gs, gt = self.cfg.grid, t.cfg.grid
            if gt != gs:  # resample on the patch grid: [B, Nt, Dt] -> [B, Dt, gt, gt] -> [B, Dt, gs, gs]
                B, _, D = feats.shape
                grid = feats.transpose(1, 2).reshape(B, D, gt, gt)
                feats = F.interpolate(grid.float(), size=(gs, gs), mode="bilinear", align_corners=False)
                feats = feats.flatten(2).transpose(1, 2)  # [B, gs * gs, Dt]
        return feats

    def forward(self, tokens: Tensor, images: Tensor) -> Tensor:
        """The distillation loss of the student's ``tokens`` [B, N, width] on ``images``."""
        return feature_loss(self.proj(tokens), self.targets(images), self.cfg.distill_loss)


class Distill(Objective):
    """``distill``: the student encoder and the projection; loss = the distillation loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = AIMv2Encoder(cfg)
        self.distill = Distiller(cfg)

    def init_weights(self) -> None:
        self.encoder.init_weights()
        self.distill.init_weights()

    def param_counts(self) -> dict[str, int]:
        parts = {"encoder": count(self.encoder), "heads": count(self.distill)}
        return {**parts, "total": sum(parts.values())}

    def forward(self, images: Tensor, batch: dict[str, Any], prefix_len: Tensor | None) -> dict[str, Tensor]:
        loss = self.distill(self.encoder(images), images)
        return {"loss": self.cfg.distill_weight * loss, "loss_distill": loss}


class AIMv2Distill(AIMv2Objective):
    """``aimv2_distill``: AIMv2 (the same parameter names) plus ``distill``; loss = AIMv2's + weight x distillation.
    MoE encoder blocks are not offered here (the config refuses them)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.distill = Distiller(cfg)

    def init_weights(self) -> None:
        super().init_weights()
        self.distill.init_weights()

    def param_counts(self) -> dict[str, int]:
        parts = super().param_counts()
        parts["heads"] += count(self.distill)
        parts["total"] += count(self.distill)
        return parts

    def forward(  # type: ignore[override]  # the batch instead of text and mask, as every objective
        self, images: Tensor, batch: dict[str, Any], prefix_len: Tensor | None
    ) -> dict[str, Tensor]:
        if prefix_len is None:
            raise ValueError("aimv2_distill trains with prefix attention: prefix_len is required")
        tokens = self.encoder(images, prefix_len)  # [B, N, width]
        out = self.losses(tokens, images, batch["text"], batch["text_mask"], prefix_len, batch.get("grid"))
        out["loss_distill"] = self.distill(tokens, images)
        out["loss"] = out["loss"] + self.cfg.distill_weight * out["loss_distill"]
        return out
