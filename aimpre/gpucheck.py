"""``aimpre bench gpu``: the one-command device check (issue 11 point 7), one markdown report.

Runs, in order and each in its own subprocess with a timeout and its output captured, a fast tier and then the rest
in order of value (``STEPS``): first the bf16/fp16 kernel tests (``pytest -m "gpu and not gpu_rest"``, fixed Triton
tiles, pytest-xdist workers where it is installed), ``aimpre bench attention`` and ``bench step`` plain vs ours bf16;
then ``bench step``'s fp8 build, the second tier of tests (``-m gpu_rest``: fp32, autotune, sm_90 compiles, fp8,
liger), ``bench ops`` and ``bench fp8`` (a shortened loss curve). Benches get ``--out`` so that their markdown report
is embedded. A step whose command this checkout lacks, that fails or that times out is reported as such and the check
goes on. One total budget (default 480 s, to fit a 10-minute device window with start-up to spare) shrinks the
timeouts of later steps; the report says which were cut.

The plan: each step's expected seconds on a cold H100/H200 (``estimate_s``: Python and torch start-up, compiling,
then measuring) add up to ``PLAN_S`` at most, ``MARGIN_S`` under the budget, and the fast tier's timeouts fit the
budget whole, so that the budget can only cut the second tier (tests/test_gpucheck.py checks both). The estimates
are reasoned on CPU, not measured (no GPU has run this yet); see docs/benchmarks.md for how each was reached.

The report: a header (date, commit, device, driver, versions, optional packages), a summary table (step, status,
exit code, seconds), every "met" / "NOT met" verdict line of the benches, then each step's report or output.
Without CUDA it refuses unless ``allow_cpu`` (tests, dry runs), which runs each bench's ``--quick`` mode.
"""

from __future__ import annotations

import contextlib
import datetime
import json
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
BUDGET_S = 480.0  # one 10-minute device command, less start-up and wheel installs
MARGIN_S = 60.0  # the plan's estimates leave this much of the budget unused
PLAN_S = BUDGET_S - MARGIN_S
WORKERS = 4  # pytest-xdist workers for the test steps (each compiles its own Triton kernels: compiles are CPU-bound)
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
        estimate_s: the seconds it is expected to take on a cold H100/H200, compiles included (the plan).
        tier: "fast" (run first, never cut by the budget) or "rest" (in order of value, cut when time runs out).
    """

    name: str
    argv: tuple[str, ...]
    timeout_s: float
    bench: str | None = None
    estimate_s: float = 0.0
    tier: str = "rest"


def _bench(name: str, timeout_s: float, estimate_s: float, tier: str, *args: str, bench: str = "") -> Step:
    bench = bench or name
    return Step(name, ("-m", "aimpre", "bench", bench, *args), timeout_s, bench, estimate_s, tier)


def _tests(name: str, marks: str, timeout_s: float, estimate_s: float, tier: str) -> Step:
    return Step(name, ("-m", "pytest", "-m", marks, "-q", "-p", "no:cacheprovider"), timeout_s, None, estimate_s, tier)


# Estimates (seconds, cold machine, nothing in Triton's or Inductor's cache) from counting what each step compiles;
# the reasoning per step is in docs/benchmarks.md. Timeouts are about 1.5x the estimate.
STEPS = (
    # 30 tests, 4 workers: ~36 Triton kernel variants (fwd, dq, dkdv x 3 masks x 2 dtypes x 2 head dims) at ~3 s
    # each = ~110 s of compiling over 4 workers, plus ~15 s start-up per worker
    _tests("tests", "gpu and not gpu_rest", 90, 50, "fast"),
    # ours (6 kernels at D=128), Flex compiled fwd+bwd for two masks (~4 x 10 s), SDPA none; 20 reps each
    _bench("attention", 90, 55, "fast"),
    # two fresh processes: plain compiles AIMv2-L whole (one fwd+bwd graph, ~45 s), ours one block's graph reused
    # by the 36 blocks (~25 s) and our kernels (~10 s); 13 steps + 3 profiled each, ~10 s start-up each
    _bench("step", 190, 115, "fast", "--builds", "plain,bf16"),
    # the fp8 build alone: per-block compile with float8 linears (~35 s), start-up, 16 steps
    _bench("step-fp8", 80, 45, "rest", "--builds", "fp8", bench="step"),
    # 22 tests, 4 workers: fp32 kernels at AIMv2 sizes (the slowest compiles), autotune, sm_90, fp8, liger
    _tests("tests-rest", "gpu_rest", 110, 65, "rest"),
    # liger vs torch vs Inductor for 4 ops: 4 small Inductor compiles (~5 s each)
    _bench("ops", 60, 30, "rest"),
    # AIMv2-L loss curve, bf16 then fp8 (two per-block compiles, ~20 s each) over 40 steps at batch 32, logged every 5
    _bench("fp8", 90, 50, "rest", "--batch", "32", "--steps", "40", "--log-every", "5"),
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


# The ``aimpre bench`` commands the check runs and the options of theirs it adds (declared here rather than read from
# the CLI's parser, which would make this module import the CLI that imports it; tests/test_gpucheck.py checks them
# against the parser, and every option a step passes).
BENCH_OPTIONS: dict[str, set[str]] = {name: {"--quick", "--out"} for name in ("attention", "ops", "step", "fp8")}


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


def _workers() -> list[str]:
    """pytest-xdist's worker option where it is installed (the device machine gets it as a carried wheel)."""
    import importlib.util

    return ["-n", str(WORKERS)] if importlib.util.find_spec("xdist") else []


def _run_step(step: Step, timeout_s: float, env: _Env, tmp: Path) -> Result:
    """Runs one step in a new session (so a timeout kills its workers too) with its output in a file."""
    argv, shown = [*_python(), *step.argv], _shown(step)
    if _is_tests(step) and not env.cpu:  # (a CPU dry run keeps one process: CI's cores are few)
        argv += _workers()
        shown += _workers()
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


def run_check(out: str | Path, budget_s: float = BUDGET_S, allow_cpu: bool = False, quick: bool = False,
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
    env = _Env(cpu, quick or cpu, BENCH_OPTIONS)
    start, results = time.monotonic(), []
    rows = Path(out).with_suffix(".jsonl")  # a step a line, as each ends: a check killed mid-run leaves them
    write_text(rows, "")
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
            # the report so far (its summary lists the steps still to come) and the step's line
            write_text(out, _report(results, env, budget_s, time.monotonic() - start, steps[i:]))
            with rows.open("a") as f:
                f.write(json.dumps({"step": step.name, "tier": step.tier, "status": r.status_text(),
                                    "exit_code": r.exit_code, "seconds": round(r.seconds, 1),
                                    "planned_s": step.estimate_s, "command": r.command}) + "\n")  # fmt: skip
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


def _header(env: _Env, budget_s: float, seconds: float, running: bool = False) -> list[str]:
    import torch

    from aimpre.bench.timing import dist_version

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
        f"# GPU check, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
        + (" (in progress: the steps so far)" if running else ""),
        "",
        f"- commit: {git}; aimpre {__version__} imported from {Path(__file__).parent}",
        f"- device: {device}; {driver}",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), {dist_version('triton')}, "
        f"python {platform.python_version()}",
        f"- optional packages: {', '.join(map(dist_version, OPTIONAL))}",
        f"- benches: {'quick mode (smoke versions: their numbers mean nothing)' if env.quick else 'full runs'}; "
        f"{seconds:.0f} s in all, budget {budget_s:.0f} s",
    ]


def _report(results: list[Result], env: _Env, budget_s: float, seconds: float, pending: Sequence[Step] = ()) -> str:
    """The report; ``pending``: steps not yet started (a report written while the check runs)."""
    lines = [
        *_header(env, budget_s, seconds, bool(pending)),
        "",
        "| step | tier | command | status | exit | seconds | planned s |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        exit_code = "-" if r.exit_code is None else str(r.exit_code)
        lines.append(f"| {r.step.name} | {r.step.tier} | `{r.command}` | {r.status_text()} | {exit_code} | "
                     f"{r.seconds:.0f} | {r.step.estimate_s:.0f} |")  # fmt: skip
    lines += [f"| {s.name} | {s.tier} | `{' '.join(_shown(s))}` | pending | - | - | {s.estimate_s:.0f} |"
              for s in pending]  # fmt: skip
    cut = [f"{r.step.name} ({r.cut or r.output})" for r in results if r.cut or r.status == "not run"]
    lines += ["", f"Cut by the budget: {', '.join(cut)}." if cut else "No step was cut by the budget."]
    plan = [r.step for r in results] + list(pending)
    planned = {t: sum(s.estimate_s for s in plan if s.tier == t) for t in ("fast", "rest")}
    lines += ["", f"Plan (CPU-side estimates, cold machine): fast tier {planned['fast']:.0f} s, then the rest "
              f"{planned['rest']:.0f} s, {sum(planned.values()):.0f} s of the {budget_s:.0f} s budget."]  # fmt: skip
    verdicts = [v for r in results for v in _verdicts(r)]
    lines += ["", "## Verdicts", "", *(verdicts or ["(no verdict line in any report)"]), ""]
    for r in results:
        lines += _section(r)
    return "\n".join(lines)
