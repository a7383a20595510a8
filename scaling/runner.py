"""Running a plan: locally one run after another (or a few at once), or as a SLURM array / command list.

Each point runs as its own process, ``python -m aimpre train --config configs/POINT.yaml --resume`` (this
module never imports Lightning), so a crash loses one point and a rerun continues: finished points (``summary.json``
and no ``PREEMPTED`` marker) are skipped, and a half-finished or preempted point resumes from its last checkpoint.
A cooldown branch starts by copying its trunk's step-N checkpoint (and metrics and tokenizer files) into its own run
folder, with ``last.ckpt`` linked to it; the resume then restores model, optimiser, step and data position, and
continues with the branch's schedule (``aimpre.train.run`` allows optim and trainer changes on resume, never model
changes). Points of one group (a trunk and its branches) run in order; groups are independent.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aimpre import files
from aimpre.quoting import one_line, sbatch_quote
from aimpre.scaling.collect import finished
from aimpre.scaling.sweep import load_plan


@dataclass
class Outcome:
    name: str
    status: str  # done | skipped | stopped (by a preemption signal: a rerun resumes it) | failed
    seconds: float
    log: Path | None = None


def groups(plan: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Points by group, each in run order (plan.json lists trunks before their branches)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for p in plan["points"]:
        out.setdefault(p["group"], []).append(p)
    return out


def prepare_branch(runs: Path, point: dict[str, Any]) -> None:
    """Seeds a branch's run folder from its trunk's checkpoint at the branch step (once)."""
    trunk, dst = runs / point["branch_from"], runs / point["name"]
    if (dst / "checkpoints" / "last.ckpt").exists():
        return  # seeded before (or already running): the resume continues from there
    ckpt = trunk / "checkpoints" / f"step-{point['branch_step']}.ckpt"
    if not ckpt.exists():
        raise FileNotFoundError(f"branch {point['name']} needs {ckpt}: has the trunk {point['branch_from']} run?")
    (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    for f in trunk.iterdir():  # config, tokenizer identity, metrics up to the branch step (the resume trims them)
        if f.is_file() and f.name not in ("summary.json", "PREEMPTED") and not f.name.startswith("."):
            files.copy(f, dst / f.name)
    # the run layout: step-N.ckpt (a file, or a directory of shards), and last.ckpt a relative link to it
    files.copy(ckpt, dst / "checkpoints" / ckpt.name)
    files.symlink(ckpt.name, dst / "checkpoints" / "last.ckpt")


def train_command(config: Path, launcher: str | None = None) -> list[str]:
    """The command that trains one point; ``launcher`` (e.g. "torchrun --nproc_per_node 8") replaces python."""
    head = shlex.split(launcher) if launcher else [sys.executable]
    return [*head, "-m", "aimpre", "train", "--config", str(config), "--resume"]


def run_point(
    plan_dir: Path,
    point: dict[str, Any],
    launcher: str | None = None,
    threads: int | None = None,
    live: set[subprocess.Popen] | None = None,
) -> Outcome:
    """Trains one point unless it has finished; output goes to ``plan_dir/logs/NAME.log``.

    Args:
        plan_dir: the plan folder.
        point: the point's entry in plan.json.
        launcher: as ``run_plan``.
        threads: as ``run_plan``.
        live: the training process is kept here while it runs (so an interrupted runner can stop it).
    """
    runs = plan_dir / "runs"
    if finished(runs / point["name"]):
        return Outcome(point["name"], "skipped", 0.0)
    if point["kind"] == "branch":
        prepare_branch(runs, point)
    log = plan_dir / "logs" / f"{point['name']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:  # one thread per run is much faster than two fighting threads when runs share cores
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(train_command(plan_dir / point["config"], launcher), stdout=f,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip
        if live is not None:
            live.add(proc)
        try:
            rc = proc.wait()
        finally:
            if live is not None:
                live.discard(proc)
    run = runs / point["name"]
    status = "done" if rc == 0 and finished(run) else "stopped" if (run / "PREEMPTED").exists() else "failed"
    return Outcome(point["name"], status, time.perf_counter() - t0, log)


def run_plan(
    plan_dir: str | Path,
    jobs: int = 1,
    launcher: str | None = None,
    threads: int | None = None,
    only_group: str | None = None,
    report: Callable[[Outcome, int, int], None] | None = None,
) -> list[Outcome]:
    """Runs every point of a plan; groups run ``jobs`` at a time, a group's points in order.

    A failed or stopped point stops its group (its branches need it); the other groups go on.

    Args:
        plan_dir: the folder ``plan`` wrote.
        jobs: groups run concurrently.
        launcher: replaces the python interpreter in each training command (e.g. torchrun).
        threads: OMP/MKL threads per training process (None: the environment's).
        only_group: run just this group (a SLURM array task).
        report: called after each point with (outcome, points finished, points in all).
    """
    pdir = Path(plan_dir).resolve()
    plan = load_plan(pdir)
    todo = groups(plan)
    if only_group is not None:
        if only_group not in todo:
            raise ValueError(f"no group {only_group!r} in {pdir}/plan.json; groups: {', '.join(todo)}")
        todo = {only_group: todo[only_group]}
    # longest groups first: with several workers the big model's chain must not start last (LPT scheduling)
    todo = dict(sorted(todo.items(), key=lambda kv: -sum(p["flops"] for p in kv[1])))
    total = sum(len(v) for v in todo.values())
    results: list[Outcome] = []
    lock = threading.Lock()
    live: set[subprocess.Popen] = set()
    stop = threading.Event()

    def one_group(points: list[dict[str, Any]]) -> None:
        for i, p in enumerate(points):
            if stop.is_set():
                return
            out = run_point(pdir, p, launcher, threads, live)
            with lock:
                results.append(out)
                if report:
                    report(out, len(results), total)
            if out.status in ("failed", "stopped"):
                for rest in points[i + 1 :]:
                    with lock:
                        results.append(Outcome(rest["name"], "failed", 0.0))
                        if report:
                            report(results[-1], len(results), total)
                return

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        futures = [pool.submit(one_group, pts) for pts in todo.values()]
        while not all(f.done() for f in futures):
            time.sleep(0.2)  # a sleeping main thread takes Ctrl-C; one blocked in Future.result() does not
        for f in futures:
            f.result()
    except BaseException:  # Ctrl-C: stop the training processes too (each resumes from its last checkpoint)
        stop.set()
        for proc in list(live):
            proc.terminate()
        for proc in list(live):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def slurm_script(plan_dir: str | Path, launcher: str | None = None, sbatch: tuple[str, ...] = ()) -> str:
    """A SLURM array script: one task per group (a trunk and its branches run in order inside one task).

    Args:
        plan_dir: the plan folder.
        launcher: as ``run_plan`` (e.g. "torchrun --nproc_per_node 8").
        sbatch: extra ``#SBATCH`` options, e.g. ("--gres=gpu:8", "--time=24:00:00").
    """
    pdir = Path(plan_dir).resolve()
    plan = load_plan(pdir)  # its sweep and group names are plain names (checked there)
    names = list(groups(plan))
    where = one_line(str(pdir), "the plan folder")
    cmd = ["aimpre", "scaling", "run", shlex.quote(where), "--group", '"${RUN_GROUPS[$SLURM_ARRAY_TASK_ID]}"']
    if launcher:
        cmd += ["--launcher", shlex.quote(one_line(launcher, "--launcher"))]
    # every #SBATCH value quoted for sbatch (a newline is refused: it would start a script line of its own)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={sbatch_quote(plan['sweep'], 'plan.json: sweep')}",
        f"#SBATCH --array=0-{len(names) - 1}",
        f"#SBATCH --output={sbatch_quote(f'{where}/logs/slurm-%A_%a.out', 'the plan folder')}",
        *(f"#SBATCH {sbatch_quote(opt, '--sbatch')}" for opt in sbatch),
        f"# {len(plan['points'])} runs of sweep {plan['sweep']!r} ({plan['design']}), one array task per group",
        "set -euo pipefail",
        "RUN_GROUPS=(" + " ".join(shlex.quote(n) for n in names) + ")",
        " ".join(cmd),
    ]
    return "\n".join(lines) + "\n"


def command_list(plan_dir: str | Path, launcher: str | None = None) -> str:
    """One shell command per group, for any scheduler (each runs its group's points in order, skipping done ones)."""
    pdir = Path(plan_dir).resolve()
    extra = f" --launcher {shlex.quote(one_line(launcher, '--launcher'))}" if launcher else ""
    names = groups(load_plan(pdir))
    where = shlex.quote(one_line(str(pdir), "the plan folder"))  # one command per line, whatever reads the list
    return "".join(f"aimpre scaling run {where} --group {shlex.quote(g)}{extra}\n" for g in names)
