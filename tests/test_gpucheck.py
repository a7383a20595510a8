"""`aimpre bench gpu`, the one-command device check: the real orchestrator on CPU (--allow-cpu) on fast steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aimpre.cli import build_parser, main
from aimpre.gpucheck import BENCH_OPTIONS, BUDGET_S, MARGIN_S, MIN_STEP_S, PLAN_S, STEPS, Step, run_check
from helpers import rows_when_killed

# A step that starts a grandchild and hangs: the timeout must take the whole process group down.
HANG = (
    "import subprocess, sys, time; "
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "open(sys.argv[1], 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # a killed child of ours is a zombie until reaped: dead all the same
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "gpu", "--out", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--allow-cpu" in err
    assert not (tmp_path / "r.md").exists()


def test_bench_attention_step_report_is_embedded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "check.md"
    out.write_text("an older report")
    assert main(["bench", "gpu", "--allow-cpu", "--quick", "--steps", "attention", "--out", str(out)]) == 0
    report = out.read_text()
    assert capsys.readouterr().out.strip() == report.strip()
    # written atomically: no temporary file left beside it, only the steps' JSON lines
    assert sorted(tmp_path.iterdir()) == [out.with_suffix(".jsonl"), out]
    assert [json.loads(line)["step"] for line in out.with_suffix(".jsonl").read_text().splitlines()] == ["attention"]
    for line in ("# GPU check, ", "- commit: ", "- device: ", "- torch ", "- optional packages: liger-kernel "):
        assert f"\n{line}" in "\n" + report
    assert "| attention | fast | `python -m aimpre bench attention --quick --out attention.md` | ok | 0 |" in report
    assert "## attention: `python -m aimpre bench attention" in report
    assert "| encoder (tiny) (2, 1, 40, 64) | prefix | triton (ours) |" in report  # the bench's own table
    # its verdicts, collected at the top (the wall-time ones are judged on CPU too, meaningless as they are)
    top = report.split("## Verdicts")[1].split("\n## ")[0]
    assert "- [attention] encoder (tiny) fwd+bwd back-to-back wall, no slower than unmasked SDPA flash: ours" in top


def test_failures_timeouts_absent_steps_and_the_budget(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_cpu_only.py").write_text("def test_unmarked():\n    pass\n")
    steps = [
        Step("tests", ("-m", "pytest", "-q", "-m", "gpu", str(tmp_path / "t")), 30),  # none marked gpu: exit 5
        Step("verdicts", ("-c", "print('- speed: 1.4x: met'); print('* memory: NOT met'); print('metrics: none')"), 30),
        Step("boom", ("-c", "import sys; print('something broke'); sys.exit(3)"), 30),
        Step("hang", ("-c", HANG, str(pid_file)), 3),
        Step("nope", ("-m", "aimpre", "bench", "no-such-bench"), 30, bench="no-such-bench"),
    ]
    t0 = time.monotonic()
    report, passed = run_check(tmp_path / "r.md", budget_s=120, allow_cpu=True, steps=steps)
    assert time.monotonic() - t0 < 20 and not passed
    assert report == (tmp_path / "r.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert "| failed (no test selected) | 5 |" in rows["tests"]
    assert "| ok | 0 |" in rows["verdicts"] and "| failed | 3 |" in rows["boom"]
    assert "| timed out | - |" in rows["hang"] and "| absent | - |" in rows["nope"]
    top = report.split("## Verdicts")[1].split("\n## ")[0].strip().splitlines()
    assert top == ["- [verdicts] speed: 1.4x: met", "- [verdicts] * memory: NOT met"]  # not "metrics: none"
    assert "something broke" in report and "no `aimpre bench no-such-bench` in this checkout" in report
    assert not _alive(int(pid_file.read_text()))  # the hung step's own child went down with it

    # A budget a little over MIN_STEP_S: the first step's 30 s timeout is cut to it, and after that step's second
    # there is too little left to start the next.
    sleepy = Step("sleepy", ("-c", "import time; time.sleep(1)"), 30)
    report, passed = run_check(tmp_path / "b.md", budget_s=MIN_STEP_S + 0.5, allow_cpu=True,
                               steps=[sleepy, Step("later", ("-c", "pass"), 30)])  # fmt: skip
    assert not passed
    assert "| sleepy | rest | `python -c import time; time.sleep(1)` | ok (timeout 30 -> 20 s) |" in report
    assert "| later | rest | `python -c pass` | not run |" in report
    assert "Cut by the budget: sleepy (timeout 30 -> 20 s), later (" in report


def test_steps_inherit_the_interpreter_and_its_safe_path_flag(tmp_path: Path) -> None:
    # `make gpu-check-system` runs `python3 -P -m aimpre bench gpu` so that a checkout's aimpre/ cannot shadow the
    # link view on PYTHONPATH: every step must run under the same interpreter with -P too.
    code = "from aimpre.gpucheck import _python; print(_python())"
    for flags, expected in (([], [sys.executable]), (["-P"], [sys.executable, "-P"])):
        done = subprocess.run([sys.executable, *flags, "-c", code], cwd=tmp_path, capture_output=True, text=True)
        assert done.stdout.strip() == str(expected), done.stderr


def test_the_plan_fits_eight_minutes_with_margin() -> None:
    """`make gpu-check` fits one cold device command by design: the steps' expected seconds (compiles included) add
    up to at most the budget less a margin, the fast tier comes first and its timeouts fit the budget whole (so the
    budget can only cut the second tier), and no step is expected to reach its own timeout."""
    assert BUDGET_S <= 480 and MARGIN_S >= 60 and PLAN_S == BUDGET_S - MARGIN_S
    assert sum(s.estimate_s for s in STEPS) <= PLAN_S
    tiers = [s.tier for s in STEPS]
    assert tiers == sorted(tiers) and set(tiers) == {"fast", "rest"}  # "fast" < "rest": the fast tier first
    assert sum(s.timeout_s for s in STEPS if s.tier == "fast") <= BUDGET_S
    assert all(0 < s.estimate_s < s.timeout_s for s in STEPS)
    assert [s.name for s in STEPS][:3] == ["tests", "attention", "step"]
    assert build_parser().parse_args(["bench", "gpu"]).budget_s == BUDGET_S


def test_a_check_killed_mid_run_leaves_the_steps_it_ran(tmp_path: Path) -> None:
    """The report and its JSON lines are written as each step ends: killing the check (as a device command's own
    time limit would) during its second step leaves the first step's row, and the second listed as pending."""
    out = tmp_path / "check.md"
    code = (
        "import sys; from aimpre.gpucheck import Step, run_check; "
        "run_check(sys.argv[1], allow_cpu=True, steps=[Step('first', ('-c', 'print(\\'- speed: met\\')'), 30), "
        "Step('second', ('-c', 'import time; time.sleep(600)'), 900)])"
    )
    proc = subprocess.Popen([sys.executable, "-P", "-c", code, str(out)], start_new_session=True)
    # kill the check and its running step
    rows = rows_when_killed(proc, out.with_suffix(".jsonl"), lambda: os.killpg(proc.pid, 9))
    assert [(r["step"], r["status"], r["exit_code"]) for r in rows] == [("first", "ok", 0)]
    report = out.read_text()
    assert "(in progress: the steps so far)" in report
    assert "| first | rest | `python -P -c print('- speed: met')` | ok | 0 |" in report
    assert "| second | rest | `python -P -c import time; time.sleep(600)` | pending |" in report
    assert "- [first] speed: met" in report


def test_the_checks_declared_bench_options_are_the_clis() -> None:
    """The check declares the benches it runs and their options (it does not import the CLI): each declared option
    and each option a step passes is one the CLI's bench command takes."""
    import argparse

    def children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        return next(dict(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    benches = children(children(build_parser())["bench"])
    takes = {name: {o for a in p._actions for o in a.option_strings} for name, p in benches.items()}
    for name, options in BENCH_OPTIONS.items():
        assert options <= takes[name], name
    for step in STEPS:
        if step.bench:
            assert step.bench in BENCH_OPTIONS
            assert {a for a in step.argv if a.startswith("--")} <= takes[step.bench], step.name
            build_parser().parse_args(list(step.argv[2:]))  # the step's own command line parses
