"""Preemption as SLURM does it: SIGTERM or SIGUSR1 at a random moment, to the trainer or to its whole process group
(DataLoader workers included), single process and 2-rank gloo DDP. Every stop must end with a loadable checkpoint of
the last finished step, a PREEMPTED marker, no summary, no traceback and exit status 75, and resume cleanly. Also:
the run lock dies with the trainer, a kill right after a checkpoint's rename loses no metrics row, and the sbatch
script requeues only on its own job's preemption.

The loops run once by default; AIMPRE_FAULT_LOOPS=N runs each N times (the counts in the report came from that).
"""

from __future__ import annotations

import collections
import csv
import fcntl
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aimpre.train.checkpoint import EXIT_PREEMPTED, load_checkpoint
from test_launch import _script, _slurm_env

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LOOPS = int(os.environ.get("AIMPRE_FAULT_LOOPS", "1"))
TRAIN = [sys.executable, "-m", "aimpre", "train"]


def _args(out: Path, train: str, val: str, *extra: str) -> list[str]:
    """A tiny run that validates every 3 steps and saves every 2, with 2 data workers."""
    return [f"run.out_dir={out}", "run.name=r", f"data.train_shards={train}", f"data.val_shards={val}",
            "data.batch_size=4", "data.num_workers=2", "model.img_size=56", "model.depth=2", "model.dec_depth=1",
            "model.text_len=16", "trainer.accelerator=cpu", "trainer.log_every=1", "trainer.val_every=3",
            "trainer.val_batches=1", "trainer.ckpt_every=2", "trainer.max_steps=300", "optim.warmup_steps=2",
            *extra]  # fmt: skip


def _rows(run: Path) -> list[dict[str, str]]:
    if not (run / "metrics.csv").exists():
        return []
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``aimpre train`` in a process group of its own (as a SLURM task is), stderr to ``log``."""
    with open(log, "wb") as err:
        return subprocess.Popen([*TRAIN, *args], stdout=subprocess.DEVNULL, stderr=err, env=ENV, start_new_session=True)


def _wait_steps(proc: subprocess.Popen[bytes], run: Path, n: int, log: Path) -> None:
    t0 = time.time()
    while len([r for r in _rows(run) if r["loss"]]) < n:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() - t0 < 240, "no training step in time"
        time.sleep(0.1)


def _outcome(proc: subprocess.Popen[bytes], run: Path, log: Path) -> tuple[str, int]:
    """How a stopped run ended: "ok" (status 75, marker, checkpoint of the marker's step, every row up to it, no
    summary, no traceback) or what was wrong; and the checkpoint's step."""
    rc = proc.wait(timeout=240)
    err = log.read_text()
    if "Traceback" in err:
        return f"traceback (status {rc})", -1
    if rc != EXIT_PREEMPTED:
        return f"status {rc}", -1
    if not (run / "PREEMPTED").exists():
        return "no marker", -1
    if (run / "summary.json").exists():
        return "summary", -1
    step = int((run / "PREEMPTED").read_text().split()[1])
    try:
        saved = load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    except (OSError, ValueError) as e:
        return f"checkpoint unreadable: {e}", -1
    if saved != step:
        return f"checkpoint of step {saved}, marker says {step}", -1
    if sorted(int(r["step"]) for r in _rows(run) if r["loss"]) != list(range(1, step + 1)):
        return "metrics rows missing", -1
    return "ok", step


def _resumes(run_args: list[str], run: Path, step: int, log: Path) -> None:
    """The stopped run resumes to two steps past its checkpoint and finishes: every row once, marker gone."""
    done = subprocess.run([*TRAIN, "--resume", *run_args, f"trainer.max_steps={step + 2}"], capture_output=True,
                          text=True, timeout=300, env=ENV)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "summary.json").exists() and not (run / "PREEMPTED").exists()
    rows = _rows(run)
    assert sorted(int(r["step"]) for r in rows if r["loss"]) == list(range(1, step + 3))
    val = [int(r["step"]) for r in rows if r["val_loss"]]
    assert len(val) == len(set(val)) and {s for s in range(3, step + 3, 3)} <= set(val)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["pid", "group"])
def test_stop_signal_at_a_random_moment_ends_with_checkpoint_marker_and_status_75(
    tmp_path: Path, pretrain_spec: str, val_spec: str, target: str
) -> None:
    """SIGTERM (and, on odd rounds, SIGUSR1) to the trainer alone or to its process group, as SLURM sends it, at a
    random moment in start-up, a step, data loading, validation or a checkpoint write."""
    outcomes: collections.Counter[str] = collections.Counter()
    rng = random.Random()
    for i in range(LOOPS):
        out = tmp_path / str(i)
        args, log, run = _args(out, pretrain_spec, val_spec), tmp_path / f"{i}.err", out / "r"
        proc = _start(args, log)
        if i % 4 == 3:  # during start-up: imports, data workers, the first batch
            time.sleep(rng.uniform(0.5, 8.0))
        else:
            _wait_steps(proc, run, 1, log)
            time.sleep(rng.uniform(0.0, 3.0))
        sig = (signal.SIGTERM, signal.SIGUSR1)[i % 2]
        if target == "group":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        what, step = _outcome(proc, run, log)
        outcomes[what] += 1
        if what == "ok" and (i == 0 or LOOPS > 1):
            _resumes(args, run, step, log)
    print(f"{target}: {dict(outcomes)}")
    assert outcomes == {"ok": LOOPS}, outcomes


@pytest.mark.slow
def test_sigterm_to_a_two_rank_ddp_run_ends_with_checkpoint_marker_and_status_75(
    tmp_path: Path, pretrain_spec: str, val_spec: str
) -> None:
    """2 gloo ranks (Lightning's launcher: rank 1 is rank 0's child), each with 2 data workers; SIGTERM to the
    process group (every rank and worker) or, on odd rounds, to rank 0 alone (which passes it on)."""
    outcomes: collections.Counter[str] = collections.Counter()
    rng = random.Random()
    for i in range(LOOPS):
        out = tmp_path / str(i)
        args = _args(out, pretrain_spec, val_spec, "trainer.devices=2", "trainer.strategy=ddp")
        log, run = tmp_path / f"{i}.err", out / "r"
        proc = _start(args, log)
        _wait_steps(proc, run, 1, log)
        time.sleep(rng.uniform(0.0, 3.0))
        if i % 2:
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        what, _ = _outcome(proc, run, log)
        outcomes[what] += 1
        if what == "ok":
            ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
            assert ckpt["AIMv2DataModule"]["world"] == 2  # both ranks' reader positions are in it
    print(f"ddp: {dict(outcomes)}")
    assert outcomes == {"ok": LOOPS}, outcomes


def test_the_run_lock_is_free_as_soon_as_the_trainer_is_killed(tmp_path: Path, pretrain_spec: str) -> None:
    """The data workers inherit the lock's file description; they must die with the trainer, not seconds later."""
    args = _args(tmp_path, pretrain_spec, "null", "trainer.ckpt_every=1000")
    log, run = tmp_path / "err", tmp_path / "r"
    proc = _start(args, log)
    _wait_steps(proc, run, 2, log)
    proc.kill()
    proc.wait()
    t0 = time.time()
    fd = os.open(run / ".lock", os.O_RDWR)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.time() - t0 < 1.0, "the run lock is still held 1 s after the trainer died"
                time.sleep(0.02)
    finally:
        os.close(fd)


KILL_AFTER_RENAME = """
import os, signal, sys
from pathlib import Path

rename = os.replace


def replace(src, dst, *args, **kwargs):  # SIGKILL right after last.ckpt is moved to step-{step}.ckpt
    rename(src, dst, *args, **kwargs)
    if Path(dst).name == "last.ckpt" and os.readlink(dst) == "step-{step}.ckpt":
        os.kill(os.getpid(), signal.SIGKILL)


os.replace = replace
from aimpre.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_a_kill_right_after_a_checkpoint_loses_neither_its_metrics_row_nor_its_validation(
    tmp_path: Path, pretrain_spec: str, val_spec: str
) -> None:
    """Step 6 is a checkpoint and a validation step: both rows must be on disk before the checkpoint covers it,
    since the resumed run starts after step 6 and never logs them again."""
    args = [*_args(tmp_path, pretrain_spec, val_spec, "trainer.max_steps=7"), "data.num_workers=0"]
    script = tmp_path / "kill_after_rename.py"
    script.write_text(KILL_AFTER_RENAME.format(step=6))
    killed = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300,
                            env=ENV)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "r"
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    done = subprocess.run([*TRAIN, "--resume", *args], capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(run)
    assert [int(r["step"]) for r in rows if r["loss"]] == list(range(1, 8))
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [3, 6]


@pytest.mark.slow
def test_the_sbatch_script_never_requeues_on_a_marker_this_job_did_not_write(
    tmp_path: Path, pretrain_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The requeue loop under stand-ins (srun runs the tasks, scontrol notes the requeue, this loop plays SLURM
    requeueing the job): a job whose training crashes before it starts, beside a PREEMPTED marker an earlier
    preemption left, must end with the crash instead of requeueing itself forever."""
    script = _script(tmp_path, capsys, pretrain_spec, 500)
    run = tmp_path / "submit" / "runs" / "my-run"
    run.mkdir(parents=True)
    (run / "PREEMPTED").write_text("step 40\nslurm job 4242 restart 0\n")  # this job's, from its previous start
    (run / "config.yaml").write_text("model: {depth: 99}\n")  # the resume crashes: another model
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    shims = tmp_path / "shims"
    shims.mkdir()
    env = {**_slurm_env(shims), "SLURM_NTASKS": "1"}  # one task is enough to crash
    starts = 0
    for restart in range(1, 4):  # SLURM starts the requeued job again, with the restart count one higher
        starts += 1
        job = subprocess.run(["bash", str(script)], cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": str(restart)},
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        if not (shims / "scontrol.calls").exists():
            break
        (shims / "scontrol.calls").unlink()
    assert starts == 1, "the job requeued itself on a marker it did not write"
    assert job.returncode == 2 and "model.depth" in job.stderr, job.stderr[-3000:]
    assert not (run / "PREEMPTED").exists()


@pytest.mark.parametrize("preempted", [True, False])
def test_the_sbatch_script_requeues_a_job_stopped_before_its_ranks_could_save(
    tmp_path: Path, pretrain_spec: str, capsys: pytest.CaptureFixture[str], preempted: bool
) -> None:
    """SLURM's SIGTERM to the job (this shell and the ranks) while the ranks are still starting kills them before
    they can note it: no marker, srun reports 128 + 15. The job was preempted all the same and requeues; a rank
    killed by a signal the job was not sent (the OOM killer, say) does not requeue it."""
    script = _script(tmp_path, capsys, pretrain_spec, 500)
    shims = tmp_path / "shims"
    shims.mkdir()
    env = _slurm_env(shims)
    # srun stand-in: a task that dies of SIGTERM (status 143) before any handler of ours is installed
    (shims / "srun").write_text(f'#!/bin/bash\ntouch "{shims}/started"\nsleep 30 &\nwait\nexit 143\n')
    job = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 60
    while not (shims / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    if preempted:
        os.killpg(job.pid, signal.SIGTERM)  # SLURM signals every process of the job
    else:
        subprocess.run(["pkill", "-TERM", "-f", "sleep 30", "-s", str(os.getpgid(job.pid))], check=False)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 143, err[-2000:]
    assert (shims / "scontrol.calls").exists() == preempted, err[-2000:]
