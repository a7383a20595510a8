"""`aimpre bench loader` times our pipeline and the plain webdataset one on the same shards and prints both."""

from __future__ import annotations

from pathlib import Path

import pytest

from aimpre.bench.loader import synthetic_shards
from aimpre.cli import main


def test_bench_loader_prints_both_pipelines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = synthetic_shards(tmp_path, 48, size=(96, 72), per_shard=16)
    assert main(["bench", "loader", spec, "--batch", "8", "--batches", "2", "--rounds", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:42].strip(): line[42:].split() for line in lines if line.startswith(("plain", "aimpre"))}
    assert set(rows) == {"plain webdataset + torchvision (float)", "aimpre ImageTextStream (uint8)"}
    assert rows["plain webdataset + torchvision (float)"][2] == "1.00x"
    for img_s, per_worker, vs_plain, spread, per_cpu_s, cpu_vs_plain in rows.values():
        assert float(img_s) > 0 and float(per_worker) == float(img_s) and float(vs_plain[:-1]) > 0
        low, high = (float(x) for x in spread.strip("[]").split("-"))
        assert 0 < low <= high
        assert float(per_cpu_s) > 0 and float(cpu_vs_plain[:-1]) > 0  # /proc is there on Linux
