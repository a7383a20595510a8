"""One pretraining run: resolve the config, set up the run directory and the Trainer, fit, summarise.

Run directory (``run.out_dir/run.name``): ``config.yaml`` (resolved), ``checkpoints/`` (``last.ckpt`` and
``step-N.ckpt``, atomic), ``metrics.csv``, ``out.log`` (a text line every ``trainer.log_every`` steps),
``summary.json`` (what the scaling module reads; written only when a training process ends at
``trainer.max_steps``, never for a run that stopped early and left ``PREEMPTED``), ``.lock``, which one live
training process holds at a time, and ``tensorboard/`` and ``wandb/`` if ``trainer.loggers`` has them.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import itertools
import json
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from aimpre.config import (
    Config,
    ConfigError,
    config_hash,
    dump_config,
    load_yaml,
    model_size_problem,
    short,
    to_dict,
    validation_line,
)
from aimpre.data import HFTokenizer, Tokenizer, build_tokenizer
from aimpre.files import check_run_dir, open_fd_in_run, read_json, regular_file, write_text
from aimpre.objectives import uses_prefix
from aimpre.scaling import flops_per_sample
from aimpre.signals import StopSignals
from aimpre.train.baselines import baselines
from aimpre.train.callbacks import LOSSES, AtomicCheckpointIO, MetricsCSV, StepProgressBar, build_loggers, wants_bar
from aimpre.train.checkpoint import PREEMPTED, Checkpointer, marker_text
from aimpre.train.module import AIMv2DataModule, AIMv2Module, _seed
from aimpre.train.parallel import check_fp8


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning on torch >= 2.10


def resolve(cfg: Config, tokenizer: Tokenizer) -> Config:
    """Fills what the config leaves to the environment: the vocabulary size and the run name."""
    vocab = cfg.model.vocab_size
    if vocab is None:
        vocab = tokenizer.vocab_size
    elif vocab < tokenizer.vocab_size:
        raise ConfigError(
            f"config key 'model.vocab_size': {vocab} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}, data.tokenizer={cfg.data.tokenizer!r})"
        )
    problem = model_size_problem(replace(cfg.model, vocab_size=vocab))  # the tokenizer's vocabulary sizes two tables
    if problem is not None:
        raise ConfigError(f"config key 'model.{problem[0]}' (with a vocabulary of {vocab}): {problem[1]}")
    # Lightning's DDP launcher re-runs the command in child processes: they inherit the parent's generated name.
    # (Only they: a second unnamed run in one process gets a name of its own.)
    name = cfg.run.name or (None if _first_process() else os.environ.get("AIMPRE_RUN_NAME"))
    if name is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("config key 'run.name' must be set for multi-process runs (every rank needs it)")
        name = _new_name(Path(cfg.run.out_dir), f"{cfg.model.size}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.environ["AIMPRE_RUN_NAME"] = name
    return replace(cfg, model=replace(cfg.model, vocab_size=vocab), run=replace(cfg.run, name=name))


def _new_name(out_dir: Path, stem: str) -> str:
    """``stem``, else ``stem-2``, ``stem-3``, ...: the first whose run directory this call creates. mkdir is atomic,
    so two unnamed runs started in the same second (or on two hosts sharing ``out_dir``) get different names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in itertools.count(1):
        name = stem if i == 1 else f"{stem}-{i}"
        try:
            (out_dir / name).mkdir()
            return name
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def _first_process() -> bool:
    """Whether this is the run's first process. Every launcher gives its other processes a non-zero rank variable
    (torchrun RANK/GROUP_RANK, srun SLURM_PROCID, Lightning's DDP launcher LOCAL_RANK/NODE_RANK for the children
    it re-runs the command in), and Lightning's own rank is not known before the Trainer has set up."""
    ranks = ("RANK", "GROUP_RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
    return all(os.environ.get(v, "0") in ("", "0") for v in ranks)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Holds ``run_dir/.lock`` exclusively while the block runs; refuses if another process holds it.

    ``fcntl.flock``: the OS drops the lock when its process dies, however it dies, so a killed run never blocks its
    own resume. The file names the holder (host, pid, start time) for the refusal message. A ``.lock`` that is a
    symlink (or a FIFO) is refused: truncating it would truncate whatever it points at.
    """
    path = run_dir / ".lock"
    fd = open_fd_in_run(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # the holder's own note, read through the open descriptor and bounded: the file could hold anything
            holder = " ".join(os.pread(fd, 512, 0).decode("utf-8", "replace").split()) or "another process"
            raise FileExistsError(
                f"run directory {run_dir} is in use by {holder}: one training process per run "
                f"(wait for it to end, or stop it; a killed process releases it at once)"
            ) from None
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_resume(run_dir: Path, cfg: Config, tokenizer: Tokenizer) -> None:
    """A run may resume with a new schedule or data, never with another model or tokenizer."""
    saved = load_yaml(run_dir / "config.yaml", "the config of the run to resume")
    if not isinstance(saved, dict) or not isinstance(saved.get("model", {}), dict):
        raise ConfigError(f"cannot resume {run_dir}: its config.yaml does not hold a mapping of sections")
    now = to_dict(cfg)
    diff = [k for k in now["model"] if saved.get("model", {}).get(k) != now["model"][k]]
    if diff:
        raise ConfigError(f"cannot resume {run_dir}: model config differs in {', '.join('model.' + k for k in diff)}")
    tok_file = run_dir / "tokenizer.identity.json"
    if tok_file.exists() and (saved_tok := read_json(tok_file, "tokenizer record")) != tokenizer.identity():
        raise ConfigError(
            f"cannot resume {run_dir}: data.tokenizer is {tokenizer.identity()}, "
            f"the run was trained with {short(saved_tok, 200)}"
        )


def _precision(cfg: Config) -> Any:
    """Lightning's precision for ``trainer.precision``. fp8 is bf16-mixed (autocast) for Lightning; the float8
    linears are swapped in by AIMv2Module.configure_model (``train`` refuses it first where it cannot run)."""
    p = cfg.trainer.precision
    if p == "fp8":
        return "bf16-mixed"
    if p != "auto":
        return p
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def _device_type(accelerator: str) -> str:
    """The device type Lightning picks for ``trainer.accelerator``."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return "mps"
    return "cpu"


def _num_nodes(cfg: Config) -> int:
    """trainer.num_nodes, or the node count of a torchrun / SLURM launch when it is left at 1."""
    if cfg.trainer.num_nodes != 1:
        return cfg.trainer.num_nodes
    env = os.environ
    if "SLURM_NNODES" in env and "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return int(env["SLURM_NNODES"])
    if "WORLD_SIZE" in env and "LOCAL_WORLD_SIZE" in env:  # torchrun
        return max(1, int(env["WORLD_SIZE"]) // int(env["LOCAL_WORLD_SIZE"]))
    return 1


def _devices(cfg: Config) -> int | str:
    """trainer.devices, or the processes per node of a torchrun / SLURM launch when it is left at "auto"."""
    if cfg.trainer.devices != "auto":
        return cfg.trainer.devices
    env = os.environ
    if "LOCAL_WORLD_SIZE" in env:  # torchrun
        return int(env["LOCAL_WORLD_SIZE"])
    if "SLURM_NTASKS_PER_NODE" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_NTASKS_PER_NODE"].split("(")[0])
    return "auto"


def _world_size(cfg: Config, nodes: int) -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    devices = _devices(cfg)
    if isinstance(devices, int):
        return devices * nodes
    return (torch.cuda.device_count() if torch.cuda.is_available() else 1) * nodes


def _accumulate(cfg: Config, world: int) -> int:
    t = cfg.trainer
    if t.global_batch_size is None:
        return t.accumulate_grad_batches
    per_step = cfg.data.batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"config key 'trainer.global_batch_size': {t.global_batch_size} is not a multiple of "
            f"data.batch_size x world size = {cfg.data.batch_size} x {world}"
        )
    return t.global_batch_size // per_step


def _strategy(cfg: Config, world: int) -> Any:
    if cfg.trainer.strategy == "fsdp":
        from aimpre.train.checkpoint import safe_model_parallel_strategy

        # FSDP2 (fully_shard) over all ranks, applied per block in AIMv2Module.configure_model; checkpoints are
        # torch.distributed.checkpoint directories, loadable on another number of ranks. ("auto" would make the
        # data-parallel size the node count.)
        return safe_model_parallel_strategy(data_parallel_size=world, tensor_parallel_size=1)
    return cfg.trainer.strategy


def _mean_rows(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    """Means of ``keys`` over ``rows``, leaving out the keys an objective does not log (blank)."""
    return {k: sum(float(r[k]) for r in rows) / len(rows) for k in keys if rows and all(r.get(k) for r in rows)}


def train(
    cfg: Config,
    resume: bool = False,
    callbacks: tuple[pl.Callback, ...] = (),
    datamodule: pl.LightningDataModule | None = None,
) -> Path:
    """Runs (or resumes) pretraining; returns the run directory.

    Args:
        cfg: the run config.
        resume: continue from ``checkpoints/last.ckpt`` if the run directory has one (else start fresh).
        callbacks: extra Lightning callbacks.
        datamodule: replaces the shard pipeline (its batches: ``image`` uint8, ``text``, ``text_mask``).
    """
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.lowercase)
    cfg = resolve(cfg, tokenizer)
    if cfg.trainer.precision == "fp8":  # refused where it cannot run (no torchao, no float8 tensor cores), early
        check_fp8(torch.device(_device_type(cfg.trainer.accelerator)))
    if datamodule is None:  # shards the objective cannot use are refused before a directory or model exists
        AIMv2DataModule(cfg, tokenizer).check_shards()
    assert cfg.run.name is not None
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    check_run_dir(run_dir)  # before mkdir: a symlinked run directory or checkpoints/ would take the writes elsewhere
    run_dir.mkdir(parents=True, exist_ok=True)
    ours = not _distributed()  # Lightning starts the process group in fit(); one the caller started is left alone
    try:
        # only the first process takes the lock: the other ranks of the same launch share the directory. SIGTERM
        # and SIGUSR1 from here on only set a flag: a preemption during start-up still ends with the marker
        with StopSignals().installed() as stop, run_lock(run_dir) if _first_process() else contextlib.nullcontext():
            return _train_locked(cfg, run_dir, tokenizer, resume, callbacks, datamodule, stop)
    finally:
        if ours and _distributed():
            # Lightning leaves it up; a gloo group still up at interpreter exit can abort the process (SIGABRT,
            # "terminate called without an active exception") while its worker threads are torn down
            torch.distributed.destroy_process_group()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _train_locked(
    cfg: Config,
    run_dir: Path,
    tokenizer: Tokenizer,
    resume: bool,
    callbacks: tuple[pl.Callback, ...],
    datamodule: pl.LightningDataModule | None,
    stop: StopSignals,
) -> Path:
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if last.exists() and not resume:
        raise FileExistsError(f"run {run_dir} already has checkpoints: pass --resume to continue it")
    if resume and last.exists():
        if not last.is_dir():  # a FIFO (or device) as last.ckpt would block the resume forever
            regular_file(last, "checkpoint")
        _check_resume(run_dir, cfg, tokenizer)
    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    module = AIMv2Module(cfg, tokenizer.identity())
    init = None
    if cfg.run.init is not None and not (resume and last.exists()):  # a resume takes its weights from last.ckpt
        from aimpre.train.init import init_from  # here: it reads exports (safetensors, json)

        init = init_from(module.model, cfg, tokenizer.identity(), digest=_first_process())
    data = datamodule or AIMv2DataModule(cfg, tokenizer)
    t = cfg.trainer
    nodes = _num_nodes(cfg)
    world = _world_size(cfg, nodes)
    accumulate = _accumulate(cfg, world)
    fps = flops_per_sample(cfg.model)
    val_every = t.val_every if cfg.data.val_shards and t.val_batches else 0
    # a progress bar on a terminal wide enough for one; in a file (a SLURM log) a text line every log_every steps
    tty = wants_bar(sys.stdout)
    metrics = MetricsCSV(t.log_every, 0, fps, run_dir / "out.log", echo=not tty)  # samples/step is set below
    bar = [StepProgressBar(metrics)] if tty else []
    trainer = pl.Trainer(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=_devices(cfg),
        num_nodes=nodes,
        strategy=_strategy(cfg, world),
        precision=_precision(cfg),
        accumulate_grad_batches=accumulate,
        val_check_interval=t.val_every * accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches if val_every else 0,
        num_sanity_val_steps=0,
        logger=build_loggers(t.loggers, run_dir, run_dir.name),
        deterministic=t.deterministic,
        default_root_dir=run_dir,
        enable_model_summary=False,
        enable_progress_bar=tty,
        enable_checkpointing=False,  # the Checkpointer below does it atomically
        plugins=[AtomicCheckpointIO()],
        # the metrics rows first: a step's row is on disk before the checkpoint that covers the step
        callbacks=[metrics, Checkpointer(ckpt_dir, t.ckpt_every, t.keep_last, val_every, stop), *bar, *callbacks],
    )
    metrics.samples_per_step = cfg.data.batch_size * trainer.world_size * accumulate
    if cfg.data.native:  # each batch its own images and patches: counted batch by batch
        metrics.count_batches(partial(flops_per_sample, cfg.model, None), cfg.model.patch_size)
    if trainer.is_global_zero:
        action = "resuming" if resume and last.exists() else "starting"
        where = f"aimpre: {action} run {cfg.run.name} ({cfg.model.size}) in {run_dir}"
        print(f"{where}; {validation_line(cfg)}", flush=True)  # a user who set only train shards sees "none"
        write_text(run_dir / "config.yaml", dump_config(cfg))
        for logger in trainer.loggers:  # the run config beside the curves in TensorBoard and W&B
            logger.log_hyperparams(to_dict(cfg))
        write_text(run_dir / "tokenizer.identity.json", json.dumps(tokenizer.identity()))
        if init is not None:
            from aimpre.train.init import RECORD, summary_line

            write_text(run_dir / RECORD, json.dumps(init, indent=2))
            print(summary_line(init), flush=True)
        if isinstance(tokenizer, HFTokenizer):  # the run carries its own copy of the vocabulary
            write_text(run_dir / "tokenizer.json", tokenizer.path.read_text())
    start = time.time()
    if trainer.is_global_zero:
        # the run is unfinished from here until it ends: a summary of an earlier segment must not outlive this start
        (run_dir / PREEMPTED).unlink(missing_ok=True)
        (run_dir / "summary.json").unlink(missing_ok=True)
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume and last.exists() else None)
    # the Checkpointer leaves PREEMPTED (global rank 0) when a signal stopped the run: a stopped run is not finished
    if trainer.is_global_zero and not _preempted(run_dir, stop, trainer.global_step):
        _write_summary(run_dir, cfg, module, data, metrics, trainer, fps, time.time() - start, tokenizer)
        if _preempted(run_dir, stop, trainer.global_step):  # the signal came while the summary was written
            (run_dir / "summary.json").unlink(missing_ok=True)
    return run_dir


def _preempted(run_dir: Path, stop: StopSignals, step: int) -> bool:
    """Whether a stop signal stopped the run; one that came after the Checkpointer's last look (its checkpoint of
    ``step`` is saved by then) leaves the marker here, so that every stop ends the same way."""
    if stop.received and not (run_dir / PREEMPTED).exists():
        write_text(run_dir / PREEMPTED, marker_text(step))
    return (run_dir / PREEMPTED).exists()


def _write_summary(
    run_dir: Path,
    cfg: Config,
    module: AIMv2Module,
    data: pl.LightningDataModule,
    metrics: MetricsCSV,
    trainer: pl.Trainer,
    fps: float,
    seconds: float,
    tokenizer: Tokenizer,
) -> None:
    with open(run_dir / "metrics.csv") as f:  # the whole run's rows, resumed segments included
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["loss"]]
    val_rows = [r for r in rows if r["val_loss"]]
    tail = train_rows[-max(1, len(train_rows) // 10) :]
    samples, flops = metrics.progress_at(trainer.global_step)
    if cfg.data.native:  # the mean over the run's batches (variable T)
        fps = flops / max(samples, 1)
    summary: dict[str, Any] = {
        "run": cfg.run.name,
        "size": cfg.model.size,
        "params": module.model.param_counts(),
        "flops_per_sample": fps,
        "steps": trainer.global_step,
        "samples": samples,
        "flops": flops,
        **({"tokens": metrics.totals["tokens"]} if cfg.data.native else {}),
        "initial": _mean_rows(train_rows[:1], LOSSES) if train_rows and train_rows[0]["step"] == "1" else {},
        "final": _mean_rows(tail, LOSSES),
        "val": {k[4:]: v for k, v in _mean_rows(val_rows[-1:], tuple(f"val_{k}" for k in LOSSES)).items()},
        **metrics.data_totals,
        "wall_time_s": round(seconds, 1),
        "config_hash": config_hash(cfg),
        "tokenizer": tokenizer.identity(),
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
    }
    # the mean-patch and bigram baselines compare with the autoregressive objectives' losses only
    if (
        cfg.data.val_shards
        and cfg.trainer.val_batches
        and isinstance(data, AIMv2DataModule)
        and uses_prefix(cfg.model.objective)
    ):
        n = cfg.trainer.val_batches
        train_batches = itertools.islice(iter(data.stream(cfg.data.train_shards, "pretrain", True, square=True)), 4 * n)
        val_batches = itertools.islice(iter(data.stream(cfg.data.val_shards, "val", False)), n)
        seed = cfg.run.seed
        summary["baselines"] = baselines(
            module, train_batches, val_batches, lambda i, b: module.prefix_len(b, _seed(seed, 1 << 30, i, 0))
        )
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
