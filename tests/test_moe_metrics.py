"""MoE expert shares as a metric (issue 21 point 1): moe.csv and the loggers' moe/ points on logging steps, kept
across a resume, drawn by `aimpre visualize`; and a metrics.csv from before the loss_balance column, resumed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from aimpre.config import load_config
from aimpre.train import train
from aimpre.train.callbacks import COLUMNS
from aimpre.train.checkpoint import point_last


def _args(out: Path, spec: str, *extra: str) -> list[str]:
    return [f"run.out_dir={out}", "run.name=r", f"data.train_shards={spec}", "data.val_shards=null",
            "data.batch_size=4", "data.num_workers=0", "model.depth=2", "model.dec_depth=1", "model.text_len=16",
            "trainer.ckpt_every=2", "trainer.keep_last=-1", "optim.warmup_steps=2", *extra]  # fmt: skip


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _killed_after_logging(run: Path, step: int) -> None:
    """As a process killed after logging the steps after ``step`` but before checkpointing them."""
    ckpts = run / "checkpoints"
    point_last(ckpts, ckpts / f"step-{step}.ckpt")
    for later in ckpts.glob("step-*.ckpt"):
        if int(later.stem.split("-")[1]) > step:
            later.unlink()


@pytest.mark.slow  # two short Lightning runs and a visualize: ~25 s on an idle 2-core machine
def test_expert_shares_are_logged_kept_across_a_resume_and_drawn(tmp_path: Path, pretrain_spec: str) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    moe = ["model.moe_experts=4", "model.moe_top_k=2", "model.moe_blocks=[1]", "trainer.log_every=2",
           "trainer.loggers=[csv,tensorboard]"]  # fmt: skip
    run = train(load_config(None, _args(tmp_path, pretrain_spec, "trainer.max_steps=4", *moe)))
    _killed_after_logging(run, 2)  # step 4 was logged, then the process died
    train(load_config(None, _args(tmp_path, pretrain_spec, "trainer.max_steps=6", *moe)), resume=True)

    rows = _csv(run / "moe.csv")
    # logging steps only (1, then every 2), step 4 once (the resumed process's), one row per block and expert
    assert [(int(r["step"]), int(r["block"]), int(r["expert"])) for r in rows] == [
        (s, 1, e) for s in (1, 2, 4, 6) for e in range(4)
    ]
    for s in (1, 2, 4, 6):
        shares = [float(r["share"]) for r in rows if int(r["step"]) == s]
        assert sum(shares) == pytest.approx(1.0) and all(0 <= v <= 1 for v in shares)
    assert list(_csv(run / "metrics.csv")[0]) == list(COLUMNS)  # metrics.csv's columns did not change

    acc = EventAccumulator(str(run / "tensorboard")).Reload()
    points = acc.Scalars("moe/block1_expert0")
    assert [p.step for p in points] == [1, 2, 4, 6]
    assert points[-1].value == pytest.approx(float(rows[-4]["share"]))

    from aimpre.visualize import visualize

    written = visualize(run, tmp_path / "fig", n=2)
    assert tmp_path / "fig" / "experts.png" in written and (tmp_path / "fig" / "experts.png").stat().st_size > 0


def test_bad_moe_csv_is_one_line(tmp_path: Path) -> None:
    from aimpre.visualize import plot_expert_share

    bad = tmp_path / "moe.csv"
    bad.write_text("step,block,expert,share\n1,0,0,lots\n")
    with pytest.raises(ValueError, match=r"moe\.csv: not a moe\.csv"):
        plot_expert_share(bad)
    bad.write_text("step,block\n1,0\n")
    with pytest.raises(ValueError, match=r"not a moe\.csv"):
        plot_expert_share(bad)


@pytest.mark.slow  # two short Lightning runs: ~15 s
def test_resuming_a_metrics_csv_from_before_loss_balance(tmp_path: Path, pretrain_spec: str) -> None:
    """A run started by a version without the loss_balance column, resumed by this one: metrics.csv is rewritten
    under the current header, so no row has more fields than the header (csv readers would drop or misplace
    them) and the old rows read back with the new column blank."""
    run = train(load_config(None, _args(tmp_path, pretrain_spec, "trainer.max_steps=2", "trainer.log_every=1")))
    old = [c for c in COLUMNS if c != "loss_balance"]
    rows = _csv(run / "metrics.csv")
    with open(run / "metrics.csv", "w", newline="") as f:  # as the older version wrote it
        w = csv.DictWriter(f, old, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    train(load_config(None, _args(tmp_path, pretrain_spec, "trainer.max_steps=4", "trainer.log_every=1")),
          resume=True)  # fmt: skip
    with open(run / "metrics.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == list(COLUMNS)
    assert all(len(line) == len(COLUMNS) for line in lines)
    assert [int(r["step"]) for r in _csv(run / "metrics.csv")] == [1, 2, 3, 4]
