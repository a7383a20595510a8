"""`aimpre bench attention` runs end to end and prints its table; on CPU in its quick mode (interpreter, eager)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aimpre.cli import main
from aimpre.kernels import HAS_TRITON
from aimpre.kernels.bench import Case, Row, table, targets


def test_bench_attention_quick_prints_the_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "attention.md"
    assert main(["bench", "attention", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text().strip() == printed.strip()
    if not torch.cuda.is_available():
        assert "NO GPU" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| encoder (tiny)")]
    assert [r.split("|")[3].strip() for r in rows] == [
        "triton (ours)", "flex (compiled)" if torch.cuda.is_available() else "flex (eager)", "sdpa + bool mask",
        "sdpa no mask (flash)", "xformers",
    ]  # fmt: skip
    measured = {r.split("|")[3].strip(): r.split("|")[6].strip() for r in rows}  # fwd+bwd ms
    assert float(measured["sdpa + bool mask"]) > 0
    if HAS_TRITON:
        assert float(measured["triton (ours)"]) > 0


def test_targets_are_judged_from_the_rows() -> None:
    enc, dec = Case("encoder L", 1, 1, 4, 16, "prefix"), Case("decoder", 1, 1, 4, 16, "causal")
    rows = [
        Row(enc, "triton (ours)", 1.0, 2.0, pairs=10**9),
        Row(enc, "flex (compiled)", 2.0, 3.0, pairs=10),
        Row(enc, "sdpa no mask (flash)", 1.0, 1.9, pairs=16),
        Row(dec, "triton (ours)", 1.0, 1.05, pairs=10),
        Row(dec, "sdpa is_causal (flash)", 1.0, 1.0, pairs=10),
    ]
    verdicts = targets(rows)
    assert verdicts[0].endswith("1.50x: met") and verdicts[1].endswith("0.95x: NOT met")
    assert verdicts[2].endswith("0.95x: met")  # 5% slower than SDPA causal is within 10%
    assert "| 2.000 | 96 |" in table(rows)  # fwd+bwd ms and TFLOP/s: 3 * 4 * 16 * 1e9 FLOPs in 2 ms
