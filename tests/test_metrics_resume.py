"""The loggers across a resume and on odd terminals: one point per step in metrics.csv and TensorBoard after a
process was killed between logging and checkpointing, a marked out.log, a metrics.csv with an oversized field, and
a zero-width terminal that still gets the text lines."""

from __future__ import annotations

import csv
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from aimpre.config import load_config
from aimpre.train import train
from aimpre.train.callbacks import NAMES, wants_bar
from aimpre.train.checkpoint import point_last

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _args(out: Path, spec: str, *extra: str) -> list[str]:
    return [f"run.out_dir={out}", "run.name=r", f"data.train_shards={spec}", "data.val_shards=null",
            "data.batch_size=4", "data.num_workers=0", "model.depth=1", "model.dec_depth=1", "model.text_len=16",
            "trainer.log_every=1", "trainer.ckpt_every=2", "trainer.keep_last=-1", "optim.warmup_steps=2",
            *extra]  # fmt: skip


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _killed_after_logging(run: Path, step: int) -> None:
    """Leaves ``run`` as a process killed after logging its last steps but before checkpointing them would: the
    checkpoints after ``step`` are gone and last.ckpt points at ``step``'s."""
    ckpts = run / "checkpoints"
    point_last(ckpts, ckpts / f"step-{step}.ckpt")
    for later in ckpts.glob("step-*.ckpt"):
        if int(later.stem.split("-")[1]) > step:
            later.unlink()


def test_a_resume_leaves_one_point_per_step_in_order_and_marks_out_log(
    tmp_path: Path, pretrain_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = "trainer.loggers=[csv,tensorboard]"
    run = train(load_config(None, _args(tmp_path, pretrain_spec, "trainer.max_steps=3", loggers)))
    assert f"tensorboard --logdir {run / 'tensorboard'}" in capsys.readouterr().out  # how to view it
    _killed_after_logging(run, 2)  # step 3 was logged, then the process died
    run = train(load_config(None, _args(tmp_path, pretrain_spec, "trainer.max_steps=4", loggers)), resume=True)

    rows = _rows(run)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()  # as TensorBoard reads the directory: both processes' event files, with the purge
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    for column in ("loss", "lr", "img_per_s", "samples"):
        points = [(e.step, e.value) for e in acc.Scalars(NAMES[column])]
        assert [s for s, _ in points] == [1, 2, 3, 4], column  # once each, in order
        assert [v for _, v in points] == pytest.approx([float(r[column]) for r in rows], rel=1e-6), column

    lines = (run / "out.log").read_text().splitlines()
    (mark,) = [i for i, line in enumerate(lines) if "resumed" in line]
    assert re.search(rf"resumed at step 2 \(from checkpoint {re.escape(str(run))}/checkpoints/last.ckpt\)", lines[mark])
    steps = [[int(m[1]) for m in map(re.compile(r".* step (\d+)/\d+ loss ").match, part) if m]
             for part in (lines[:mark], lines[mark + 1:])]  # fmt: skip
    assert steps == [[1, 2, 3], [3, 4]]  # the stopped process's step 3 above the mark, the run's steps below


def test_a_resume_reads_a_metrics_csv_field_over_the_csv_limit(tmp_path: Path, pretrain_spec: str) -> None:
    run = train(load_config(None, _args(tmp_path, pretrain_spec, "trainer.max_steps=2")))
    rows = _rows(run)
    rows[0]["loss_text"] = "9" * 200_000  # over csv's default 131,072-character field limit
    rows.append({"step": "x" * 200_000})  # and a row whose step is no number
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    run = train(load_config(None, _args(tmp_path, pretrain_spec, "trainer.max_steps=3")), resume=True)
    rows = _rows(run)  # under the default limit: the rewritten file holds short numbers only
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["loss_text"] == "" and rows[0]["loss"] and rows[1]["loss_text"]
    assert (run / "summary.json").is_file()  # the resumed run finished and summarised its rows


def test_a_zero_width_terminal_gets_the_text_lines(tmp_path: Path, pretrain_spec: str) -> None:
    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))  # 0 rows, 0 columns
    env = {k: v for k, v in ENV.items() if k not in ("COLUMNS", "LINES")}
    cmd = [sys.executable, "-m", "aimpre", "train", *_args(tmp_path, pretrain_spec, "trainer.max_steps=1")]
    proc = subprocess.Popen(cmd, stdin=sub, stdout=sub, stderr=subprocess.DEVNULL, env=env)
    os.close(sub)
    out, t0 = b"", time.time()
    while time.time() - t0 < 300:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.wait(timeout=60) == 0, out[-2000:]
    text = out.decode(errors="replace")
    assert re.search(r"step 1/1 loss [\d.]+ ", text), text[-2000:]  # the text line a file would get


@pytest.mark.parametrize(("columns", "bar"), [(0, False), (1, False), (19, False), (20, True), (120, True)])
def test_the_bar_needs_a_terminal_wide_enough_for_it(columns: int, bar: bool) -> None:
    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    with open(sub, "w") as terminal:
        assert wants_bar(terminal) is bar
    os.close(main)
