"""`aimpre bench step --quick` runs both builds end to end (a tiny model on CPU) and prints its table."""

from __future__ import annotations

import pytest

from aimpre.cli import main


def test_bench_step_quick_times_both_builds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "step", "--quick", "--steps", "2", "--warmup", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split("  ")[0]: line.split() for line in lines if line.startswith(("plain", "aimpre"))}
    assert set(rows) == {"plain (torch.compile, Flex + SDPA)", "aimpre (sdpa, compiled blocks)"}
    for cells in rows.values():
        assert float(cells[-4]) > 0 and float(cells[-3]) > 0  # ms/step, img/s
    assert any(line.startswith("speed-up:") for line in lines)
