"""`aimpre launch`: scripts whose output starts. The sbatch script runs as bash under a simulated SLURM job (the
SLURM_* variables Lightning reads, `srun` and `scontrol` shims on PATH) with 2 real training processes on CPU."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from aimpre.cli import main

# srun on one node: starts every task of the step with the variables srun gives each, passes signals on to them
SRUN = """#!/bin/bash
echo "$@" > "$SHIM_LOG/srun.args"
echo $$ > "$SHIM_LOG/srun.pid"
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
    pids+=($!)
done
trap 'kill -USR1 "${pids[@]}"' USR1
trap 'kill -TERM "${pids[@]}"' TERM
status=0
for p in "${pids[@]}"; do
    while true; do wait "$p"; rc=$?; kill -0 "$p" 2>/dev/null || break; done
    [ "$rc" -ne 0 ] && status=$rc
done
exit "$status"
"""
SCONTROL = '#!/bin/bash\necho "$@" >> "$SHIM_LOG/scontrol.calls"\n'
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR")


def _config(tmp_path: Path, spec: str, max_steps: int) -> Path:
    cfg = {
        "data": {"train_shards": spec, "val_shards": None, "batch_size": 4, "num_workers": 0},
        "model": {"depth": 2, "dec_depth": 1, "text_len": 32},
        "trainer": {"max_steps": max_steps, "log_every": 1, "accelerator": "cpu", "num_nodes": 8},
    }  # num_nodes 8: a config written for another cluster; the launcher's --nodes wins
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "cfg.yaml"


def _launch(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["launch", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _slurm_env(shims: Path) -> dict[str, str]:
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS and not k.startswith("SLURM_")}
    return {**env, "PATH": f"{shims}:{env['PATH']}", "SHIM_LOG": str(shims), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(port), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "my-run",
            "SLURM_NNODES": "1", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "1",
            "SLURM_NODELIST": "127.0.0.1"}  # fmt: skip


def _script(tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, max_steps: int) -> Path:
    """Writes the sbatch script from tmp_path/submit with relative paths, as a user would."""
    submit = tmp_path / "submit"
    submit.mkdir()
    _config(submit, spec, max_steps)
    cwd = os.getcwd()
    os.chdir(submit)
    try:
        code, out, err = _launch(capsys, "slurm", "--config", "cfg.yaml", "--name", "my-run", "--nodes", "1",
                                 "--gpus-per-node", "2", "--out-dir", "runs", "--python", sys.executable,
                                 "optim.warmup_steps=2")  # fmt: skip
    finally:
        os.chdir(cwd)
    assert code == 0, err
    assert f"#SBATCH --chdir={submit}" in out and "#SBATCH --job-name=my-run" in out
    (tmp_path / "job.sbatch").write_text(out)
    return tmp_path / "job.sbatch"


def _steps(run: Path) -> list[int]:
    with open(run / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r["loss"]]


def test_sbatch_script_trains_two_ranks_under_simulated_slurm(
    tmp_path: Path, pretrain_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _script(tmp_path, capsys, pretrain_spec, 2)
    shims = tmp_path / "shims"
    shims.mkdir()
    elsewhere = tmp_path / "elsewhere"  # sbatch may be run anywhere: the script's paths must not depend on it
    elsewhere.mkdir()
    done = subprocess.run(["bash", str(script)], cwd=elsewhere, env=_slurm_env(shims), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "submit" / "runs" / "my-run"
    assert _steps(run) == [1, 2]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["AIMv2DataModule"]["world"] == 2  # both ranks trained
    saved = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert (saved["num_nodes"], saved["devices"]) == (1, 2)  # --nodes / --gpus-per-node, not the config's 8 nodes
    assert "--cpus-per-task=1" in (shims / "srun.args").read_text().split()
    assert (run / "summary.json").exists() and not (shims / "scontrol.calls").exists()


def test_preempted_sbatch_job_waits_for_the_ranks_and_requeues(
    tmp_path: Path, pretrain_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Preemption: SIGTERM reaches the batch shell, the ranks get the signal through srun (here SIGUSR1, the time
    limit warning): the shell must outlive it, wait for the ranks' checkpoint, then requeue the job."""
    script = _script(tmp_path, capsys, pretrain_spec, 500)
    shims = tmp_path / "shims"
    shims.mkdir()
    job = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=_slurm_env(shims), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    run = tmp_path / "submit" / "runs" / "my-run"
    t0 = time.time()
    while not ((run / "metrics.csv").exists() and len(_steps(run)) >= 2):
        assert job.poll() is None, job.communicate()[0][-3000:]
        assert time.time() - t0 < 240, "no training step in time"
        time.sleep(0.3)
    job.send_signal(signal.SIGTERM)  # the batch shell
    os.kill(int((shims / "srun.pid").read_text()), signal.SIGUSR1)  # srun passes it on to the ranks
    out = job.communicate(timeout=240)[0]
    assert job.returncode == 75, out[-3000:]  # EX_TEMPFAIL: stopped with a checkpoint, to be resumed
    assert (shims / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    step = int((run / "PREEMPTED").read_text().split()[1])
    assert 2 <= step < 500
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    assert not (run / "summary.json").exists()  # a stopped run is not a finished one
    assert f"stopped at step {step}" in out and "--resume" in out


def test_launch_carries_the_shape_and_every_override(
    tmp_path: Path, pretrain_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(_config(tmp_path, pretrain_spec, 10))
    code, out, _ = _launch(capsys, "torchrun", "--config", cfg, "--name", "l14", "--nodes", "2", "--gpus-per-node",
                           "8", "--rdzv-endpoint", "head:29500", "--max-restarts", "3", "--out-dir",
                           str(tmp_path / "scratch"), "model.depth=12")  # fmt: skip
    assert code == 0
    for part in ("--rdzv-endpoint head:29500", "--max-restarts 3", "model.depth=12", "trainer.num_nodes=2",
                 "trainer.devices=8", f"run.out_dir={tmp_path / 'scratch'}", "run.name=l14"):  # fmt: skip
        assert part in out, part
    code, out, err = _launch(capsys, "slurm", "--config", cfg, "--name", "l14", "--nodes", "2", "--gpus-per-node", "8")
    assert code == 0 and "trainer.num_nodes=2 trainer.devices=8" in out and "OMP_NUM_THREADS=" in out
    assert err == ""  # the config left devices to the launcher: nothing it said is overridden
    # a config that says 8 nodes x 8 devices, launched on 2 x 8: the shrunken global batch is pointed out
    code, out, err = _launch(capsys, "slurm", "--config", cfg, "--name", "l14", "--nodes", "2", "--gpus-per-node", "8",
                             "trainer.devices=8")  # fmt: skip
    assert code == 0 and "global batch is 64, not 256" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["slurm", "--nodes", "2", "trainer.num_nodes=8"], "'trainer.num_nodes=8' contradicts --nodes 2"),
        (["torchrun", "--gpus-per-node", "4", "trainer.devices=2"], "contradicts --gpus-per-node 4"),
        (["slurm", "--out-dir", "a", "run.out_dir=b"], "contradicts --out-dir a"),
        (["slurm", "model.deph=12"], "'model.deph'"),
        (["torchrun", "optim.lr=abc"], "optim.lr"),
        (["torchrun", "--nodes", "2"], "--rdzv-endpoint"),
        (["torchrun", "--nodes", "2", "--rdzv-endpoint", "head"], "HOST:PORT"),
        (["torchrun", "--max-restarts", "-1"], "--max-restarts"),
        (["slurm", "--name", "interactive"], "interactive"),
        (["slurm", "--nodes", "0"], "--nodes"),
        (["slurm", "--nodes", "3", "--gpus-per-node", "8", "trainer.global_batch_size=100"], "global_batch_size"),
    ],
)
def test_launch_refuses_bad_input_when_writing(
    tmp_path: Path, pretrain_spec: str, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    cfg = str(_config(tmp_path, pretrain_spec, 10))
    target, rest = args[0], args[1:]
    if "--name" not in rest:
        rest = ["--name", "r", *rest]
    code, out, err = _launch(capsys, target, "--config", cfg, *rest)
    assert code == 2 and out == ""
    assert err.startswith("aimpre: error: ") and message in err and len(err.splitlines()) == 1, err


def test_torchrun_commands_run_as_two_nodes(
    tmp_path: Path, pretrain_spec: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The printed multi-node command, run on two 'nodes' of one process each (a c10d rendezvous on this host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    _config(tmp_path, pretrain_spec, 2)
    code, out, err = _launch(capsys, "torchrun", "--config", "cfg.yaml", "--name", "two-nodes", "--nodes", "2",
                             "--gpus-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
                             "--out-dir", "runs")  # fmt: skip
    assert code == 0, err
    command = out.splitlines()[-1]  # the line after the comment: the same on every node
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(["bash", "-c", command], cwd="/", env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    run = tmp_path / "runs" / "two-nodes"
    assert _steps(run) == [1, 2]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["AIMv2DataModule"]["world"] == 2
    saved = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert (saved["num_nodes"], saved["devices"]) == (2, 1)
