"""Checkpoints that are never half-written, kept to a budget, and taken on preemption signals.

Each checkpoint (a file under DDP, a sharded torch.distributed.checkpoint directory under FSDP) is written to a
hidden temp name and renamed into place once every rank has finished; only then does ``last.ckpt`` (a symlink)
move to it, by an atomic rename. A crash at any point leaves the previous checkpoint and ``last.ckpt`` intact;
leftover temp names are removed at the next start. SIGTERM (Lightning syncs it across ranks) and SIGUSR1 (SLURM's
warning before the time limit) save a checkpoint at the next step boundary, leave a ``PREEMPTED`` marker in the
run directory for the launcher to requeue on (and so that the run is not taken for finished: no summary), and
stop the run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from aimpre.files import symlink, write_text

_STEP = re.compile(r"^step-(\d+)\.ckpt$")
PREEMPTED = "PREEMPTED"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def step_checkpoints(directory: Path) -> list[Path]:
    """``step-N.ckpt`` entries, oldest first."""
    found = [(int(m.group(1)), p) for p in directory.glob("step-*.ckpt") if (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found)]


def point_last(directory: Path, target: Path) -> None:
    """Atomically makes ``directory/last.ckpt`` a relative symlink to ``target``."""
    symlink(target.name, directory / "last.ckpt")


class Checkpointer(pl.Callback):
    """Saves ``step-N.ckpt`` every ``every`` steps, at the end and on preemption; keeps the newest ``keep_last``.

    Args:
        directory: the run's checkpoints directory.
        every: steps between checkpoints.
        keep_last: step checkpoints kept (-1: all); ``last.ckpt``'s target is never removed.
    """

    def __init__(self, directory: Path, every: int, keep_last: int) -> None:
        self.directory, self.every, self.keep_last = Path(directory), every, keep_last
        self.saved_step = -1
        self._usr1 = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob(".*.tmp*"):  # from a run killed while saving
                _remove(leftover)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self._usr1 = True  # acted on at the next step boundary, where all ranks can agree

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved_step = trainer.global_step  # a resumed run's checkpoint exists already

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        usr1 = trainer.strategy.reduce_boolean_decision(self._usr1, all=False) if trainer.world_size > 1 else self._usr1
        preempted = usr1 or trainer.received_sigterm
        in_bad_streak = getattr(pl_module, "bad_steps", 0) > 0  # keep the last checkpoint a good step's
        if step != self.saved_step and ((step % self.every == 0 and not in_bad_streak) or preempted):
            self.save(trainer)
        if preempted:
            if trainer.is_global_zero:  # after the checkpoint: the marker promises a resumable step
                write_text(self.directory.parent / PREEMPTED, f"step {step}\n")
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self.saved_step:
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> Path:
        step = trainer.global_step
        final = self.directory / f"step-{step}.ckpt"
        tmp = self.directory / f".step-{step}.ckpt.tmp"
        if trainer.is_global_zero:
            _remove(tmp)
        trainer.strategy.barrier("aimpre-ckpt-start")
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank writes its part; ends with a barrier
        if trainer.is_global_zero:
            if final.exists():
                _remove(final)
            os.replace(tmp, final)
            point_last(self.directory, final)
            if self.keep_last > 0:
                for old in step_checkpoints(self.directory)[: -self.keep_last]:
                    _remove(old)
        trainer.strategy.barrier("aimpre-ckpt-done")
        self.saved_step = step
        return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint as one dict, whether a file or a sharded (FSDP) directory, which is consolidated here."""
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)
    meta = path / "meta.pt"  # Lightning keeps the non-tensor state (step, loops, ...) beside the shards
    if meta.exists():
        full = {**torch.load(meta, map_location="cpu", weights_only=False), **full}
    return full


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The AIMv2 model's state dict (keys without the LightningModule's ``model.`` prefix)."""
    state = checkpoint.get("state_dict", checkpoint)
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
