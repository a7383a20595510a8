"""AdamW with AIMv2's decoupled weight decay, and the warmup + cosine (or constant, or constant + cooldown) schedule.

AIMv2 (ml-l3m ``AdamLH``) decays p <- p * (1 - wd * lr_t / lr_peak) with wd = 1e-4. torch's AdamW decays
p <- p * (1 - lr_t * wd'), so wd' = wd / lr_peak gives the same update. Biases, norms, scalars (CLIP's and
SigLIP's temperature and bias), position tables, the start token and learned pooling queries are not decayed
(ml-l3m ``wd_exclude``; big_vision decays only kernels): only weight matrices and the token-embedding tables
(decayed in ml-l3m and open_clip) are. tests/test_eval_fixes.py lists what every objective decays.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from aimpre.config import OptimConfig

# parameters of 2 or more dimensions that are not decayed, by the last part of their name: the encoder's and the
# decoder's position tables, the text tower's (``text_tower.pos``), the decoder's start token, and the learned
# query of MAP pooling (a learned input, like a CLS token)
NO_DECAY_NAMES = frozenset({"pos_embed", "text_pos", "pos", "start_token", "query"})


def decays(name: str, p: nn.Parameter) -> bool:
    """Whether the parameter ``name`` (as ``named_parameters`` gives it) gets weight decay."""
    return p.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def param_groups(model: nn.Module) -> list[dict]:
    """The trainable parameters in two AdamW groups: decayed (``decays``) and not (``weight_decay`` 0).

    Args:
        model: the module whose parameters the optimiser steps.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "weight_decay": 0.0, "decay": False}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay / cfg.lr,
        fused=fused or None,
    )


def lr_factor(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``s`` (0-based): linear warmup, then cosine to min_lr or flat.

    With ``cooldown_steps`` K > 0 the constant schedule decays linearly over its last K steps, from 1 at step
    ``total_steps - K`` to the floor at the last step. Step ``total_steps - K`` still trains at the peak lr, so a
    cooldown branch resumed from the constant trunk's checkpoint at that step (whose optimiser holds the peak lr)
    follows this schedule exactly from its first step.
    """
    floor = cfg.min_lr / cfg.lr
    cool_start = total_steps - cfg.cooldown_steps

    def factor(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            if cfg.cooldown_steps and s > cool_start:
                return 1.0 - (1.0 - floor) * min(1.0, (s - cool_start) / (cfg.cooldown_steps - 1))
            return 1.0
        progress = min(1.0, (s - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
