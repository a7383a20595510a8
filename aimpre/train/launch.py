"""Launch commands for one node, several nodes and SLURM, all running the same ``aimpre train`` and config.

Lightning recognises torchrun's and SLURM's environments; ``aimpre train`` reads the node and device counts
from them (``trainer.num_nodes`` / ``trainer.devices`` left at their defaults), so one config serves all three.
Restarts pass ``--resume``: the run continues from its newest complete checkpoint.
"""

from __future__ import annotations

import shlex

SBATCH = """#!/bin/bash
# aimpre pretraining on SLURM: {nodes} node(s) x {gpus} GPU(s), requeued on preemption or time limit.
#SBATCH --job-name={name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={gpus}
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --requeue
#SBATCH --signal=USR1@180
#SBATCH --output=slurm-%x-%j.out
{extra}
# SIGUSR1 (180 s before the time limit) and SIGTERM (preemption) make every rank save a checkpoint at the next
# step and exit; the run leaves a PREEMPTED marker, and this script requeues the job, which resumes.
set -uo pipefail
status=0
srun --kill-on-bad-exit=1 {python} -m aimpre train --resume --config {config} run.name={name} \\
    run.out_dir={out_dir} {overrides} || status=$?
if [ -f {out_dir}/{name}/PREEMPTED ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""


def sbatch_script(
    config: str,
    name: str,
    nodes: int,
    gpus: int,
    time: str = "48:00:00",
    cpus: int = 8,
    out_dir: str = "runs",
    python: str = "python",
    overrides: tuple[str, ...] = (),
    sbatch_extra: tuple[str, ...] = (),
) -> str:
    """An sbatch script that runs (and requeues) ``aimpre train`` with ``config``.

    Args:
        config: the YAML config.
        name: run name (the job and the run directory).
        nodes, gpus: nodes and GPUs per node (one task per GPU).
        time: the job's time limit.
        cpus: CPUs per task (data workers + 1).
        out_dir: run.out_dir.
        python: the interpreter of the environment aimpre is installed in.
        overrides: extra ``section.key=value`` overrides.
        sbatch_extra: extra ``#SBATCH`` options, e.g. ``--account=x``.
    """
    if nodes < 1 or gpus < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus}")
    return SBATCH.format(
        name=name, nodes=nodes, gpus=gpus, cpus=cpus, time=time, out_dir=shlex.quote(out_dir),
        python=shlex.quote(python), config=shlex.quote(config), overrides=" ".join(map(shlex.quote, overrides)),
        extra="\n".join(f"#SBATCH {shlex.quote(x)}" for x in sbatch_extra),
    )  # fmt: skip


def torchrun_commands(config: str, name: str, gpus: int, nodes: int = 1, endpoint: str = "HEAD_NODE:29500") -> str:
    """The torchrun command(s): one node, or every node of a multi-node rendezvous."""
    train = f"-m aimpre train --resume --config {shlex.quote(config)} run.name={shlex.quote(name)}"
    if nodes == 1:
        return f"torchrun --standalone --nproc-per-node {gpus} {train}"
    return (
        f"# on each of the {nodes} nodes (same command; the c10d rendezvous on {endpoint} assigns ranks):\n"
        f"torchrun --nnodes {nodes} --nproc-per-node {gpus} --rdzv-backend c10d --rdzv-endpoint {endpoint} "
        f"--rdzv-id {shlex.quote(name)} {train}"
    )
