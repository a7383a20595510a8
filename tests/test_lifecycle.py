"""A run's life: one live training process per run directory, default names that never collide, and a run stopped
by a preemption signal that nothing mistakes for a finished one (no summary; `scaling run` resumes it)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from aimpre.cli import main
from aimpre.config import load_config
from aimpre.data import build_tokenizer
from aimpre.scaling.collect import collect
from aimpre.scaling.runner import run_point
from aimpre.scaling.sweep import load_plan
from aimpre.train import resolve, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _args(out: Path, spec: str, *extra: str) -> list[str]:
    return [f"run.out_dir={out}", "run.name=r", f"data.train_shards={spec}", "data.val_shards=null",
            "data.batch_size=4", "data.num_workers=0", "model.depth=2", "model.dec_depth=1", "model.text_len=32",
            "trainer.log_every=1", *extra]  # fmt: skip


def _steps(run: Path) -> list[int]:
    with open(run / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r["loss"]]


def test_a_second_training_process_is_refused_while_the_first_lives(tmp_path: Path, pretrain_spec: str) -> None:
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "aimpre", "train"]
    # no checkpoint before the second start: nothing but the lock stands between two fresh starts
    long = _args(tmp_path, pretrain_spec, "trainer.max_steps=500", "trainer.ckpt_every=1000")
    first = subprocess.Popen([*cmd, *long], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    t0 = time.time()
    while not ((run / "metrics.csv").exists() and len(_steps(run)) >= 2):
        assert first.poll() is None and time.time() - t0 < 180
        time.sleep(0.2)
    try:
        for resume in ([], ["--resume"]):  # a fresh start and a resume of the same run
            second = subprocess.run([*cmd, *resume, *_args(tmp_path, pretrain_spec, "trainer.max_steps=3")],
                                    capture_output=True, text=True, timeout=120, env=ENV)  # fmt: skip
            assert second.returncode == 2, second.stderr[-2000:]
            err = second.stderr.strip()
            assert err.startswith("aimpre: error: run directory") and len(err.splitlines()) == 1, err
            assert f"in use by pid {first.pid} on host" in err and "since" in err
        assert not (run / "checkpoints" / "last.ckpt").exists()
    finally:
        first.kill()  # SIGKILL: no clean-up; the OS releases the lock with the process
        first.wait()
    third = subprocess.run([*cmd, "--resume", *_args(tmp_path, pretrain_spec, "trainer.max_steps=1")],
                           capture_output=True, text=True, timeout=180, env=ENV)  # fmt: skip
    assert third.returncode == 0, third.stderr[-3000:]
    assert (run / "summary.json").exists()


def test_unnamed_runs_started_in_the_same_second_get_different_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "strftime", lambda *a: "20261201-000000")  # both start in the same second
    monkeypatch.delenv("AIMPRE_RUN_NAME", raising=False)
    cfg = load_config(None, [f"run.out_dir={tmp_path}"])
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.lowercase)
    names = [resolve(cfg, tokenizer).run.name for _ in range(3)]
    assert len(set(names)) == 3 and names[0] == f"{cfg.model.size}-20261201-000000"
    assert all((tmp_path / str(n)).is_dir() for n in names)  # each claimed its directory


class Usr1At(pl.Callback):
    """SLURM's time-limit warning, delivered to this process after the given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_a_preempted_trunk_is_unfinished_and_a_sweep_rerun_resumes_it(
    tmp_path: Path, pretrain_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = {
        "name": "pre", "design": "cooldown", "samples": [24, 40], "cooldown_fraction": 0.2,
        "sizes": {"xs": {"width": 32, "depth": 1}}, "head_dim": 16, "mlp_ratio": 2.0, "decoder": "same",
        "overrides": {"data.train_shards": pretrain_spec, "data.val_shards": None, "data.batch_size": 4,
                      "data.num_workers": 0, "optim.warmup_steps": 2, "trainer.log_every": 1},
    }  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    plan_dir = tmp_path / "plan"
    assert main(["scaling", "plan", str(tmp_path / "sweep.yaml"), "--out", str(plan_dir)]) == 0
    trunk_point = next(p for p in load_plan(plan_dir)["points"] if p["kind"] == "trunk")
    trunk = plan_dir / "runs" / trunk_point["name"]

    # the trunk (8 steps) is stopped by SIGUSR1 before its first branch point: a checkpoint, PREEMPTED, no summary
    train(load_config(plan_dir / trunk_point["config"]), callbacks=(Usr1At(2),))
    step = int((trunk / "PREEMPTED").read_text().split()[1])
    assert step in (2, 3)  # acted on at the step boundary after the signal
    assert not (trunk / "summary.json").exists()
    assert torch.load(trunk / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        collect(plan_dir, include_trunks=True)
    # older versions wrote a summary for a stopped run too: beside PREEMPTED it must not count as finished
    (trunk / "summary.json").write_text(f'{{"steps": {step}}}')
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        collect(plan_dir, include_trunks=True)

    # rerunning the sweep resumes the trunk from there to its end (instead of skipping it as done)
    out = run_point(plan_dir, trunk_point, threads=1)
    assert out.status == "done", out.log.read_text()[-3000:] if out.log else out
    assert _steps(trunk) == list(range(1, 9)) and not (trunk / "PREEMPTED").exists()
    assert {"step-4.ckpt", "step-8.ckpt"} <= {p.name for p in (trunk / "checkpoints").iterdir()}  # branch points
    rows, _ = collect(plan_dir, include_trunks=True)
    assert [r["run"] for r in rows] == [trunk.name] and rows[0]["steps"] == 8
    assert run_point(plan_dir, trunk_point).status == "skipped"
