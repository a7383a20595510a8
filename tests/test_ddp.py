"""Real two-process DDP (gloo, CPU) through the command line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import good_samples, write_tar


def test_two_process_ddp_over_uneven_shards_finishes(tmp_path: Path) -> None:
    """Five shards of 37, 3, 1, 60 and 11 samples over 2 ranks x 2 workers: every reader gets the same number of
    batches (7 per epoch at batch 4), so 20 steps cross two epoch boundaries without any rank waiting forever."""
    data = tmp_path / "data"
    data.mkdir()
    for i, n in enumerate((37, 3, 1, 60, 11)):
        write_tar(data / f"u-{i}.tar", good_samples(f"s{i}-", n))
    args = [
        f"run.out_dir={tmp_path}", "run.name=ddp", f"data.train_shards={data}/u-{{0..4}}.tar",
        f"data.val_shards={data}/u-{{0..4}}.tar", "data.batch_size=4", "data.num_workers=2",
        "model.depth=2", "model.dec_depth=1", "model.text_len=16",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=20",
        "trainer.log_every=5", "trainer.val_every=10", "trainer.val_batches=2", "trainer.ckpt_every=10",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "aimpre", "train", *args], capture_output=True, text=True, timeout=240, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["samples"] == 20 * 4 * 2  # the global batch spans both ranks
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r["val_loss"]] == ["10", "20"]
    ckpt = __import__("torch").load(run / "checkpoints" / "last.ckpt", weights_only=False)
    state = ckpt["AIMv2DataModule"]
    assert state["world"] == 2 and len(state["readers"]) == 2  # both ranks' reader positions are saved
    assert all(r["0"]["epoch"] >= 1 for r in state["readers"])  # every reader crossed into its second epoch


@pytest.mark.slow  # two processes, each with two data workers: ~60 s on a busy 2-core machine
def test_two_process_ddp_native_batches_draw_the_same_areas_on_both_ranks(tmp_path: Path) -> None:
    """Native batches over 2 ranks x 2 workers of non-square JPEGs: at step s both ranks run worker s % 2's
    (s // 2)-th area, so both hold 256 / (2 x area) images of the same canvas; the run crosses epoch ends (28 samples
    per reader per epoch) and its sample count is the sum of those batches."""
    from aimpre.data.native import draw_area

    data = tmp_path / "data"
    data.mkdir()
    for i, n in enumerate((37, 3, 1, 60, 11)):
        write_tar(data / f"u-{i}.tar", good_samples(f"s{i}-", n))
    args = [
        f"run.out_dir={tmp_path}", "run.name=ddp", f"data.train_shards={data}/u-{{0..4}}.tar", "data.val_shards=null",
        "data.num_workers=2", "data.native=true", "data.native_log2_area=[4,5]", "data.tokens_per_batch=256",
        "model.pos_embed=sincos2d", "model.depth=2", "model.dec_depth=1", "model.text_len=16",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=12",
        "trainer.log_every=4", "trainer.ckpt_every=12",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "aimpre", "train", *args], capture_output=True, text=True, timeout=400, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "ddp"
    areas = [draw_area(0, s % 2, s // 2, 4, 5).patches for s in range(12)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["samples"] == sum(256 // a for a in areas) and summary["tokens"] == 12 * 256
    state = __import__("torch").load(run / "checkpoints" / "last.ckpt", weights_only=False)["AIMv2DataModule"]
    assert state["native"] == [4, 5, 256] and len(state["readers"]) == 2
    for r in state["readers"]:  # both ranks: each worker made 6 batches and ended at least one epoch
        assert [r[w]["index"] for w in ("0", "1")] == [6, 6] and all(r[w]["epoch"] >= 1 for w in ("0", "1"))
