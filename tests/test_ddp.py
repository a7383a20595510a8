"""Real two-process DDP (gloo, CPU) through the command line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

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
