"""Downstream scaling across objectives: probe top-1 and the objective in collect."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from aimpre.cli import main
from helpers import jpeg, write_tar


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _labelled(path: Path, n: int) -> str:
    """A real labelled shard: two classes, told apart by colour."""
    samples = [{"__key__": f"k{i:03d}", "jpg": jpeg((230, 20, 20) if i % 2 else (20, 20, 230)), "cls": str(i % 2)}
               for i in range(n)]  # fmt: skip
    return str(write_tar(path, samples))


def test_collect_probes_each_run_once_and_reads_the_objective(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real run probed on real labelled shards: top-1 columns, the objective column ("aimv2" for a config.yaml
    written before model.objective existed), the result kept in the run folder and reused on the next collect."""
    runs = tmp_path / "runs"
    run = Path(shutil.copytree(tiny_run, runs / "old"))
    config = (run / "config.yaml").read_text()
    assert "objective:" in config
    (run / "config.yaml").write_text("".join(x for x in config.splitlines(True) if "objective:" not in x))
    train, test = _labelled(tmp_path / "train.tar", 16), _labelled(tmp_path / "test.tar", 8)
    out = tmp_path / "results.csv"
    argv = ["scaling", "collect", str(runs), "--out", str(out), "--probe", f"{train},{test}", "--probe-epochs", "2"]
    assert main(argv) == 0
    assert "[1/1] old: probed" in capsys.readouterr().out  # the progress bar's lines
    (row,) = _read(out)
    assert row["objective"] == "aimv2"
    top1 = {k: float(row[f"probe_{k}_top1"]) for k in ("attentive", "linear")}
    assert all(0.0 <= v <= 1.0 for v in top1.values())
    (cached,) = run.glob("probe-*.json")
    doc = json.loads(cached.read_text())
    assert doc["settings"]["epochs"] == 2 and (doc["train"], doc["test"]) == (train, test)
    assert {k: doc["results"]["encoder"][k]["top1"] for k in top1} == top1
    stamp = cached.stat().st_mtime_ns

    assert main(argv) == 0  # again: the cached result, not a second probe
    assert "[1/1] old: probe result reused" in capsys.readouterr().out
    assert cached.stat().st_mtime_ns == stamp and _read(out) == [row]
    assert main([*argv[:-1], "3"]) == 0  # other settings: probed again, kept beside the first
    assert len(list(run.glob("probe-*.json"))) == 2

    assert main(["scaling", "collect", str(runs), "--out", str(tmp_path / "plain.csv")]) == 0  # no --probe
    (plain,) = _read(tmp_path / "plain.csv")
    assert plain["objective"] == "aimv2" and plain["probe_attentive_top1"] == ""
    assert main(["scaling", "collect", str(runs), "--probe", f"{train},{test},{test}"]) == 2
    assert "--probe takes TRAIN[,TEST]" in capsys.readouterr().err
