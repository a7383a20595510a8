"""`aimpre bench fp8`: a real CPU smoke run (float8 GEMMs on CPU, the trainer's code) and the verdict on constructed
numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from aimpre.bench.fp8 import Fp8Settings, fp8_curves, loss_verdict, run_fp8, window_means

SMALL = {"img_size": 28, "depth": 1, "dec_depth": 1, "text_len": 16}


def test_bench_fp8_quick_trains_both_builds_on_the_same_batches(tmp_path: Path) -> None:
    out, plot = tmp_path / "fp8.md", tmp_path / "fp8.png"
    report = run_fp8(Fp8Settings(steps=4, quick=True, model=SMALL), out=str(out), plot=str(plot))
    assert out.read_text() == report and "NO GPU" in report
    assert "10 block linears in float8, 0 left in bf16" in report and "render_scene" in report
    rows = [line.strip("|").split("|") for line in report.splitlines() if line.startswith("| ") and "%" in line]
    steps = [int(r[0]) for r in rows]
    bf16, fp8 = [float(r[1]) for r in rows], [float(r[2]) for r in rows]
    assert steps == [2, 4] and all(math.isfinite(x) for x in bf16 + fp8)
    # each window's mean written as it was trained, the same numbers as the final table
    jsonl = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [(r["build"], r["step"]) for r in jsonl] == [("bf16", 2), ("bf16", 4), ("fp8", 2), ("fp8", 4)]
    assert [f"{r['loss']:.4f}" for r in jsonl] == [f"{x:.4f}" for x in bf16 + fp8]
    assert bf16[-1] < bf16[0] and fp8[-1] < fp8[0]  # both learn
    assert fp8 != bf16 and all(abs(f - b) < 0.05 * b for b, f in zip(bf16, fp8, strict=True))  # float8 ran, close
    assert loss_verdict(steps, bf16, fp8).split(":")[1].split()[0] in report
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size[0] > 400


def test_window_means_and_loss_verdict() -> None:
    assert window_means([1.0, 3.0, 5.0, 7.0, 9.0], 2) == ([2, 4, 5], [2.0, 6.0, 9.0])
    assert window_means([4.0, 2.0], 10) == ([2], [3.0])
    steps, bf16 = [10, 20, 30], [6.0, 5.0, 4.0]
    assert loss_verdict(steps, bf16, [6.03, 4.96, 4.038]) == (
        "fp8 loss within 1% of bf16 at every logged step: met (worst 0.95% at step 30)"
    )
    assert loss_verdict(steps, bf16, [6.0, 5.06, 4.0]) == (
        "fp8 loss within 1% of bf16 at every logged step: NOT met (worst 1.20% at step 20)"
    )
    assert loss_verdict(steps, bf16, [6.0, float("nan"), 4.0]).endswith("NOT met (worst inf% at step 20)")


def test_bench_fp8_trains_with_the_recipe_it_is_given() -> None:
    # the bf16 build is the same whatever the recipe; the fp8 one takes it (rowwise scales round differently)
    settings = {r: Fp8Settings("tiny", 2, 4, 1, r, quick=True, model=SMALL) for r in ("tensorwise", "rowwise")}
    runs = {r: fp8_curves(s).per_step for r, s in settings.items()}
    assert runs["tensorwise"]["bf16"] == runs["rowwise"]["bf16"]
    assert runs["tensorwise"]["fp8"] != runs["rowwise"]["fp8"]
