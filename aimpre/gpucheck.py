"""``aimpre bench gpu``: the one-command device check (issue 11 point 7), one markdown report.

Runs, in order and each in its own subprocess with a timeout and its output captured: the GPU correctness tests
(``pytest -m gpu -q``), then ``aimpre bench attention``, ``bench ops``, ``bench step`` and ``bench fp8``, each with
``--out`` so that its markdown report is embedded. A step whose command this checkout lacks, that fails or that
times out is reported as such and the check goes on. One total budget (default 480 s, to fit a 10-minute device
window with start-up to spare) shrinks the timeouts of later steps; the report says which were cut.

The report: a header (date, commit, device, driver, versions, optional packages), a summary table (step, status,
exit code, seconds), every "met" / "NOT met" verdict line of the benches, then each step's report or output.
Without CUDA it refuses unless ``allow_cpu`` (tests, dry runs), which runs each bench's ``--quick`` mode.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aimpre import __version__
from aimpre.files import write_text

ROOT = Path(__file__).resolve().parents[1]  # the checkout (through the link view's symlinks too)
OPTIONAL = ("liger-kernel", "torchao", "xformers")
MIN_STEP_S = 20.0  # a step is not started with less of the budget left
# a verdict: the word "met" or "NOT met" on its own (not "metric", "meta", "met_x")
VERDICT = re.compile(r"(?<![\w-])(NOT met|met)(?![\w-])")


@dataclass(frozen=True)
class Step:
    """One step of the check.

    Args:
        name: short name (``--steps`` selects by it).
        argv: the command after ``python``: ``("-m", "pytest", ...)``, or for a bench ``("-m", "aimpre", "bench",
            NAME)``, to which ``--out`` (and ``--quick`` in a CPU dry run) are added when the bench takes them.
        timeout_s: the most this step may take; the remaining budget may cut it.
        bench: the ``aimpre bench`` subcommand it runs (None: not a bench); absent from this checkout's parser,
            the step is reported as absent instead of run.
    """

    name: str
    argv: tuple[str, ...]
    timeout_s: float
    bench: str | None = None


def _bench(name: str, timeout_s: float, *args: str) -> Step:
    return Step(name, ("-m", "aimpre", "bench", name, *args), timeout_s, bench=name)


# Caps, each what the step should take on an H100/H200 with room to spare; together more than the budget, which
# cuts the later ones when the earlier ones ran long.
STEPS = (
    Step("tests", ("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"), 180),
    _bench("attention", 180),
    _bench("ops", 90),
    _bench("step", 150),
    # AIMv2-L's first 300 steps at batch 32 (bench fp8's default is 64): about 2 minutes with both compiles
    _bench("fp8", 180, "--batch", "32"),
)
STEP_NAMES = tuple(s.name for s in STEPS)


@dataclass
class Result:
    step: Step
    status: str  # ok | failed | timed out | absent | not run
    seconds: float = 0.0
    exit_code: int | None = None
    command: str = ""
    output: str = ""  # stdout and stderr together
    report: str = ""  # the bench's --out file
    cut: str = ""  # how the budget shortened its timeout
    detail: str = ""  # what else the status needs said

    def status_text(self) -> str:
        return self.status + "".join(f" ({x})" for x in (self.detail, self.cut) if x)

    @property
    def failed(self) -> bool:
        return self.status in ("failed", "timed out", "not run")


@dataclass
class _Env:
    cpu: bool  # a dry run without CUDA
    quick: bool  # benches in their quick mode (always so in a CPU dry run)
    options: dict[str, set[str]] = field(default_factory=dict)  # bench name -> its option strings


def _bench_options() -> dict[str, set[str]]:
    """Every ``aimpre bench`` subcommand of this checkout and the options it takes."""
    from aimpre.cli import build_parser

    def children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        return next((dict(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})

    bench = children(build_parser()).get("bench")
    benches = children(bench) if bench else {}
    return {name: {o for a in p._actions for o in a.option_strings} for name, p in benches.items()}


def _python() -> list[str]:
    # -P (set when this process runs under it): the checkout's own aimpre/ must not shadow a link view on PYTHONPATH
    return [sys.executable, *(["-P"] if getattr(sys.flags, "safe_path", False) else [])]


def _tail(text: str, lines: int) -> str:
    kept = text.rstrip("\n").splitlines()
    cut = len(kept) - lines
    return "\n".join(([f"[... {cut} lines before]"] if cut > 0 else []) + kept[-lines:])


def _shown(step: Step) -> list[str]:
    return ["python", *_python()[1:], *step.argv]


def _is_tests(step: Step) -> bool:
    return step.argv[:2] == ("-m", "pytest")


def _absent(step: Step, env: _Env) -> str | None:
    """Why this checkout cannot run ``step``, or None."""
    if step.bench is not None and step.bench not in env.options:
        return f"no `aimpre bench {step.bench}` in this checkout"
    if _is_tests(step) and not (ROOT / "tests").is_dir():
        return f"no tests/ folder in {ROOT}"
    return None


def _run_step(step: Step, timeout_s: float, env: _Env, tmp: Path) -> Result:
    """Runs one step in a new session (so a timeout kills its workers too) with its output in a file."""
    argv, shown = [*_python(), *step.argv], _shown(step)
    report = tmp / f"{step.name}.md"
    if step.bench is not None:
        extra = (["--quick"] if env.quick and "--quick" in env.options[step.bench] else []) + (
            ["--out", str(report)] if "--out" in env.options[step.bench] else []
        )
        argv += extra
        shown += [report.name if x == str(report) else x for x in extra]
    log = tmp / f"{step.name}.log"
    t0 = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        try:
            code: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # the step and what it started (compile workers, ...)
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    seconds = time.monotonic() - t0
    status = "timed out" if code is None else "ok" if code == 0 else "failed"
    r = Result(step, status, seconds, code, " ".join(shown), log.read_text(errors="replace"),
               report.read_text() if report.exists() else "")  # fmt: skip
    if _is_tests(step) and code == 5:  # pytest's "no tests collected": a check that checked nothing
        r.detail = "no test selected"
    return r


def run_check(out: str | Path, budget_s: float = 480.0, allow_cpu: bool = False, quick: bool = False,
              steps: Sequence[Step] = STEPS) -> tuple[str, bool]:  # fmt: skip
    """Runs ``steps`` in order within ``budget_s`` and writes the report to ``out`` (atomically).

    Args:
        out: the markdown report to write.
        budget_s: seconds for all steps together; a step gets at most what is left, none below ``MIN_STEP_S``.
        allow_cpu: run without CUDA (a dry run: benches in their quick mode), else refuse.
        quick: run the benches in their quick mode (a smoke test of the check itself).
        steps: what to run (default: ``STEPS``).

    Returns:
        The report, and whether no step failed, timed out or was left unrun by the budget (a step this
        checkout lacks does not count).
    """
    import torch

    cpu = not torch.cuda.is_available()
    if cpu and not allow_cpu:
        raise ValueError("bench gpu: no CUDA device here (torch.cuda.is_available() is False); --allow-cpu runs "
                         "each step on CPU as a dry run (benches in their quick mode)")  # fmt: skip
    env = _Env(cpu, quick or cpu, _bench_options())
    start, results = time.monotonic(), []
    with tempfile.TemporaryDirectory(prefix="aimpre-gpu-check-") as tmp:
        for i, step in enumerate(steps, 1):
            left = budget_s - (time.monotonic() - start)
            absent = _absent(step, env)
            if absent:
                r = Result(step, "absent", command=" ".join(_shown(step)), output=absent)
            elif left < MIN_STEP_S:
                r = Result(
                    step, "not run", command=" ".join(_shown(step)), output=f"{max(left, 0):.0f} s of budget left"
                )
            else:
                print(f"[gpu-check {i}/{len(steps)}] {step.name} (timeout {min(step.timeout_s, left):.0f} s)",
                      file=sys.stderr, flush=True)  # fmt: skip
                r = _run_step(step, min(step.timeout_s, left), env, Path(tmp))
                if left < step.timeout_s:
                    r.cut = f"timeout {step.timeout_s:.0f} -> {left:.0f} s"
            print(f"[gpu-check {i}/{len(steps)}] {step.name}: {r.status} ({r.seconds:.0f} s)", file=sys.stderr,
                  flush=True)  # fmt: skip
            results.append(r)
    report = _report(results, env, budget_s, time.monotonic() - start)
    write_text(out, report)
    return report, not any(r.failed for r in results)


def _verdicts(r: Result) -> list[str]:
    if _is_tests(r.step):  # test names are no verdicts
        return []
    text = r.report or r.output
    return [
        f"- [{r.step.name}] {line.strip().removeprefix('- ')}" for line in text.splitlines() if VERDICT.search(line)
    ]


def _section(r: Result) -> list[str]:
    exit_code = "" if r.exit_code is None else f", exit {r.exit_code}"
    lines = [f"## {r.step.name}: `{r.command}`", "", f"{r.status_text()}{exit_code}, {r.seconds:.0f} s", ""]
    if r.report:
        lines += [r.report.strip(), ""]
    if not r.report or r.status != "ok":  # the output when there is no report, or to say what went wrong
        n = 30 if r.status == "ok" and r.step.bench is None else 150 if r.status == "ok" else 80
        lines += ["```text", _tail(r.output, n) or "(no output)", "```", ""]
    return lines


def _run(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _header(env: _Env, budget_s: float, seconds: float) -> list[str]:
    import torch

    from aimpre.kernels.bench import dist_version

    commit = _run(["git", "rev-parse", "--short=12", "HEAD"])
    if commit is None:
        git = "unknown (not a git checkout, or no git)"
    else:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        git = f"{commit.strip()}" + (" (dirty: uncommitted changes)" if dirty else "")
    smi = _run(["nvidia-smi"]) if shutil.which("nvidia-smi") else None
    if smi is None:
        driver = "nvidia-smi: not found"
    else:
        found = {k: re.search(rf"{k} Version:\s*(\S+)", smi) for k in ("Driver", "CUDA")}
        driver = ", ".join(f"{k} {m.group(1) if m else '?'}" for k, m in found.items()) + " (nvidia-smi)"
    device = (
        "none: CPU dry run (--allow-cpu); times say nothing about GPUs" if env.cpu else torch.cuda.get_device_name()
    )
    return [
        f"# GPU check, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "",
        f"- commit: {git}; aimpre {__version__} imported from {Path(__file__).parent}",
        f"- device: {device}; {driver}",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), {dist_version('triton')}, "
        f"python {platform.python_version()}",
        f"- optional packages: {', '.join(map(dist_version, OPTIONAL))}",
        f"- benches: {'quick mode (smoke versions: their numbers mean nothing)' if env.quick else 'full runs'}; "
        f"{seconds:.0f} s in all, budget {budget_s:.0f} s",
    ]


def _report(results: list[Result], env: _Env, budget_s: float, seconds: float) -> str:
    lines = [*_header(env, budget_s, seconds), "", "| step | command | status | exit | seconds |",
             "|---|---|---|---:|---:|"]  # fmt: skip
    for r in results:
        exit_code = "-" if r.exit_code is None else str(r.exit_code)
        lines.append(f"| {r.step.name} | `{r.command}` | {r.status_text()} | {exit_code} | {r.seconds:.0f} |")
    cut = [f"{r.step.name} ({r.cut or r.output})" for r in results if r.cut or r.status == "not run"]
    lines += ["", f"Cut by the budget: {', '.join(cut)}." if cut else "No step was cut by the budget."]
    verdicts = [v for r in results for v in _verdicts(r)]
    lines += ["", "## Verdicts", "", *(verdicts or ["(no verdict line in any report)"]), ""]
    for r in results:
        lines += _section(r)
    return "\n".join(lines)
