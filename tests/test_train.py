from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from aimpre.config import ConfigError, OptimConfig, load_config
from aimpre.data import Augment, ByteTokenizer, ImageTextStream, shard_set
from aimpre.model import AIMv2, model_config
from aimpre.train import train
from aimpre.train.optim import build_optimizer, lr_factor, param_groups
from helpers import metric_rows


def test_tiny_overfits_one_batch(pretrain_spec: str) -> None:
    """tiny memorises one fixed batch of real demo samples within 200 steps (loss from ~6 to < 1% of that)."""
    torch.manual_seed(0)
    ds = ImageTextStream([shard_set(pretrain_spec)], ByteTokenizer(), 96, 4, Augment(112), shuffle=0)
    batch = next(iter(ds))
    images = (batch["image"].float() / 255 - 0.45) / 0.225
    model = AIMv2(model_config("tiny", vocab_size=258))
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, weight_decay=0.0)
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, 200))
    prefix = torch.tensor([1, 10, 30, 63])
    losses = []
    for _ in range(200):
        out = model(images, batch["text"], batch["text_mask"], prefix)
        losses.append({k: float(v.detach()) for k, v in out.items()})
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
    first, last = losses[0], losses[-1]
    assert first["loss_image"] > 0.9 and first["loss_text"] > 4.0
    assert last["loss"] < 0.01 * first["loss"]
    assert last["loss_image"] < 0.04 and last["loss_text"] < 0.005


def test_schedule_and_weight_decay_groups() -> None:
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    f = lr_factor(cfg, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5)  # half way down the cosine
    assert f(110) == pytest.approx(0.01) and f(500) == pytest.approx(0.01)
    model = AIMv2(model_config("tiny", vocab_size=258, depth=1, dec_depth=1))
    decay, no_decay = param_groups(model)
    named = {id(p): n for n, p in model.named_parameters()}
    assert {named[id(p)] for p in no_decay["params"]} >= {
        "encoder.pos_embed",
        "decoder.start_token",
        "decoder.text_pos",
    }
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    opt = build_optimizer(model, cfg)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(1e-4 / 1e-3)  # decoupled: wd / peak lr
    assert opt.param_groups[1]["weight_decay"] == 0.0


class RecordKeys(pl.Callback):
    """The sample keys of every batch trained on, by step."""

    def __init__(self) -> None:
        self.keys: dict[int, list[str]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, out, batch, i: int) -> None:
        self.keys[trainer.global_step] = batch["key"]


class StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _cfg(tmp_path: Path, pretrain_spec: str, val_spec: str, name: str, *extra: str):
    return load_config(
        None,
        [
            f"run.out_dir={tmp_path}", f"run.name={name}", f"data.train_shards={pretrain_spec}",
            f"data.val_shards={val_spec}", "data.batch_size=4", "data.num_workers=2", "trainer.max_steps=6",
            "trainer.ckpt_every=3", "trainer.log_every=1", "trainer.val_every=3", "trainer.val_batches=1",
            "trainer.deterministic=true", "optim.warmup_steps=2", *extra,
        ],
    )  # fmt: skip


def test_lightning_run_resumes_exactly(tmp_path: Path, pretrain_spec: str, val_spec: str) -> None:
    seen_full, seen_part, seen_resumed = RecordKeys(), RecordKeys(), RecordKeys()
    full = train(_cfg(tmp_path, pretrain_spec, val_spec, "full", "trainer.keep_last=1"), callbacks=(seen_full,))
    part = train(_cfg(tmp_path, pretrain_spec, val_spec, "part"), callbacks=(StopAt(3), seen_part))
    assert (part / "checkpoints" / "step-3.ckpt").exists() and not (part / "checkpoints" / "step-6.ckpt").exists()
    assert max(metric_rows(part)) == 3
    train(_cfg(tmp_path, pretrain_spec, val_spec, "part"), resume=True, callbacks=(seen_resumed,))
    # the same samples in the same order, none repeated, none skipped (2 data workers, stopped at an odd batch)
    assert {**seen_part.keys, **seen_resumed.keys} == seen_full.keys and sorted(seen_resumed.keys) == [4, 5, 6]
    a, b = metric_rows(full), metric_rows(part)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        for k in ("loss", "loss_image", "loss_text", "lr"):
            assert float(a[step][k]) == float(b[step][k]), (step, k)
    assert float(a[6]["loss"]) != float(a[5]["loss"])
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["samples"] == 24 and summary["params"]["total"] > 0
    resumed = json.loads((part / "summary.json").read_text())
    assert resumed["initial"] == summary["initial"] and resumed["final"] == summary["final"]
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["last.ckpt", "step-6.ckpt"]  # keep_last=1
    assert not list((full / "checkpoints").glob(".*tmp*"))  # no temp file left behind

    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(tmp_path, pretrain_spec, val_spec, "full", "trainer.keep_last=1"))
    with pytest.raises(ConfigError, match=r"model\.depth"):
        train(_cfg(tmp_path, pretrain_spec, val_spec, "full", "trainer.keep_last=1", "model.depth=2"), resume=True)


def test_vocab_smaller_than_tokenizer_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        train(load_config(None, [f"run.out_dir={tmp_path}", "model.vocab_size=100"]))


def test_cli_job_learns(tmp_path: Path, pretrain_spec: str, val_spec: str) -> None:
    """A shortened default job through the CLI: losses fall and beat the mean-patch and bigram baselines."""
    args = [
        f"run.out_dir={tmp_path}", "run.name=cli", f"data.train_shards={pretrain_spec}",
        f"data.val_shards={val_spec}", "trainer.max_steps=60", "optim.warmup_steps=10", "trainer.val_every=60",
    ]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "aimpre", "train", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"run directory: {tmp_path / 'cli'}" in out.stdout
    s = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert s["final"]["loss_image"] < 0.7 * s["initial"]["loss_image"]
    assert s["final"]["loss_text"] < 0.5 * s["initial"]["loss_text"]
    assert s["val"]["loss_image"] < s["baselines"]["loss_image_mean_patch"]
    assert s["val"]["loss_text"] < s["baselines"]["loss_text_bigram"]


def test_cli_reports_config_errors() -> None:
    out = subprocess.run([sys.executable, "-m", "aimpre", "train", "optim.lrr=1"], capture_output=True, text=True)
    assert out.returncode == 2 and "'optim.lrr'" in out.stderr and "Traceback" not in out.stderr
