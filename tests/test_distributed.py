"""Distributed training on CPU with real processes: DDP and FSDP against one process, checkpoints that survive
SIGKILL and resharding, preemption signals, non-finite steps, and the torchrun launches the README documents."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from aimpre.config import load_config
from aimpre.export import load_encoder
from aimpre.train import train
from aimpre.train.checkpoint import EXIT_PREEMPTED, load_checkpoint, model_state
from aimpre.train.module import NonFiniteError

JOB = Path(__file__).parent / "dist_job.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}


def _job(out: Path, strategy: str, devices: int, *extra: str) -> Path:
    cmd = [sys.executable, str(JOB), str(out), strategy, str(devices), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "job"


def test_ddp_and_fsdp_match_one_process(tmp_path: Path) -> None:
    """The same global batch of 8 on 1 process, on 2 DDP ranks and on 2 FSDP ranks: the same losses."""
    one = _losses(_job(tmp_path / "one", "auto", 1))
    ddp = _losses(_job(tmp_path / "ddp", "ddp", 2))
    fsdp_run = _job(tmp_path / "fsdp", "fsdp", 2)
    fsdp = _losses(fsdp_run)
    assert sorted(one) == sorted(ddp) == sorted(fsdp) == [1, 2, 3, 4, 5, 6]
    assert one[6] < one[1] - 0.1  # it trains
    for step in one:
        assert ddp[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step
        assert fsdp[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step
    # the FSDP checkpoint is a sharded directory; it consolidates into the same tensors a 1-process run has
    last = fsdp_run / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and last.resolve().is_dir()
    sharded = model_state(load_checkpoint(last))
    single = model_state(load_checkpoint(tmp_path / "one" / "job" / "checkpoints" / "last.ckpt"))
    assert sharded.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], rtol=1e-3, atol=1e-4)
    # and a sharded run exports like any other: the same encoder as the 1-process run's
    size = load_config(fsdp_run / "config.yaml").model.img_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = [load_encoder(run).eval()(x) for run in (fsdp_run, tmp_path / "one" / "job")]
    torch.testing.assert_close(feats[0], feats[1], rtol=1e-3, atol=1e-3)


def test_fsdp_checkpoint_resumes_on_another_number_of_ranks(tmp_path: Path) -> None:
    run = _job(tmp_path, "fsdp", 2)
    _job(tmp_path, "fsdp", 1, "--resume", "trainer.max_steps=9")
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 10))  # steps 7..9 continued from the 2-rank step-6 checkpoint
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert json.loads((run / "summary.json").read_text())["steps"] == 9


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "aimpre", "train", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ENV
    )


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"the run ended early (exit {proc.returncode})"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.2)


def _train_args(tmp_path: Path, spec: str, *extra: str) -> list[str]:
    return [f"run.out_dir={tmp_path}", "run.name=r", f"data.train_shards={spec}", "data.val_shards=null",
            "data.batch_size=4", "data.num_workers=0", "model.depth=2", "model.dec_depth=1", "model.text_len=32",
            "trainer.log_every=1", *extra]  # fmt: skip


def test_sigkill_then_resume_from_the_last_complete_checkpoint(tmp_path: Path, pretrain_spec: str) -> None:
    ckpts = tmp_path / "r" / "checkpoints"
    proc = _start(_train_args(tmp_path, pretrain_spec, "trainer.max_steps=500", "trainer.ckpt_every=2"), tmp_path / "a")
    _wait_for(lambda: (ckpts / "step-6.ckpt").exists(), proc)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up, possibly in the middle of writing a checkpoint
    proc.wait()
    target = int((ckpts / "last.ckpt").resolve().name.split("-")[1].split(".")[0])
    assert target >= 6 and torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == target
    args = _train_args(tmp_path, pretrain_spec, f"trainer.max_steps={target + 3}", "trainer.ckpt_every=2")
    done = subprocess.run([sys.executable, "-m", "aimpre", "train", "--resume", *args], capture_output=True,
                          text=True, timeout=300, env=ENV)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming run r" in done.stdout
    steps = list(_losses(tmp_path / "r"))
    assert steps == sorted(set(steps)) and steps[-1] == target + 3  # no step twice, none missing at the end
    assert not list(ckpts.glob(".*tmp*"))  # a half-written checkpoint from the kill is gone


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signals_save_and_stop(tmp_path: Path, pretrain_spec: str, sig: signal.Signals) -> None:
    ckpts = tmp_path / "r" / "checkpoints"
    metrics = tmp_path / "r" / "metrics.csv"
    args = _train_args(tmp_path, pretrain_spec, "trainer.max_steps=500", "trainer.ckpt_every=1000")
    proc = _start(args, tmp_path / "log")
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 3, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (tmp_path / "log").read_text()[-3000:]
    saved = list(ckpts.glob("step-*.ckpt"))
    assert len(saved) == 1 and (ckpts / "last.ckpt").resolve() == saved[0].resolve()
    step = torch.load(saved[0], weights_only=False)["global_step"]
    assert 2 <= step < 500
    assert (tmp_path / "r" / "PREEMPTED").read_text().strip() == f"step {step}"


class Poison(pl.Callback):
    """Makes the forward pass NaN on the given steps by planting a NaN weight (restored afterwards)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.saved = steps, None

    def on_train_batch_start(self, trainer, module, batch, i) -> None:
        w = module.model.pixel_head.weight
        if self.saved is not None:
            w.data.copy_(self.saved)
            self.saved = None
        if trainer.global_step in self.steps:
            self.saved = w.data.clone()
            w.data[0, 0] = float("nan")


def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(tmp_path: Path, pretrain_spec: str) -> None:
    base = _train_args(tmp_path, pretrain_spec, "trainer.ckpt_every=2", "trainer.max_bad_steps=3")
    run = train(load_config(None, [*base, "run.name=once", "trainer.max_steps=6"]), callbacks=(Poison({3}),))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["skipped_steps"] == "1"
    state = model_state(load_checkpoint(run / "checkpoints" / "last.ckpt"))
    assert all(torch.isfinite(v).all() for v in state.values())  # the NaN step changed nothing

    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        train(
            load_config(None, [*base, "run.name=many", "trainer.max_steps=20"]), callbacks=(Poison(set(range(3, 20))),)
        )
    last = tmp_path / "many" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2  # the last good checkpoint, intact
    assert all(torch.isfinite(v).all() for v in model_state(load_checkpoint(last)).values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_one_node_and_two_node_rendezvous(tmp_path: Path, pretrain_spec: str) -> None:
    """The README's launch commands, on CPU: one node with 2 processes, then 2 'nodes' of 1 process each
    meeting through a c10d rendezvous; both resume the same run from its checkpoint."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    train_cmd = ["-m", "aimpre", "train", "--resume", *_train_args(tmp_path, pretrain_spec, "trainer.ckpt_every=2")]
    one = subprocess.run([*torchrun, "--standalone", "--nproc-per-node", "2", *train_cmd, "trainer.max_steps=2"],
                         capture_output=True, text=True, timeout=300, env=ENV)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    node = [*torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test"]  # fmt: skip
    nodes = [subprocess.Popen([*node, *train_cmd, "trainer.max_steps=4"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=ENV) for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:]
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["AIMv2DataModule"]["world"] == 2
    assert sorted(_losses(tmp_path / "r")) == [1, 2, 3, 4]
