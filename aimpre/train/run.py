"""One pretraining run: resolve the config, set up the run directory and the Trainer, fit, summarise.

Run directory (``run.out_dir/run.name``): ``config.yaml`` (resolved), ``checkpoints/`` (``last.ckpt`` and
``step-N.ckpt``, atomic), ``metrics.csv``, ``summary.json`` (what the scaling module reads).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from aimpre.config import Config, ConfigError, config_hash, dump_config, to_dict
from aimpre.data import Tokenizer, build_tokenizer
from aimpre.scaling import flops_per_sample
from aimpre.train.baselines import baselines
from aimpre.train.callbacks import LOSSES, AtomicCheckpointIO, MetricsCSV, StepProgressBar
from aimpre.train.module import AIMv2DataModule, AIMv2Module, _seed


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
    name = cfg.run.name
    if name is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("config key 'run.name' must be set for multi-process runs (every rank needs it)")
        name = f"{cfg.model.size}-{time.strftime('%Y%m%d-%H%M%S')}"
    return replace(cfg, model=replace(cfg.model, vocab_size=vocab), run=replace(cfg.run, name=name))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_resume(run_dir: Path, cfg: Config, tokenizer: Tokenizer) -> None:
    """A run may resume with a new schedule or data, never with another model or tokenizer."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    now = to_dict(cfg)
    diff = [k for k in now["model"] if saved.get("model", {}).get(k) != now["model"][k]]
    if diff:
        raise ConfigError(f"cannot resume {run_dir}: model config differs in {', '.join('model.' + k for k in diff)}")
    tok_file = run_dir / "tokenizer.json"
    if tok_file.exists() and json.loads(tok_file.read_text()) != tokenizer.identity():
        raise ConfigError(
            f"cannot resume {run_dir}: data.tokenizer is {tokenizer.identity()}, "
            f"the run was trained with {tok_file.read_text()}"
        )


def _precision(cfg: Config) -> Any:
    p = cfg.trainer.precision
    if p != "auto":
        return p
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def _mean_rows(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: sum(float(r[k]) for r in rows) / len(rows) for k in keys} if rows else {}


def train(cfg: Config, resume: bool = False, callbacks: tuple[pl.Callback, ...] = ()) -> Path:
    """Runs (or resumes) pretraining; returns the run directory.

    Args:
        cfg: the run config.
        resume: continue from ``checkpoints/last.ckpt`` if the run directory has one (else start fresh).
        callbacks: extra Lightning callbacks.
    """
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.lowercase)
    cfg = resolve(cfg, tokenizer)
    assert cfg.run.name is not None
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if last.exists() and not resume:
        raise FileExistsError(f"run {run_dir} already has checkpoints: pass --resume to continue it")
    if resume and last.exists():
        _check_resume(run_dir, cfg, tokenizer)
    run_dir.mkdir(parents=True, exist_ok=True)
    is_zero = int(os.environ.get("RANK", "0")) == 0
    if is_zero:
        action = "resuming" if resume and last.exists() else "starting"
        print(f"aimpre: {action} run {cfg.run.name} ({cfg.model.size}) in {run_dir}", flush=True)
        _write_atomic(run_dir / "config.yaml", dump_config(cfg))
        _write_atomic(run_dir / "tokenizer.json", json.dumps(tokenizer.identity()))

    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    module = AIMv2Module(cfg)
    data = AIMv2DataModule(cfg, tokenizer)
    t = cfg.trainer
    fps = flops_per_sample(cfg.model)
    metrics = MetricsCSV(run_dir / "metrics.csv", t.log_every, 0, fps)  # samples/step is set below
    trainer = pl.Trainer(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=_precision(cfg),
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None,
        val_check_interval=t.val_every * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches,
        num_sanity_val_steps=0,
        logger=False,
        deterministic=t.deterministic,
        default_root_dir=run_dir,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="step-{step}",
                auto_insert_metric_name=False,
                every_n_train_steps=t.ckpt_every,
                save_top_k=t.keep_last,
                monitor="step",
                mode="max",
                save_last=True,
                enable_version_counter=False,  # a resumed run (or a seeded cooldown branch) overwrites last.ckpt
            ),
            metrics,
            StepProgressBar(),
            *callbacks,
        ],
    )
    metrics.samples_per_step = cfg.data.batch_size * trainer.world_size * t.accumulate_grad_batches
    start = time.time()
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume and last.exists() else None)
    if trainer.global_step % t.ckpt_every:  # the last step was not a checkpoint step: save it too
        trainer.save_checkpoint(ckpt_dir / "last.ckpt")
    if trainer.is_global_zero:
        _write_summary(run_dir, cfg, module, data, metrics, trainer, fps, time.time() - start, tokenizer)
    return run_dir


def _write_summary(
    run_dir: Path,
    cfg: Config,
    module: AIMv2Module,
    data: AIMv2DataModule,
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
    samples = trainer.global_step * metrics.samples_per_step
    summary: dict[str, Any] = {
        "run": cfg.run.name,
        "size": cfg.model.size,
        "params": module.model.param_counts(),
        "flops_per_sample": fps,
        "steps": trainer.global_step,
        "samples": samples,
        "flops": samples * fps,
        "initial": _mean_rows(train_rows[:1], LOSSES) if train_rows and train_rows[0]["step"] == "1" else {},
        "final": _mean_rows(tail, LOSSES),
        "val": {k[4:]: v for k, v in _mean_rows(val_rows[-1:], tuple(f"val_{k}" for k in LOSSES)).items()},
        "skipped": metrics.skipped_by_reason(),
        "wall_time_s": round(seconds, 1),
        "config_hash": config_hash(cfg),
        "tokenizer": tokenizer.identity(),
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
    }
    if cfg.data.val_shards and cfg.trainer.val_batches:
        n = cfg.trainer.val_batches
        data.start_batch = 0
        train_batches = itertools.islice(iter(data._stream(cfg.data.train_shards, "pretrain", True)), 4 * n)
        val_batches = itertools.islice(iter(data._stream(cfg.data.val_shards, "val", False)), n)
        seed = cfg.run.seed
        summary["baselines"] = baselines(
            module, train_batches, val_batches, lambda i, b: module.prefix_len(b, _seed(seed, 1 << 30, i, 0))
        )
    _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
