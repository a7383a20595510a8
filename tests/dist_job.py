"""A training job on fixed batches, for the distributed tests: `python dist_job.py OUT_DIR STRATEGY DEVICES`.

Lightning re-launches this script for the other ranks. Each rank takes its slice of the same global batch of 8,
so a run on 1, 2 or more devices sees the same samples per step. With a fixed prefix and full-length captions,
every sample carries the same number of loss terms, so the mean of per-rank losses is the global mean.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch

from aimpre.config import load_config
from aimpre.train import train

GLOBAL_BATCH, STEPS = 8, 6


class Batches:
    """A plain iterable: Lightning takes a list for several dataloaders, and would shard a DataLoader again."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class FixedBatches(pl.LightningDataModule):
    def train_dataloader(self) -> Batches:
        assert self.trainer is not None
        rank, world = self.trainer.global_rank, self.trainer.world_size
        g = torch.Generator().manual_seed(0)
        n = GLOBAL_BATCH * STEPS * 2
        images = torch.randint(0, 256, (n, 3, 56, 56), generator=g, dtype=torch.uint8)
        text = torch.randint(2, 258, (n, 16), generator=g)
        per = GLOBAL_BATCH // world
        rows = [slice(i * GLOBAL_BATCH + rank * per, i * GLOBAL_BATCH + (rank + 1) * per) for i in range(STEPS * 2)]
        return Batches([{"image": images[r], "text": text[r], "text_mask": torch.ones_like(text[r], dtype=torch.bool)}
                        for r in rows])  # fmt: skip


if __name__ == "__main__":
    out, strategy, devices, *extra = sys.argv[1:]
    cfg = load_config(
        None,
        [
            f"run.out_dir={out}", "run.name=job", "data.val_shards=null",
            f"data.batch_size={GLOBAL_BATCH // int(devices)}", "model.img_size=56", "model.depth=2",
            "model.dec_depth=1", "model.text_len=16", "model.prefix_min=8", "model.prefix_max=8",
            "trainer.accelerator=cpu", f"trainer.devices={devices}", f"trainer.strategy={strategy}",
            f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.ckpt_every=3", "trainer.precision=32-true",
            "optim.warmup_steps=2", "optim.lr=3e-3", *[e for e in extra if e != "--resume"],
        ],
    )  # fmt: skip
    train(cfg, resume="--resume" in extra, datamodule=FixedBatches())
