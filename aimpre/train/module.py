"""The Lightning wrappers: AIMv2Module (model, loss, optimiser) and AIMv2DataModule (resumable streams)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from aimpre.config import Config, ConfigError, RunError
from aimpre.data import (
    Augment,
    ImageTextStream,
    StreamLoader,
    Tokenizer,
    batches_per_epoch,
    sources,
    spec_urls,
)
from aimpre.data.native import Area, Native, batch_size_for, native_span
from aimpre.data.scan import check_fields
from aimpre.objectives import build, needs, uses_prefix
from aimpre.objectives.contrastive import clamp_temperatures
from aimpre.train.optim import build_optimizer, lr_factor


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class NonFiniteError(RunError):
    """Too many consecutive steps had non-finite gradients."""


class AIMv2Module(pl.LightningModule):
    """Trains the model of ``model.objective`` (AIMv2 by default; the name stays for checkpoints and callers).
    Prefix lengths (only for the objectives with prefix attention) are drawn from a generator seeded by (seed,
    batch, rank): a resumed run draws exactly what the uninterrupted one would have.

    Gradients are clipped here rather than by Lightning, because the global norm also decides whether a step is
    taken: a non-finite norm (from a NaN/inf loss or gradient) skips the step, so AdamW leaves every parameter and
    moment untouched; ``trainer.max_bad_steps`` such steps in a row stop the run. The skip is decided on the device
    (the norm's non-finite flag is the fused AdamW's ``found_inf``, as GradScaler passes it), and the bad-step
    counters live there too: the streak is read and checked on the steps that write a metrics row (and the
    checkpointer's), so a run stops at the first such step after the limit is reached, with no host sync in
    between. Where the fused AdamW is not used (FSDP on CPU), the old host check decides each step.
    """

    mean: Tensor  # buffers, in 0..255 units
    std: Tensor
    _bad: Tensor  # buffers of the NaN guard
    _worst: Tensor
    _skipped: Tensor

    def __init__(self, cfg: Config, tokenizer_identity: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer_identity = tokenizer_identity
        self.model = build(cfg.model)
        distiller = getattr(self.model, "distill", None)  # a distilled objective: its teacher's own normalisation
        if distiller is not None:
            distiller.set_input_norm(cfg.data.mean, cfg.data.std)
        self.register_buffer("mean", torch.tensor(cfg.data.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255, persistent=False)
        self.batches_seen = 0  # micro-batches trained on by this rank; saved in checkpoints
        self.loader_state: dict[int, dict[str, Any]] = {}  # data worker -> its state after its last batch used
        # non-finite steps, on the device (moved with the module's buffers): consecutive now, the longest run of
        # them not yet checked against the limit, and in all
        self.register_buffer("_bad", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("_worst", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("_skipped", torch.zeros((), dtype=torch.long), persistent=False)
        self.grad_norm: Tensor | float = float("nan")  # the last step's global norm, on the device

    def configure_model(self) -> None:
        """Activation checkpointing, float8 linears (``trainer.precision=fp8``), compile and (FSDP) sharding per
        block; Lightning calls it once set up (``aimpre bench step`` and ``bench fp8`` call it without a Trainer)."""
        from aimpre.train.parallel import check_fp8, fp8_linears, parallelize

        if getattr(self, "_parallelized", False):  # Lightning may call it again (e.g. validate after fit)
            return
        self._parallelized = True
        t = self.cfg.trainer
        mesh = None
        if t.strategy == "fsdp":
            assert self.device_mesh is not None, "trainer.strategy=fsdp runs under ModelParallelStrategy"
            mesh = self.device_mesh["data_parallel"]
        fp8 = t.precision == "fp8"
        bf16 = fp8 or ("bf16" in str(self.trainer.precision) if self._trainer is not None else False)
        if fp8:  # the device the Trainer will run on (the model may still be on the CPU here)
            check_fp8(self.trainer.strategy.root_device if self._trainer is not None else self.device)
        parallelize(
            self.model,
            recompute=t.activation_checkpointing,
            fp8=t.fp8_recipe if fp8 else None,
            compile=t.compile,
            mesh=mesh,
            param_dtype=torch.bfloat16 if mesh is not None and bf16 else None,
            compile_areas=self.cfg.data.native_log2_area[1] - self.cfg.data.native_log2_area[0] + 1
            if self.cfg.data.native
            else None,
        )
        if fp8:
            converted, skipped = fp8_linears(self.model)
            where = f"; left in bf16 (a dimension not a multiple of 16): {', '.join(skipped)}" if skipped else ""
            rank_zero_info(f"trainer.precision=fp8 ({t.fp8_recipe}): {len(converted)} block linears train in "
                           f"float8, {len(skipped)} in bf16{where}")  # fmt: skip

    @property
    def bad_steps(self) -> int:
        """Consecutive non-finite steps up to the last one (a host read)."""
        return int(self._bad)

    @property
    def skipped_steps(self) -> int:
        """Non-finite steps skipped in all, this run and the runs it resumes (a host read)."""
        return int(self._skipped)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        params = [p for p in self.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
            norm = norm.full_tensor()
        self.grad_norm = norm.detach()  # read back (a host sync) only when a metrics row is written
        bad = ~torch.isfinite(self.grad_norm)  # the same on every rank: the norm is the global one
        self._bad.copy_(torch.where(bad, self._bad + 1, 0))
        self._worst.copy_(torch.maximum(self._worst, self._bad))
        self._skipped.add_(bad)
        opt = getattr(optimizer, "_optimizer", optimizer)  # (a LightningOptimizer wraps the torch one)
        if opt.defaults.get("fused"):
            # the fused kernel leaves parameters, moments and step counts alone when found_inf is 1
            setattr(opt, "found_inf", bad.float())  # noqa: B010 (an attribute torch.optim reads, not declared)
        elif bad:  # no fused AdamW (FSDP on CPU): decided on the host, as before
            for p in params:
                p.grad = None  # AdamW skips parameters without gradients: the step changes nothing
        step, t = self.global_step + 1, self.cfg.trainer
        if step == 1 or step % t.log_every == 0 or step >= t.max_steps:  # a metrics row reads the device anyway
            self.check_bad_streak()

    def check_bad_streak(self) -> None:
        """Stops the run (NonFiniteError) if ``trainer.max_bad_steps`` non-finite steps in a row were seen since the
        last check; reads the device counters back (a host sync), so it runs only on steps that sync anyway."""
        limit, worst = self.cfg.trainer.max_bad_steps, int(self._worst)
        self._worst.zero_()
        if worst >= limit:
            raise NonFiniteError(
                f"{limit} consecutive steps had non-finite gradients ({worst} in a row by step "
                f"{self.global_step + 1}); stopping. {self._last_checkpoint()}. Lower optim.lr or check the data."
            )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's step, then CLIP's temperature clamped (open_clip's order: the clamp acts on the parameter
        after the update, so the loss's gradient in it stays live at the bound). Here rather than in
        ``on_train_batch_end``, which callbacks (the checkpointer) see before the module does."""
        super().optimizer_step(*args, **kwargs)
        clamp_temperatures(self.model)

    def _last_checkpoint(self) -> str:
        """What is on disk now, read from disk: a run may stop before its first checkpoint."""
        from aimpre.train.checkpoint import Checkpointer

        callbacks = getattr(self._trainer, "callbacks", [])  # set by Lightning at run time; not in its stubs
        found = [c for c in callbacks if isinstance(c, Checkpointer)]
        if not found:
            return "No checkpoint is written by this run"
        last = found[0].directory / "last.ckpt"
        if not last.exists():
            return f"No checkpoint was written: {last} does not exist"
        # the Checkpointer saves no step of a non-finite streak, so this one predates it
        return f"The last checkpoint on disk is {last} -> {last.resolve().name}, from before these steps (--resume)"

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] -> float, normalised with the data config's mean/std."""
        return (images.float() - self.mean) / self.std

    def prefix_len(self, batch: int, seed: int, tokens: int | None = None) -> Tensor:
        lo, hi = self.cfg.model.prefix_range
        if self.cfg.data.native and tokens is not None:  # the batch's grid sets T: M ~ U{prefix_min..T-1}
            lo, hi = min(lo, tokens - 1), tokens - 1
        g = torch.Generator().manual_seed(seed)
        return torch.randint(lo, hi + 1, (batch,), generator=g).to(self.device)

    def _losses(self, batch: dict[str, Any], seed: int) -> dict[str, Tensor]:
        images = self.normalize(batch["image"])
        p = self.cfg.model.patch_size
        tokens = (images.shape[-2] // p) * (images.shape[-1] // p)  # T of this batch's grid
        prefix = self.prefix_len(images.shape[0], seed, tokens) if uses_prefix(self.cfg.model.objective) else None
        out: dict[str, Tensor] = self.model(images, batch, prefix)
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        out = self._losses(batch, _seed(self.cfg.run.seed, self.batches_seen, self.global_rank))
        self.batches_seen += 1
        if "state" in batch:
            self.loader_state[batch["worker"]] = batch["state"]
        self.log("loss", out["loss"].detach(), prog_bar=True, logger=False)
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # a fixed prefix per validation batch (objectives with one): the pixel loss needs it, unchanged between evals
        out = self._losses(batch, _seed(self.cfg.run.seed, 1 << 30, batch_idx, self.global_rank))
        for k, v in out.items():
            self.log(f"val_{k}", v, sync_dist=True, batch_size=batch["image"].shape[0], logger=False)

    def configure_optimizers(self) -> Any:
        # fused wherever it takes the NaN guard's found_inf (its CPU kernel too; FSDP's sharded parameters on CPU
        # keep the foreach AdamW)
        fused = self.device.type == "cuda" or (self.device.type == "cpu" and self.cfg.trainer.strategy != "fsdp")
        opt = build_optimizer(self.model, self.cfg.optim, fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(self.cfg.optim, self.cfg.trainer.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["batches_seen"] = self.batches_seen
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["tokenizer"] = self.tokenizer_identity

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("tokenizer")
        if saved is not None and self.tokenizer_identity is not None and saved != self.tokenizer_identity:
            raise ConfigError(f"data.tokenizer is {self.tokenizer_identity}; the checkpoint was trained with {saved}")
        self.batches_seen = checkpoint.get("batches_seen", 0)
        self._skipped.fill_(checkpoint.get("skipped_steps", 0))


class AIMv2DataModule(pl.LightningDataModule):
    """Builds the train and validation streams, with the fields ``model.objective`` reads (``objectives.needs``).
    Its state (every reader's position on every rank) travels in checkpoints, so a resumed run reads exactly what
    the uninterrupted one would have."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.saved: dict[str, Any] | None = None

    def _where(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def check_shards(self) -> None:
        """Refuses (ConfigError), before anything is built, shard sets ``model.objective`` cannot train on: the
        first shard of every source has no usable caption or label it needs, or a label >= model.num_classes
        (``aimpre.data.scan.check_fields``; a few samples of each, not the whole set)."""
        d, m = self.cfg.data, self.cfg.model
        need = needs(m.objective)
        sets = [("data.train_shards", d.train_shards, "pretrain")]
        if d.val_shards and self.cfg.trainer.val_batches:
            sets.append(("data.val_shards", d.val_shards, "val"))
        for key, spec, split in sets:
            for s in spec if isinstance(spec, list) else [spec]:
                try:
                    check_fields(spec_urls(s, split)[0], need, m.num_classes, key, f"model.objective={m.objective}")
                except ValueError as e:  # its message names the config key
                    raise ConfigError(str(e)) from e

    def _module(self) -> AIMv2Module:
        assert self.trainer is not None, "the data module is used inside a Trainer"
        module = self.trainer.lightning_module
        assert isinstance(module, AIMv2Module)
        return module

    def stream(
        self, spec: str | list[str], demo_split: str, train: bool, resume: list | None = None, square: bool = False
    ) -> ImageTextStream:
        """The train or validation stream of ``spec``; ``square``: training crops at model.img_size even under
        data.native (what the mean-patch baseline fits on, to compare with the square validation)."""
        d, m = self.cfg.data, self.cfg.model
        rank, world = self._where()
        resampled = d.resampled and train
        # native batches in training; validation stays square at model.img_size, so val losses compare across runs
        native = None
        if d.native and train and not square:
            lo, hi = d.native_log2_area
            native = Native(lo, hi, d.tokens_per_batch or 0, m.patch_size)
            try:  # every area must split over the ranks; the largest area is the strictest
                batch_size_for(Area(hi, 1, 1 << hi), native.tokens_per_batch, world)
            except ValueError as e:
                raise ConfigError(f"config key 'data.tokens_per_batch': {e}") from e
        stream = ImageTextStream(
            sources(spec, demo_split, need_counts=not resampled, index=d.index),
            self.tokenizer,
            text_len=m.text_len,
            batch_size=d.batch_size,
            aug=Augment(
                m.img_size,
                scale=d.crop_scale,
                hflip=d.hflip,
                train=train,
                max_pixels=d.max_pixels,
                max_bytes=d.max_sample_bytes,
            ),
            weights=d.weights if train else None,
            resampled=resampled,
            seed=self.cfg.run.seed,
            rank=rank,
            world=world,
            shuffle=d.shuffle_buffer if train else 0,
            resume=resume,
            need=needs(m.objective),
            num_classes=m.num_classes,
            native=native,
        )
        if not resampled:  # fail here, naming the shards, rather than in a data worker with its traceback
            readers = world * (max(1, d.num_workers) if train else 1)
            try:
                if native is not None:
                    native_span(sum(s.samples or 0 for src in stream.sources for s in src), native, world, readers)
                else:
                    batches_per_epoch(stream.sources, d.batch_size, readers)
            except ValueError as e:
                raise ConfigError(f"config key 'data.{'train' if train else 'val'}_shards': {e}") from e
        return stream

    def _loader(self, stream: ImageTextStream, workers: int) -> StreamLoader:
        return StreamLoader(stream, workers, pin_memory=torch.cuda.is_available(), persistent_workers=True)

    def _resume_states(self) -> list | None:
        if self.saved is None:
            return None
        rank, world = self._where()
        d = self.cfg.data
        layout = (world, d.num_workers, d.batch_size, d.resampled, self._native_layout())
        saved = self.saved
        was = (saved["world"], saved["workers"], saved["batch_size"], saved.get("resampled", False),
               saved.get("native"))  # fmt: skip
        if was == layout:
            mine = {int(k): v for k, v in saved["readers"][rank].items()}
        else:  # another layout: restart the epoch the run was in (some samples repeat); say so
            epoch = max((s.get("epoch", 0) for r in saved["readers"] for s in r.values()), default=0)
            rank_zero_warn(
                f"resuming with (world, workers, batch, resampled, native) = {layout} instead of {was}: "
                f"the data order cannot continue exactly, restarting epoch {epoch}"
            )
            mine = {k: {"epoch": epoch} for k in range(max(1, d.num_workers))}
        self._module().loader_state = dict(mine)  # a checkpoint taken before any new batch keeps the resumed state
        return [mine.get(k) for k in range(max(1, d.num_workers))]

    def train_dataloader(self) -> StreamLoader:
        stream = self.stream(self.cfg.data.train_shards, "pretrain", True, self._resume_states())
        # the DataLoader hands out batches round-robin over workers: continue the rotation where it stopped
        stream.first_worker = self._module().batches_seen % max(1, self.cfg.data.num_workers)
        return self._loader(stream, self.cfg.data.num_workers)

    def val_dataloader(self) -> Any:
        if not self.cfg.data.val_shards or not self.cfg.trainer.val_batches:
            return []
        return self._loader(self.stream(self.cfg.data.val_shards, "val", False), 0)

    def state_dict(self) -> dict[str, Any]:
        """Called on every rank while a checkpoint is dumped: gathers all ranks' reader states."""
        mine = {str(k): v for k, v in self._module().loader_state.items()}
        _, world = self._where()
        readers = [mine]
        if dist.is_available() and dist.is_initialized() and world > 1:
            readers = [{} for _ in range(world)]
            dist.all_gather_object(readers, mine)
        d = self.cfg.data
        return {"world": world, "workers": d.num_workers, "batch_size": d.batch_size, "resampled": d.resampled,
                "native": self._native_layout(), "readers": readers}  # fmt: skip

    def _native_layout(self) -> list[int] | None:
        """What native batching a reader state belongs to: (lo, hi, tokens per batch), None for square batches."""
        d = self.cfg.data
        return [*d.native_log2_area, d.tokens_per_batch or 0] if d.native else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = state if "readers" in state else None
