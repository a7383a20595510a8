"""Callbacks and plugins: atomic checkpoints, the metrics CSV (throughput, MFU, skips), the progress bar."""

from __future__ import annotations

import csv
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import TQDMProgressBar

from aimpre.files import atomic_path
from aimpre.train.checkpoint import load_torch_file

COLUMNS = (
    "step", "samples", "flops", "loss", "loss_image", "loss_text", "val_loss", "val_loss_image", "val_loss_text",
    "lr", "grad_norm", "img_per_s", "img_per_s_device", "tflops", "mfu", "data_time", "step_time", "skipped",
    "skipped_steps",
)  # fmt: skip
LOSSES = ("loss", "loss_image", "loss_text")

# Dense bf16 peak FLOP/s per device, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temp file beside it, fsyncs, then renames: a crash leaves the old one intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """``--resume`` reads through here: tensors and plain containers only, whatever Lightning asks for."""
        if Path(path).is_dir():  # only the FSDP strategy reads sharded checkpoints, through its own reader
            raise ValueError(f"{path} is a sharded (FSDP) checkpoint: resume it with trainer.strategy=fsdp")
        checkpoint = load_torch_file(Path(path))
        if not isinstance(checkpoint, dict):
            raise ValueError(f"{path}: holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
        return checkpoint


class StepProgressBar(TQDMProgressBar):
    """The train stream is endless: show progress against max_steps instead of an unknown epoch length."""

    @property
    def total_train_batches(self) -> int | float:
        t = self.trainer
        return min(t.num_training_batches, t.max_steps * t.accumulate_grad_batches)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("train")

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class MetricsCSV(pl.Callback):
    """Appends a row to ``metrics.csv`` after the first step and every ``log_every`` steps, and after each
    validation. Losses are means over the interval and over ranks; ``samples`` and ``flops`` are global."""

    def __init__(self, path: Path, log_every: int, samples_per_step: int, flops_per_sample: float) -> None:
        self.path, self.log_every = path, log_every
        self.samples_per_step, self.flops_per_sample = samples_per_step, flops_per_sample
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0
        self.data_state: dict[int, dict[str, Any]] = {}  # latest state (running counts) per data worker
        self.data_totals: dict[str, Any] = {}  # summed over workers and ranks at the end of training
        self.data_time = 0.0
        self.t_batch_end: float | None = None
        self.t_row: float | None = None
        self.steps_in_row = 0
        self.last_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after a resume's restore, so global_step is the restored step
        if trainer.is_global_zero:
            keep = []
            if self.path.exists():  # resumed: keep the rows up to the restored step
                with open(self.path) as f:
                    keep = [r for r in csv.DictReader(f) if int(r["step"]) <= trainer.global_step]
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, COLUMNS)
                w.writeheader()
                w.writerows(keep)
        self.last_step = trainer.global_step
        self.data_state = dict(getattr(pl_module, "loader_state", {}))  # resumed counts

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        now = time.perf_counter()
        if self.t_batch_end is not None:
            self.data_time += now - self.t_batch_end
        if self.t_row is None:
            self.t_row = now

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        for k in LOSSES:
            self.sums[k] += float(outputs[k].detach())
        self.count += 1
        if "state" in batch:  # batches from our stream carry their reader's counters
            self.data_state[batch["worker"]] = batch["state"]
        self.t_batch_end = time.perf_counter()
        step = trainer.global_step
        if step == self.last_step:  # gradient accumulation: not a step boundary yet
            return
        self.steps_in_row += step - self.last_step
        self.last_step = step
        if step == 1 or step % self.log_every == 0:
            self._train_row(trainer, pl_module)

    def _reduce(self, trainer: pl.Trainer, values: list[float], op: str = "mean") -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
        return trainer.strategy.reduce(t, reduce_op=op).tolist()

    def _counts(self, field: str) -> dict[str, int]:
        total: dict[str, int] = defaultdict(int)
        for state in self.data_state.values():
            for k, v in state.get(field, {}).items():
                total[k] += v
        return dict(total)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Sums the data counters of every worker on every rank (a collective: all ranks call it)."""
        mine = {
            "skipped": self._counts("skipped"),
            "read_errors": self._counts("errors"),
            "truncated_captions": sum(s.get("truncated", 0) for s in self.data_state.values()),
            "repeated_samples": sum(s.get("repeated", 0) for s in self.data_state.values()),
        }
        parts = [mine]
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            parts = [{} for _ in range(trainer.world_size)]
            dist.all_gather_object(parts, mine)
        totals: dict[str, Any] = {"skipped": defaultdict(int), "read_errors": defaultdict(int)}
        for part in parts:
            for k in ("skipped", "read_errors"):
                for reason, n in part[k].items():
                    totals[k][reason] += n
            for k in ("truncated_captions", "repeated_samples"):
                totals[k] = totals.get(k, 0) + part[k]
        self.data_totals = {k: dict(v) if isinstance(v, dict) else v for k, v in totals.items()}

    def _train_row(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = time.perf_counter() - (self.t_row or time.perf_counter())
        losses = self._reduce(trainer, [self.sums[k] / self.count for k in LOSSES])
        (skipped,) = self._reduce(trainer, [float(sum(self._counts("skipped").values()))], "sum")
        step = trainer.global_step
        img_s = self.steps_in_row * self.samples_per_step / max(elapsed, 1e-9)
        peak = peak_flops(pl_module.device)
        row = {
            "step": step,
            "samples": step * self.samples_per_step,
            "flops": step * self.samples_per_step * self.flops_per_sample,
            **dict(zip(LOSSES, losses, strict=True)),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "grad_norm": getattr(pl_module, "grad_norm", ""),
            "img_per_s": img_s,
            "img_per_s_device": img_s / trainer.world_size,
            "tflops": img_s * self.flops_per_sample / 1e12,  # achieved, all devices together
            "mfu": img_s * self.flops_per_sample / (peak * trainer.world_size) if peak else "",
            "data_time": self.data_time / max(self.count, 1),
            "step_time": elapsed / max(self.steps_in_row, 1),
            "skipped": int(skipped),
            "skipped_steps": getattr(pl_module, "skipped_steps", 0),
        }
        self._write(trainer, row)
        self.sums.clear()
        self.count, self.data_time, self.steps_in_row, self.t_row = 0, 0.0, 0, None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        step = trainer.global_step
        row: dict[str, Any] = {"step": step, "samples": step * self.samples_per_step}
        row["flops"] = row["samples"] * self.flops_per_sample
        for k in LOSSES:
            row[f"val_{k}"] = float(trainer.callback_metrics[f"val_{k}"])
        self._write(trainer, row)

    def _write(self, trainer: pl.Trainer, row: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, COLUMNS).writerow(row)
