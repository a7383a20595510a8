"""Launch commands for one node, several nodes and SLURM, all running the same ``aimpre train`` and config.

The launch's shape is written into the command every rank runs (``trainer.num_nodes``, ``trainer.devices``), so a
config written for another cluster cannot contradict it, and the config is loaded with every override when the
script is written: a bad key fails here, not on the cluster after the queue wait. Paths become absolute and the
job runs in the directory the script was written from, so relative data paths mean what they meant here.
Restarts pass ``--resume``: the run continues from its newest complete checkpoint.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from aimpre.config import Config, ConfigError, load_config, parse_override
from aimpre.quoting import one_line, plain_name, sbatch_quote
from aimpre.train.run import _accumulate

SBATCH = """#!/bin/bash
# aimpre pretraining on SLURM: {nodes} node(s) x {gpus} GPU(s), one task per GPU, requeued on preemption or at the
# time limit. Written by `aimpre launch slurm`; the job runs in {cwd_comment}.
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={gpus}
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --chdir={chdir}
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@180
{extra}# SIGUSR1 (180 s before the time limit, sent to the ranks) and SIGTERM (preemption, sent to the ranks and to this
# shell) make every rank save a checkpoint at the next step and exit with status 75, leaving a PREEMPTED marker in
# the run directory that names this job; this script then requeues the job, which resumes. It requeues on nothing
# else: a run that crashes (even a resumed one that crashes before training) ends the job. The log is appended
# to, so requeues add to it.
set -uo pipefail
export OMP_NUM_THREADS={omp}  # the task's CPUs minus one per data worker (workers run single-threaded)
run_dir={run_dir}
marker="$run_dir/PREEMPTED"
# a marker left by an earlier job (or an earlier start of this one) must not make this one requeue
rm -f "$marker"
# Without a trap, SIGTERM would kill this shell at once and nothing would requeue; with one, `wait` returns early
# and the loop below waits again until srun (which passes the signal on to the ranks) has finished.
preempted=0
trap 'preempted=1; echo "aimpre: SIGTERM: waiting for the ranks to save a checkpoint" >&2' TERM
# Slurm >= 22.05 no longer passes the job's --cpus-per-task on to srun: without it every rank gets one CPU.
srun --kill-on-bad-exit=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" {python} -m aimpre {train_args} &
srun_pid=$!
wait "$srun_pid"
status=$?
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid"
    status=$?
done
# Preempted: the ranks exit 75 once the checkpoint and the marker are written. srun reports its tasks' highest
# status, and 128 + a signal for a task it killed (--kill-on-bad-exit stops the others once one exits 75, and
# SLURM kills what is left at the end of the grace time), so those count too, but only beside this job's marker.
# A SIGTERM that reached this shell while the ranks were still starting (before they could note it) kills them
# with no marker: the job was stopped all the same, so a signal death after one requeues too.
requeue=0
if [ "$status" -eq 75 ] || [ "$status" -gt 128 ]; then
    if grep -qxF "slurm job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}}" "$marker" 2>/dev/null; then
        requeue=1
    fi
fi
if [ "$preempted" -eq 1 ] && [ "$status" -gt 128 ]; then
    requeue=1
fi
if [ "$requeue" -eq 1 ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""

_ENDPOINT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


def train_args(
    config: str | Path, name: str, nodes: int, gpus: int, out_dir: str | None, overrides: tuple[str, ...]
) -> tuple[list[str], Config]:
    """The ``aimpre train`` arguments every rank runs, and the config they resolve to (loaded here to check it).

    Args:
        config: the YAML config.
        name: run name.
        nodes, gpus: nodes and processes (GPUs) per node: written as trainer.num_nodes / trainer.devices.
        out_dir: runs folder (None: the config's run.out_dir); made absolute.
        overrides: ``section.key=value`` overrides; ones that contradict the other arguments are refused.
    """
    if nodes < 1 or gpus < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus}")
    plain_name(name, "--name")  # the run directory, the job name and the rendezvous id: one plain component
    flags = {"run.name": ("--name", name), "trainer.num_nodes": ("--nodes", nodes),
             "trainer.devices": ("--gpus-per-node", gpus)}  # fmt: skip
    if out_dir is not None:
        flags["run.out_dir"] = ("--out-dir", out_dir)
    for item in overrides:
        (section, key), value = parse_override(item)
        flag = flags.get(f"{section}.{key}")
        if flag is not None and value != flag[1]:
            raise ConfigError(f"override {item!r} contradicts {flag[0]} {flag[1]}: drop one of them")
    shape = [f"run.name={_yaml_str(name)}", f"trainer.num_nodes={nodes}", f"trainer.devices={gpus}"]
    config = Path(config).resolve()
    cfg = load_config(config, [*overrides, *shape])  # a bad key fails here, not on the cluster after the queue wait
    _accumulate(cfg, nodes * gpus)  # trainer.global_batch_size must divide over this many ranks
    _note_shape_change(load_config(config, overrides), cfg)
    out = str(Path(out_dir if out_dir is not None else cfg.run.out_dir).resolve())
    args = ["train", "--resume", "--config", str(config), *overrides, *shape, f"run.out_dir={_yaml_str(out)}"]
    return args, replace(cfg, run=replace(cfg.run, out_dir=out))


def _note_shape_change(written: Config, launched: Config) -> None:
    """Says on stderr when the launch replaces the config's own node/device counts, and what that does to the
    global batch (unless trainer.global_batch_size pins it): a config for 8 nodes run on 2 trains 4x smaller."""
    w, n = written.trainer, launched.trainer
    if (w.num_nodes, w.devices) == (n.num_nodes, n.devices) or w.devices == "auto":
        return
    note = f"aimpre: note: the config sets {w.num_nodes} node(s) x {w.devices} device(s); the launch runs " \
           f"{n.num_nodes} x {n.devices}"  # fmt: skip
    if n.global_batch_size is None and isinstance(w.devices, int) and isinstance(n.devices, int):
        per = launched.data.batch_size * n.accumulate_grad_batches
        note += (f": the global batch is {per * n.num_nodes * n.devices}, not {per * w.num_nodes * w.devices} "
                 f"(set trainer.global_batch_size to keep it by accumulating gradients)")  # fmt: skip
    print(note, file=sys.stderr)


def _yaml_str(value: str) -> str:
    """``value`` as an override value that parses back to this string (JSON strings are YAML: "123", "on" stay)."""
    try:
        plain = yaml.safe_load(value) == value
    except yaml.YAMLError:
        plain = False
    return value if plain else json.dumps(value)


def sbatch_script(
    config: str | Path,
    name: str,
    nodes: int,
    gpus: int,
    time: str = "48:00:00",
    cpus: int | None = None,
    out_dir: str | None = None,
    python: str = "python",
    overrides: tuple[str, ...] = (),
    sbatch_extra: tuple[str, ...] = (),
) -> str:
    """An sbatch script that runs (and requeues) ``aimpre train`` with ``config``, from the current directory.

    Args:
        config: the YAML config.
        name: run name (the job and the run directory).
        nodes, gpus: nodes and GPUs per node (one task per GPU).
        time: the job's time limit.
        cpus: CPUs per task (default: data.num_workers + 1).
        out_dir: run.out_dir (default: the config's).
        python: the interpreter of the environment aimpre is installed in.
        overrides: extra ``section.key=value`` overrides.
        sbatch_extra: extra ``#SBATCH`` options, e.g. ``--account=x``.
    """
    if name in ("bash", "interactive"):  # Lightning takes a job of these names for a shell and ignores SLURM
        raise ValueError(f"--name {name!r} is a name Lightning reserves for interactive SLURM jobs: choose another")
    args, cfg = train_args(config, name, nodes, gpus, out_dir, overrides)
    workers = cfg.data.num_workers
    cpus = workers + 1 if cpus is None else cpus
    if cpus < 1:
        raise ValueError(f"--cpus must be >= 1, got {cpus}")
    cwd = str(Path.cwd())
    # every value is one line (refused otherwise, naming its flag): #SBATCH lines cannot quote a newline, and one
    # would start a script line of its own; bash gets the rest through shlex
    return SBATCH.format(
        nodes=nodes, gpus=gpus, cpus=cpus, time=sbatch_quote(time, "--time"), job_name=sbatch_quote(name, "--name"),
        chdir=sbatch_quote(cwd, "the current directory"), cwd_comment=cwd, omp=max(1, cpus - workers),
        extra="".join(f"#SBATCH {sbatch_quote(x, '--sbatch')}\n" for x in sbatch_extra),
        run_dir=shlex.quote(str(Path(cfg.run.out_dir) / name)), python=shlex.quote(one_line(python, "--python")),
        train_args=shlex.join(args),
    )  # fmt: skip


def torchrun_commands(
    config: str | Path,
    name: str,
    gpus: int,
    nodes: int = 1,
    endpoint: str | None = None,
    max_restarts: int = 0,
    out_dir: str | None = None,
    overrides: tuple[str, ...] = (),
) -> str:
    """The torchrun command(s): one node, or the command every node of a multi-node rendezvous runs.

    Args:
        config, name, out_dir, overrides: as ``sbatch_script``.
        gpus: processes per node.
        nodes: nodes; more than one needs ``endpoint``.
        endpoint: HOST:PORT of the c10d rendezvous (a port free on the first node).
        max_restarts: times torchrun restarts failed workers; each restart resumes from the last checkpoint.
    """
    if max_restarts < 0:
        raise ValueError(f"--max-restarts must be >= 0, got {max_restarts}")
    args, _ = train_args(config, name, nodes, gpus, out_dir, overrides)
    cd = f"cd {shlex.quote(str(Path.cwd()))} && "  # relative data paths in the config mean what they mean here
    train = f"-m aimpre {shlex.join(args)}"
    restarts = f"--max-restarts {max_restarts}"
    if nodes == 1:
        return f"{cd}torchrun --standalone --nproc-per-node {gpus} {restarts} {train}"
    if endpoint is None:
        raise ValueError(f"--nodes {nodes} needs --rdzv-endpoint HOST:PORT (the first node and a free port on it)")
    if not _ENDPOINT.match(endpoint):
        raise ValueError(f"--rdzv-endpoint must be HOST:PORT, got {endpoint!r}")
    return (
        f"# on each of the {nodes} nodes (same command; the c10d rendezvous on {endpoint} assigns ranks):\n"
        f"{cd}torchrun --nnodes {nodes} --nproc-per-node {gpus} --rdzv-backend c10d --rdzv-endpoint {endpoint} "
        f"--rdzv-id {shlex.quote(name)} {restarts} {train}"
    )
