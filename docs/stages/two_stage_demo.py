"""The tiny two-stage demo of issue 20: 112 px for N steps, then ``--init`` at 168 px (the tiny model's 224 -> 336)
for M steps, both loss curves in one picture (docs/stages/two_stages.png).

    python docs/stages/two_stage_demo.py --out /tmp/stages [--steps1 60 --steps2 30]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from aimpre.cli import main

SHAPE = ["model.width=96", "model.depth=2", "model.heads=2", "model.mlp_hidden=264", "model.dec_depth=1"]


def losses(run: Path) -> list[tuple[int, float]]:
    with open(run / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["loss"]]


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps1", type=int, default=60)
    p.add_argument("--steps2", type=int, default=30)
    a = p.parse_args()
    common = [f"run.out_dir={a.out}", "data.batch_size=8", "data.num_workers=0", "data.val_shards=null",
              "trainer.log_every=1", "trainer.ckpt_every=1000", "optim.warmup_steps=5", *SHAPE]  # fmt: skip
    if main(["train", *common, "run.name=s1", f"trainer.max_steps={a.steps1}"]):
        sys.exit(1)
    if main(["train", "--init", str(a.out / "s1"), *common, "run.name=s2", "model.img_size=168",
             f"trainer.max_steps={a.steps2}", "optim.weight_decay=0", "optim.lr=3e-4"]):  # fmt: skip
        sys.exit(1)
    one, two = losses(a.out / "s1"), losses(a.out / "s2")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in one], [v for _, v in one], label="stage 1: 112 px (8x8 patches)")
    ax.plot([a.steps1 + s for s, _ in two], [v for _, v in two], label="stage 2: --init, 168 px (12x12), wd 0")
    ax.set_xlabel("step (stage 2 drawn after stage 1)")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(__file__).with_name("two_stages.png"), dpi=120)
    print(
        f"stage 1: step 1 {one[0][1]:.4f}, last {one[-1][1]:.4f}; stage 2: step 1 {two[0][1]:.4f}, "
        f"last {two[-1][1]:.4f}"
    )
