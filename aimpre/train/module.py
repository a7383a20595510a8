"""The Lightning wrappers: AIMv2Module (model, loss, optimiser) and AIMv2DataModule (resumable streams)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from aimpre.config import Config
from aimpre.data import Augment, ImageTextStream, Tokenizer, demo_shards, expand_shards
from aimpre.model import AIMv2
from aimpre.train.optim import build_optimizer, lr_factor


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class AIMv2Module(pl.LightningModule):
    """Trains AIMv2. Prefix lengths are drawn from a generator seeded by (seed, batch, rank): a resumed run
    draws exactly what the uninterrupted one would have."""

    mean: Tensor  # buffers, in 0..255 units
    std: Tensor

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = AIMv2(cfg.model)
        self.register_buffer("mean", torch.tensor(cfg.data.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255, persistent=False)
        self.batches_seen = 0  # micro-batches trained on by this rank; saved in checkpoints

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] -> float, normalised with the data config's mean/std."""
        return (images.float() - self.mean) / self.std

    def prefix_len(self, batch: int, seed: int) -> Tensor:
        lo, hi = self.cfg.model.prefix_range
        g = torch.Generator().manual_seed(seed)
        return torch.randint(lo, hi + 1, (batch,), generator=g).to(self.device)

    def _losses(self, batch: dict[str, Any], seed: int) -> dict[str, Tensor]:
        images = self.normalize(batch["image"])
        prefix = self.prefix_len(images.shape[0], seed)
        return self.model(images, batch["text"], batch["text_mask"], prefix)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        out = self._losses(batch, _seed(self.cfg.run.seed, self.batches_seen, self.global_rank))
        self.batches_seen += 1
        self.log("loss", out["loss"].detach(), prog_bar=True, logger=False)
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # a fixed prefix per validation batch: the pixel loss needs one, and it must not change between evals
        out = self._losses(batch, _seed(self.cfg.run.seed, 1 << 30, batch_idx, self.global_rank))
        for k, v in out.items():
            self.log(f"val_{k}", v, sync_dist=True, batch_size=batch["image"].shape[0], logger=False)

    def configure_optimizers(self) -> Any:
        opt = build_optimizer(self.model, self.cfg.optim, fused=self.device.type == "cuda")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(self.cfg.optim, self.cfg.trainer.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["batches_seen"] = self.batches_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.batches_seen = checkpoint.get("batches_seen", 0)


def resolve_shards(spec: str, demo_split: str) -> list[str]:
    return demo_shards(demo_split) if spec == "demo" else expand_shards(spec)


class AIMv2DataModule(pl.LightningDataModule):
    """Builds the train and validation streams; its state (batches consumed) travels in checkpoints."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.start_batch = 0

    def _stream(self, spec: str, demo_split: str, train: bool) -> ImageTextStream:
        d, m = self.cfg.data, self.cfg.model
        return ImageTextStream(
            resolve_shards(spec, demo_split),
            self.tokenizer,
            text_len=m.text_len,
            batch_size=d.batch_size,
            aug=Augment(m.img_size, scale=d.crop_scale, hflip=d.hflip, train=train),
            seed=self.cfg.run.seed,
            rank=self.trainer.global_rank if self.trainer else 0,
            world=self.trainer.world_size if self.trainer else 1,
            shuffle_buffer=d.shuffle_buffer if train else 0,
            split_by="shards" if train else "samples",
            start_batch=self.start_batch if train else 0,
        )

    def _loader(self, stream: ImageTextStream, workers: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            stream,
            batch_size=None,  # the stream batches
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self._stream(self.cfg.data.train_shards, "pretrain", True), self.cfg.data.num_workers)

    def val_dataloader(self) -> Any:
        if not self.cfg.data.val_shards or not self.cfg.trainer.val_batches:
            return []
        return self._loader(self._stream(self.cfg.data.val_shards, "val", False), 0)

    def state_dict(self) -> dict[str, Any]:
        module = self.trainer.lightning_module if self.trainer else None
        return {"batches_seen": getattr(module, "batches_seen", 0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start_batch = int(state.get("batches_seen", 0))
