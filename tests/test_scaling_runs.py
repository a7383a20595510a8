"""A real cooldown sweep, end to end: plan, run (trunk + branches as real training processes), collect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from aimpre.cli import main
from aimpre.scaling.collect import collect, write_csv
from aimpre.scaling.fit import fit_chinchilla
from aimpre.scaling.table import Columns, TableError, read_table
from helpers import metric_rows


def test_cooldown_sweep_runs_branches_and_collects(
    tmp_path: Path, pretrain_spec: str, val_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = {
        "name": "e2e", "design": "cooldown", "samples": [24, 40], "cooldown_fraction": 0.2,
        "sizes": {"xs": {"width": 32, "depth": 1}}, "head_dim": 16, "mlp_ratio": 2.0, "decoder": "same",
        "overrides": {
            "data.train_shards": pretrain_spec, "data.val_shards": val_spec, "data.batch_size": 4,
            "data.num_workers": 0, "optim.warmup_steps": 2, "trainer.log_every": 1, "trainer.val_batches": 1,
        },
    }  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    plan_dir = tmp_path / "plan"
    cmd = [sys.executable, "-m", "aimpre", "scaling"]
    out = subprocess.run([*cmd, "plan", str(tmp_path / "sweep.yaml"), "--out", str(plan_dir)], capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*cmd, "run", str(plan_dir), "--threads", "1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    assert "3 of 3 runs finished" in out.stdout
    runs = plan_dir / "runs"
    trunk, short, long = runs / "xs-trunk", runs / "xs-s24", runs / "xs-s40"

    # the trunk ran at constant lr to the last branch point and kept a checkpoint at every branch point
    assert sorted(p.name for p in (trunk / "checkpoints").iterdir()) == ["last.ckpt", "step-4.ckpt", "step-8.ckpt"]
    t = metric_rows(trunk)
    assert max(t) == 8 and {float(r["lr"]) for r in t.values() if int(r["step"]) >= 2} == {1e-3}
    # a branch resumed exactly from the trunk: identical losses up to one step past its branch point (that step
    # still trains at the peak lr), then the linear cooldown reaches min_lr at its last step
    b = metric_rows(short)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (1, 2, 3, 4, 5):
        assert b[step]["loss"] == t[step]["loss"], step
    assert float(b[6]["lr"]) == pytest.approx(1e-5)
    assert torch.load(short / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6

    # collect: the branches (not the un-cooled trunk), with the validation loss measured at their last step
    rows, missing = collect(plan_dir)
    assert missing == [] and [r["run"] for r in rows] == ["xs-s24", "xs-s40"]
    for r, steps in zip(rows, (6, 10), strict=True):
        s = json.loads((runs / r["run"] / "summary.json").read_text())
        assert r["steps"] == steps and r["samples"] == 4 * steps and r["kind"] == "branch"
        assert r["val_loss"] == pytest.approx(s["val"]["loss"]) and r["schedule"] == "cooldown"
        assert r["params"] == r["params_total"] == s["params"]["total"]
        assert r["flops"] == pytest.approx(s["flops_per_sample"] * 4 * steps)
    assert len(collect(plan_dir, include_trunks=True)[0]) == 3
    assert {r["run"] for r in collect(runs)[0]} == {"xs-trunk", "xs-s24", "xs-s40"}  # any folder of runs

    # a second run skips every finished point; a real two-row table is refused by the fit, naming why
    assert main(["scaling", "run", str(plan_dir)]) == 0
    assert capsys.readouterr().out.count("skipped") == 3
    write_csv(rows, tmp_path / "results.csv")
    with pytest.raises(TableError, match="at least 8 rows"):
        fit_chinchilla(read_table(tmp_path / "results.csv", Columns()))
    assert long.is_dir()
