"""Callbacks and plugins: atomic checkpoints, the metrics rows (throughput, MFU, skips) sent to the chosen loggers
(``metrics.csv`` always), the progress bar and the plain text log.

Names. ``metrics.csv`` keeps the flat COLUMNS (``aimpre.scaling`` and the summary read them). TensorBoard and W&B get
the same values under grouped names (NAMES), one panel section per group as Lightning users know it:
``train/`` the train losses (``train/loss``, ``train/loss_image``, ``train/loss_text``), ``val/`` the validation
losses, ``optim/`` ``lr``, ``grad_norm`` and the NaN guard's ``skipped_steps``, ``perf/`` ``img_per_s``,
``img_per_s_device``, ``tflops``, ``mfu``, ``step_time`` and ``data_time``, ``data/skipped`` the bad samples skipped,
and ``progress/`` the global ``samples`` and ``flops`` (x-axes for comparing runs). An encoder with MoE blocks adds
each expert's share of the routed tokens per block, averaged over the logging interval and the ranks: ``moe.csv``
in the run directory (``step, block, expert, share``: one row per block and expert, any number of either) and
``moe/block{b}_expert{e}`` in TensorBoard and W&B (metrics.csv's columns stay fixed).

Resumes. A resume restores step N from a checkpoint, and whatever the killed process logged after step N is not the
run's history any more: ``metrics.csv`` keeps its rows up to N; TensorBoard's new event file starts with the session
start of ``purge_step=N+1``, so TensorBoard drops the old events at steps > N when it reads the directory (one point
per step, in order); ``out.log``, a human log, is not rewritten but gets a line ``resumed at step N (from checkpoint
...)`` after which the steps > N are logged again. W&B cannot drop logged points: the resumed process continues the
same W&B run id (``resume="allow"``; offline, each process writes its own directory under that id: sync them in
order) and logs our step as W&B's step, so the run's steps never go back; W&B keeps the points the killed process
logged after N and drops (with a warning) the resumed process's points at those steps."""

from __future__ import annotations

import csv
import datetime
import importlib.util
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from aimpre.config import ConfigError
from aimpre.files import atomic_path, open_in_run
from aimpre.model.moe import MoEFeedForward
from aimpre.train.checkpoint import load_torch_file

COLUMNS = (
    "step", "samples", "flops", "loss", "loss_image", "loss_text", "val_loss", "val_loss_image", "val_loss_text",
    "lr", "grad_norm", "img_per_s", "img_per_s_device", "tflops", "mfu", "data_time", "step_time", "skipped",
    "skipped_steps", "loss_balance", "loss_distill", "val_loss_distill",
)  # fmt: skip
# the columns an objective's parts fill; the parts it lacks stay blank (loss_balance: MoE encoders, training only;
# loss_distill: the distilled objectives, the unweighted distillation loss)
LOSSES = ("loss", "loss_image", "loss_text", "loss_balance", "loss_distill")
# the TensorBoard and W&B name of each column (see the module docstring)
NAMES = {
    "samples": "progress/samples", "flops": "progress/flops",
    **{k: f"train/{k}" for k in LOSSES}, **{f"val_{k}": f"val/{k}" for k in LOSSES},
    "lr": "optim/lr", "grad_norm": "optim/grad_norm", "skipped_steps": "optim/skipped_steps",
    **{k: f"perf/{k}" for k in ("img_per_s", "img_per_s_device", "tflops", "mfu", "data_time", "step_time")},
    "skipped": "data/skipped",
}  # fmt: skip

# Lightning's get_available_flops misses or misreads some chips we train on: a plain "NVIDIA H200" or "GH200" name
# (it knows only the "H200 SXM1"/"NVL1" spellings) gives None, and "L40S" is read as an L4. Dense bf16/fp16 FLOP/s.
_PEAK_FLOPS_16BIT = {"GH200": 989e12, "H200": 989e12, "L40S": 362e12}


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak FLOP/s of one device at ``dtype`` (for MFU); None off CUDA or for an unknown chip."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    ours = next((v for k, v in _PEAK_FLOPS_16BIT.items() if k in name), None)
    if ours is not None:
        return ours if dtype in (torch.bfloat16, torch.float16) else None
    return get_available_flops(device, dtype)


# trainer.loggers name -> (the modules any one of which it needs, the pip command that installs it)
LOGGERS = {
    "csv": ((), ""),
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'aimpre[tensorboard]'"),
    "wandb": (("wandb",), "pip install 'aimpre[wandb]'"),
}


def build_loggers(names: list[str], run_dir: Path, run_name: str) -> list[Logger]:
    """The Lightning loggers of ``trainer.loggers`` (metrics.csv always), all writing inside the run directory.

    Args:
        names: the ``trainer.loggers`` list (csv, tensorboard, wandb).
        run_dir: the run directory.
        run_name: the run's name, also its W&B id.
    """
    loggers: list[Logger] = []
    for name in dict.fromkeys(["csv", *names]):  # CSV first, each once
        modules, pip = LOGGERS[name]
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            raise ConfigError(f"config key 'trainer.loggers': {name!r} needs a package that is not installed: {pip}")
        if name == "csv":
            loggers.append(RunCSVLogger(run_dir))
        elif name == "tensorboard":
            loggers.append(_TensorBoardRun(run_dir, name="tensorboard", version="", default_hp_metric=False))
        else:
            # offline unless WANDB_MODE says otherwise: no network at run time; `wandb sync RUN/wandb/offline-*`
            # uploads later. The run name is the W&B id, so a resumed run continues the same W&B run.
            mode, project = os.environ.get("WANDB_MODE", "offline"), os.environ.get("WANDB_PROJECT", "aimpre")
            run_id = re.sub(r"[^\w.-]", "-", run_name)  # W&B refuses ids with / # ? % : and the like
            loggers.append(
                _WandbRun(name=run_name, save_dir=run_dir, id=run_id, project=project, mode=mode, resume="allow")
            )
    return loggers


def viewer_hint(logger: Logger) -> str | None:
    """The command that shows what ``logger`` wrote (TensorBoard, W&B offline), or None for metrics.csv."""
    if isinstance(logger, TensorBoardLogger):
        return f"view the curves: tensorboard --logdir {logger.log_dir}"
    if isinstance(logger, WandbLogger) and os.environ.get("WANDB_MODE", "offline") == "offline":
        return f"upload the W&B run: wandb sync {logger.save_dir}/wandb/offline-run-*"
    return None


class _TensorBoardRun(TensorBoardLogger):
    """Lightning's TensorBoardLogger, whose event file drops what a killed process logged after the resumed step."""

    def resume_at(self, step: int) -> None:
        """Writes the session start that ``SummaryWriter(purge_step=step + 1)`` writes: reading the directory,
        TensorBoard drops the events before it at steps after ``step`` (those of a process that was killed).

        Lightning opens the writer in its setup, before a resume has restored the step, so the purge cannot be a
        writer argument; this event is the same record, written once the step is known."""
        try:  # the writer Lightning picked: TensorBoard's own when installed, else tensorboardX (same protobuf)
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        except ImportError:
            from tensorboardX.proto.event_pb2 import Event, SessionLog
        start = Event(step=step + 1, session_log=SessionLog(status=SessionLog.START))
        self.experiment._get_file_writer().add_event(start)


class _WandbRun(WandbLogger):
    """Lightning's WandbLogger, closing its W&B run at the end of fit: Lightning leaves it open, and the next
    WandbLogger in this process (a second ``train()``) would join the old run instead of starting its own."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        # W&B's own step is the training step, not a count of log calls that starts at 0 in every process: a
        # resumed process (or its offline directory, synced after the first) goes on from the run's last step instead
        # of going back, which W&B refuses; steps W&B already has are dropped by it with a warning
        if step is None:
            super().log_metrics(metrics)
        else:
            self.experiment.log({**metrics, "trainer/global_step": step}, step=step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)


class _RunCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, changed where it falls short for runs that are killed and resumed: it deletes
    ``metrics.csv`` in a non-empty directory (every resume would lose the history), buffers rows (a SIGKILL loses
    them) and sorts and re-derives its columns. This one appends each row under the fixed COLUMNS at once."""

    def _check_log_dir_exists(self) -> None:
        pass  # keep metrics.csv: a resume keeps the rows up to its restored step (keep_until)

    def log_hparams(self, params: dict[str, Any]) -> None:
        pass  # config.yaml in the run directory holds them

    def save(self) -> None:
        if not self.metrics:
            return
        new = not os.path.isfile(self.metrics_file_path)
        with open_in_run(self.metrics_file_path, "a") as f:  # a symlink planted as metrics.csv is not followed
            w = csv.DictWriter(f, COLUMNS)
            if new:
                w.writeheader()
            w.writerows(self.metrics)
        self.metrics = []

    def keep_until(self, step: int) -> None:
        """Starts metrics.csv afresh, or after a resume keeps the rows up to the restored ``step``, under the current
        COLUMNS (``keep_rows_until``)."""
        keep_rows_until(Path(self.metrics_file_path), COLUMNS, step)


# moe.csv: each MoE block's expert shares, one row per (block, expert) per logging step (MetricsCSV._shares)
MOE_COLUMNS = ("step", "block", "expert", "share")


def keep_rows_until(path: Path, columns: tuple[str, ...], step: int) -> None:
    """Rewrites the CSV file ``path`` under ``columns`` (the current header: a file written by an older version
    with fewer columns gets the new ones, blank) with its rows up to ``step`` (none for a fresh run).

    The file is read back whatever a kill or a hand left in it: csv's 131,072-character field limit is lifted
    to the file's size (a longer field cannot be in it), and a field that is not a number (none of ours is
    longer than ``_MAX_NUMBER`` characters) is blanked, a row without a step dropped, so the rewritten file
    holds our short numeric fields only and reads back under the default limit everywhere else.

    Args:
        path: metrics.csv or moe.csv.
        columns: the header to write.
        step: the restored step (0 for a fresh run).
    """
    keep = []
    if os.path.isfile(path):
        limit = csv.field_size_limit()
        csv.field_size_limit(max(limit, os.path.getsize(path)))
        try:
            with open_in_run(path, "r") as f:  # a symlink planted in the run directory is not followed
                for r in csv.DictReader(f):
                    row = {k: _number(r.get(k)) for k in columns}
                    if re.fullmatch(r"[0-9]+", row["step"]) and int(row["step"]) <= step:
                        keep.append(row)
        finally:
            csv.field_size_limit(limit)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(keep)


_MAX_NUMBER = 64  # characters: the longest number we write is a float's repr, about 25


def _number(value: str | None) -> str:
    """``value`` if it is a finite-length number as we write them (may be nan or inf), else an empty field."""
    if not value or len(value) > _MAX_NUMBER:
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return value


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing ``metrics.csv`` into the run directory itself, a row at a time."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir, name="", version="", flush_logs_every_n_steps=1)

    @property
    @rank_zero_experiment
    def experiment(self) -> _RunCSVWriter:
        if self._experiment is None:
            self._experiment = _RunCSVWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]


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


MIN_BAR_COLUMNS = 20  # narrower, tqdm draws nothing (0 or 1 column: its width is the terminal's minus one) or mush


def wants_bar(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal wide enough for the progress bar; else training prints plain text lines.

    Args:
        stream: where the bar would draw (sys.stdout).
    """
    if not stream.isatty():
        return False
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):  # a terminal-like stream without a descriptor: the COLUMNS variable or 80
        columns = shutil.get_terminal_size().columns
    return columns >= MIN_BAR_COLUMNS


class StepProgressBar(TQDMProgressBar):
    """The train stream is endless: show progress against max_steps instead of an unknown epoch length, with the
    loss, the learning rate and the img/s of the last metrics row."""

    def __init__(self, metrics: MetricsCSV) -> None:
        super().__init__()
        self.metrics = metrics

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
        if trainer.optimizers:
            metrics["lr"] = f"{trainer.optimizers[0].param_groups[0]['lr']:.2e}"
        if "img_per_s" in self.metrics.last_row:
            metrics["img/s"] = f"{self.metrics.last_row['img_per_s']:.1f}"
        return metrics


def _host(x: Any) -> Any:
    """A device scalar read back as a float (a host sync: logging steps only); anything else as it is."""
    return float(x) if isinstance(x, torch.Tensor) else x


class MetricsCSV(pl.Callback):
    """The rows of ``metrics.csv``, sent to every logger: one after the first step and every ``log_every`` steps,
    and one after each validation. Losses are means over the interval and over ranks; ``samples`` and ``flops`` are
    global. Each train row is also a plain text line appended to ``text_log`` and, if ``echo``, printed (for logs
    that are files, where a progress bar is carriage-return soup).

    Throughput and MFU are measured here, not by Lightning's ThroughputMonitor: it counts rank 0's batches times the
    world size, needs the FLOPs per batch as a module attribute (ours come from aimpre.scaling.flops_per_sample),
    logs under its own names at Lightning's cadence rather than in these rows, and synchronises CUDA every batch.

    Native resolution (``count_batches``): every batch has its own images and patches per image, so ``samples``,
    ``flops``, ``img_per_s``, ``tflops`` and ``mfu`` add up each batch's own count and FLOPs at its own T (all ranks
    run the same shape at a step, so a rank's count times the world size is the global one), and the text line adds
    ``tok/s``; the running totals travel in checkpoints (this callback's state).

    ``mfu`` is the achieved FLOP/s over the chip's dense peak in the dtype of the matmuls' precision (bf16 for
    bf16-mixed), and over the bf16 peak for ``trainer.precision=fp8`` too (Lightning runs it as bf16-mixed): the
    float8 GEMMs count against the bf16 peak, not float8's twice-higher one, so MFU compares precisions directly.
    """

    def __init__(
        self, log_every: int, samples_per_step: int, flops_per_sample: float, text_log: Path, echo: bool = False
    ) -> None:
        self.log_every, self.text_log, self.echo = log_every, text_log, echo
        self.samples_per_step, self.flops_per_sample = samples_per_step, flops_per_sample
        self.sums: dict[str, Any] = defaultdict(float)  # loss -> its sum over the interval, a device tensor
        self.share_sum: torch.Tensor | None = None  # MoE: expert shares [blocks, experts] summed over the interval
        self.moe_blocks: list[int] = []  # the encoder block index of each row of expert_share
        self.moe_csv: Path | None = None
        self.count = 0
        self.data_state: dict[int, dict[str, Any]] = {}  # latest state (running counts) per data worker
        self.data_totals: dict[str, Any] = {}  # summed over workers and ranks at the end of training
        self.data_time = 0.0
        self.t_batch_end: float | None = None
        self.t_row: float | None = None
        self.steps_in_row = 0
        self.last_step = -1
        self.last_row: dict[str, Any] = {}  # the latest train row, for the progress bar
        self.t_start, self.start_step = 0.0, 0
        self.peak: float | None = None
        self.tok_s = 0.0  # native: tokens per second of the latest train row
        # native batches (count_batches): per-sample FLOPs at T patches, the patch side, and running sums
        self.flops_at: Callable[[int], float] | None = None
        self.patch = 0
        self.totals: dict[str, Any] = {"samples": 0, "flops": 0.0, "tokens": 0}  # the whole run's, over all ranks
        self.in_row: dict[str, Any] = {"samples": 0, "flops": 0.0, "tokens": 0}  # since the last train row

    def count_batches(self, flops_at: Callable[[int], float], patch: int) -> None:
        """Counts samples, tokens and FLOPs batch by batch (native resolution) instead of steps x a fixed batch.

        Args:
            flops_at: training FLOPs of one sample whose image has T patches (``scaling.flops_per_sample``).
            patch: patch side in pixels, to read T off a batch's images.
        """
        cache: dict[int, float] = {}
        self.flops_at = lambda t: cache[t] if t in cache else cache.setdefault(t, flops_at(t))
        self.patch = patch

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals)} if self.flops_at is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals.update(state_dict.get("totals", {}))

    def _add_batch(self, trainer: pl.Trainer, batch: Any) -> None:
        assert self.flops_at is not None
        n, _, h, w = batch["image"].shape
        n *= trainer.world_size
        t = (h // self.patch) * (w // self.patch)
        for sums in (self.totals, self.in_row):
            sums["samples"] += n
            sums["tokens"] += n * t
            sums["flops"] += n * self.flops_at(t)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after a resume's restore, so global_step is the restored step
        step = trainer.global_step
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, RunCSVLogger):
                    logger.experiment.keep_until(step)
                elif isinstance(logger, _TensorBoardRun):
                    logger.resume_at(step)
                hint = viewer_hint(logger)
                if hint:
                    print(f"aimpre: {hint}", flush=True)
            if trainer.ckpt_path:  # out.log is for people: marked, not rewritten (metrics.csv holds the history)
                self._log_line(
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')} resumed at step {step} (from checkpoint "
                    f"{trainer.ckpt_path}); lines above for steps after {step} are from the process that stopped"
                )
        encoder = getattr(getattr(pl_module, "model", None), "encoder", None)
        self.moe_blocks = [i for i, b in enumerate(getattr(encoder, "blocks", [])) if isinstance(b.mlp, MoEFeedForward)]
        if self.moe_blocks and trainer.is_global_zero:
            self.moe_csv = self.text_log.parent / "moe.csv"
            keep_rows_until(self.moe_csv, MOE_COLUMNS, step)
        self.last_step = self.start_step = step
        self.t_start = time.perf_counter()
        self.data_state = dict(getattr(pl_module, "loader_state", {}))  # resumed counts
        # MFU against the peak of the dtype the matmuls run in (Lightning's mapping, as its ThroughputMonitor);
        # bf16's for trainer.precision=fp8, whose precision plugin is bf16-mixed
        self.peak = peak_flops(pl_module.device, _plugin_to_compute_dtype(trainer.precision_plugin))

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
            if k in outputs:  # the objective's parts (aimv2: all three; aimv1: loss, loss_image; others: loss)
                # summed on the device, read back only on logging steps: float() here waited for the GPU every step
                self.sums[k] = self.sums[k] + outputs[k].detach().float()
        if "expert_share" in outputs:  # [MoE blocks, experts], summed on the device as the losses
            self.share_sum = outputs["expert_share"].detach().float() + (
                self.share_sum if self.share_sum is not None else 0
            )
        self.count += 1
        if self.flops_at is not None:
            self._add_batch(trainer, batch)
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

    def _reduce(self, trainer: pl.Trainer, values: list[Any], op: str = "mean") -> list[float]:
        device = trainer.strategy.root_device
        t = torch.stack([torch.as_tensor(v).to(device, torch.float64) for v in values])  # floats or device sums
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
        parts = [k for k in LOSSES if k in self.sums]  # the same on every rank: one objective
        losses = dict(zip(parts, self._reduce(trainer, [self.sums[k] / self.count for k in parts]), strict=True))
        (skipped,) = self._reduce(trainer, [float(sum(self._counts("skipped").values()))], "sum")
        step = trainer.global_step
        samples, flops = self.progress_at(step)
        if self.flops_at is None:
            img_s = self.steps_in_row * self.samples_per_step / max(elapsed, 1e-9)
            flops_s = img_s * self.flops_per_sample
        else:  # this interval's own samples and FLOPs
            img_s, flops_s = self.in_row["samples"] / max(elapsed, 1e-9), self.in_row["flops"] / max(elapsed, 1e-9)
            self.tok_s = self.in_row["tokens"] / max(elapsed, 1e-9)
            self.in_row = {"samples": 0, "flops": 0.0, "tokens": 0}
        peak = self.peak
        row = {
            "step": step,
            "samples": samples,
            "flops": flops,
            **{k: losses.get(k, "") for k in LOSSES},
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "grad_norm": _host(getattr(pl_module, "grad_norm", "")),  # kept on the device between rows
            "img_per_s": img_s,
            "img_per_s_device": img_s / trainer.world_size,
            "tflops": flops_s / 1e12,  # achieved, all devices together
            "mfu": flops_s / (peak * trainer.world_size) if peak else "",
            "data_time": self.data_time / max(self.count, 1),
            "step_time": elapsed / max(self.steps_in_row, 1),
            "skipped": int(skipped),
            "skipped_steps": getattr(pl_module, "skipped_steps", 0),
        }
        shares = self._shares(trainer)
        self._write(trainer, row, shares)
        self.sums.clear()
        self.share_sum = None
        self.count, self.data_time, self.steps_in_row, self.t_row = 0, 0.0, 0, None

    def progress_at(self, step: int) -> tuple[int, float]:
        """The run's (samples, FLOPs) by ``step``."""
        if self.flops_at is None:
            return step * self.samples_per_step, step * self.samples_per_step * self.flops_per_sample
        return int(self.totals["samples"]), float(self.totals["flops"])

    def _shares(self, trainer: pl.Trainer) -> dict[tuple[int, int], float]:
        """(block, expert) -> share of the routed tokens, the interval's mean over steps and ranks (read back here,
        on a logging step); empty for a dense encoder."""
        if self.share_sum is None:
            return {}
        mean = trainer.strategy.reduce(self.share_sum / self.count, reduce_op="mean").tolist()
        return {(b, e): v for b, row in zip(self.moe_blocks, mean, strict=True) for e, v in enumerate(row)}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        step = trainer.global_step
        samples, flops = self.progress_at(step)
        row: dict[str, Any] = {"step": step, "samples": samples, "flops": flops}
        for k in LOSSES:
            if f"val_{k}" in trainer.callback_metrics:
                row[f"val_{k}"] = float(trainer.callback_metrics[f"val_{k}"])
        self._write(trainer, row)

    def _write(
        self, trainer: pl.Trainer, row: dict[str, Any], shares: dict[tuple[int, int], float] | None = None
    ) -> None:
        """Sends ``row`` to every logger (an empty value is left out: a blank in metrics.csv) and writes its line;
        the MoE expert ``shares`` go to moe.csv and, as ``moe/`` points, to the other loggers."""
        if not trainer.is_global_zero:
            return
        step = row.pop("step")
        if shares and self.moe_csv is not None:
            new = not self.moe_csv.is_file()
            with open_in_run(self.moe_csv, "a") as f:  # no writes through a link in a run directory
                w = csv.writer(f)
                if new:
                    w.writerow(MOE_COLUMNS)
                w.writerows((step, b, e, v) for (b, e), v in shares.items())
            moe_points = {f"moe/block{b}_expert{e}": v for (b, e), v in shares.items()}
            for logger in trainer.loggers:
                if not isinstance(logger, RunCSVLogger):
                    logger.log_metrics(moe_points, step=step)
        values = {k: v for k, v in row.items() if v != ""}
        # a validation row repeats its step's samples and flops for metrics.csv; a second point at that step would
        # be a duplicate in TensorBoard and W&B
        progress = "loss" in row
        grouped = {NAMES[k]: v for k, v in values.items() if progress or not NAMES[k].startswith("progress/")}
        for logger in trainer.loggers:
            logger.log_metrics(values if isinstance(logger, RunCSVLogger) else grouped, step=step)
        if "loss" in row:
            self.last_row = values
        self._text_line(trainer, step, values)

    def _text_line(self, trainer: pl.Trainer, step: int, row: dict[str, Any]) -> None:
        """``2026-12-01 00:52:07 step 20/300 loss 5.1028 loss_image 0.9870 loss_text 4.1158 lr 2.00e-04 img/s 41.3
        eta 0:02:31`` (ETA from this process's mean step time), or ``... step 100/300 val loss 4.9 ...``."""
        head = f"{time.strftime('%Y-%m-%d %H:%M:%S')} step {step}/{trainer.max_steps}"
        if "loss" in row:
            per_step = (time.perf_counter() - self.t_start) / max(step - self.start_step, 1)
            eta = datetime.timedelta(seconds=round(per_step * max(trainer.max_steps - step, 0)))
            losses = " ".join(f"{k} {row[k]:.4f}" for k in LOSSES if k in row)
            tok = f" tok/s {self.tok_s:.0f}" if self.flops_at is not None else ""
            line = f"{head} {losses} lr {row['lr']:.2e} img/s {row['img_per_s']:.1f}{tok} eta {eta}"
        else:
            line = f"{head} val " + " ".join(f"{k} {row['val_' + k]:.4f}" for k in LOSSES if "val_" + k in row)
        self._log_line(line)

    def _log_line(self, line: str) -> None:
        with open_in_run(self.text_log, "a") as f:  # a symlink planted as out.log is not followed
            f.write(line + "\n")
        if self.echo:
            print(line, flush=True)
