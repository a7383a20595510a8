"""Checkpoints that are never half-written, kept to a budget, and taken on preemption signals.

Each checkpoint (a file under DDP, a sharded torch.distributed.checkpoint directory under FSDP) is written to a
hidden temp name and renamed into place once every rank has finished; only then does ``last.ckpt`` (a symlink)
move to it, by an atomic rename. A crash at any point leaves the previous checkpoint and ``last.ckpt`` intact;
leftover temp names are removed at the next start. A step's metrics row and, on a validation step, its validation
are written before the checkpoint that covers the step, so a kill right after the rename loses neither.

Stop signals: SIGTERM (preemption) and SIGUSR1 (SLURM's warning before the time limit), to one rank or to the whole
process group, only set a flag (``StopSignals``); Lightning's own SIGTERM handling (which raises out of whichever
loop it is in, and broadcasts from inside the handler) is switched off. The Checkpointer acts on the flag at the
next safe point (after a step, after a validation, after a save, at the end of training), where the ranks agree on
it through a reduce: it saves the last finished step, leaves a ``PREEMPTED`` marker in the run directory for the
launcher to requeue on (and so that the run is not taken for finished: no summary), and stops the run; ``aimpre
train`` then exits with ``EXIT_PREEMPTED``.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from aimpre.files import regular_file, symlink, write_text
from aimpre.signals import StopSignals

_STEP = re.compile(r"^step-(\d+)\.ckpt$")
PREEMPTED = "PREEMPTED"
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal with a resumable checkpoint; the sbatch script requeues on it


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def step_checkpoints(directory: Path) -> list[Path]:
    """``step-N.ckpt`` entries, oldest first."""
    found = [(int(m.group(1)), p) for p in directory.glob("step-*.ckpt") if (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found)]


def point_last(directory: Path, target: Path) -> None:
    """Atomically makes ``directory/last.ckpt`` a relative symlink to ``target``."""
    symlink(target.name, directory / "last.ckpt")


def marker_text(step: int) -> str:
    """The ``PREEMPTED`` marker: the step its checkpoint holds, and the SLURM job (and restart) that wrote it, which
    the sbatch script checks so that it never requeues on a marker an earlier job left."""
    text = f"step {step}\n"
    if job := os.environ.get("SLURM_JOB_ID"):
        text += f"slurm job {job} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}\n"
    return text


class Checkpointer(pl.Callback):
    """Saves ``step-N.ckpt`` every ``every`` steps, at the end and on preemption; keeps the newest ``keep_last``.

    Put it after the callback that writes the metrics rows: a step's row is then on disk before its checkpoint.

    Args:
        directory: the run's checkpoints directory.
        every: steps between checkpoints.
        keep_last: step checkpoints kept (-1: all); ``last.ckpt``'s target is never removed.
        val_every: steps between validations (0: none). On those steps the checkpoint (and a preemption stop) waits
            for the validation, so that its row is logged before the checkpoint covers the step.
        stop: the stop-signal flag, installed by the caller for the whole run (``train`` does).
    """

    def __init__(
        self, directory: Path, every: int, keep_last: int, val_every: int = 0, stop: StopSignals | None = None
    ) -> None:
        self.directory, self.every, self.keep_last, self.val_every = Path(directory), every, keep_last, val_every
        self.stop = stop or StopSignals()
        self.saved_step = -1
        self.seen_step = -1  # the last step boundary handled (gradient accumulation calls the hook per micro-batch)
        self.pending = False  # a save that waits for this step's validation
        self.preempted = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob(".*.tmp*"):  # from a run killed while saving
                _remove(leftover)
        # Lightning's SIGTERM handler would run next to ours, broadcast from inside the handler (a collective that
        # can meet another in flight) and raise SIGTERMException out of validation or a save: the stop is ours alone
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None:
            connector.register_signal_handlers = lambda: None
        launcher = trainer.strategy.launcher  # Lightning's DDP launcher: the ranks it started (as Lightning's did)
        if launcher is not None:
            self.stop.forward = launcher.kill

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved_step = self.seen_step = trainer.global_step  # a resumed run's checkpoint exists already

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self.seen_step:  # gradient accumulation: not a step boundary yet
            return
        self.seen_step = step
        # keep the last checkpoint a good step's (the streak is read only on checkpoint steps: a host sync)
        self.pending = step % self.every == 0 and not getattr(pl_module, "bad_steps", 0) > 0
        if self.val_every and step % self.val_every == 0:
            return  # validation runs next: on_validation_end saves and acts on a stop signal
        if self.pending:
            self.save(trainer)
        if self._stop_requested(trainer):  # checked after the save: a signal during it counts too
            trainer.should_stop = True
            if not self.val_every:
                self._preempt(trainer)
            # else Lightning validates once more before it stops: on_validation_end leaves the marker after that

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self.pending:
            self.save(trainer)
        if self.preempted or self._stop_requested(trainer):
            trainer.should_stop = True
            self._preempt(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self.saved_step:
            self.save(trainer)
        if self.preempted or self._stop_requested(trainer):  # a signal during the last step's save, or after it
            self._preempt(trainer)

    def _stop_requested(self, trainer: pl.Trainer) -> bool:
        """Whether any rank received a stop signal (a collective: every rank calls it at the same points)."""
        got = bool(self.stop.received)
        if trainer.world_size > 1:
            got = trainer.strategy.reduce_boolean_decision(got, all=False)
        self.preempted = self.preempted or got
        return got

    def _preempt(self, trainer: pl.Trainer) -> None:
        """Saves the last finished step if it is not saved yet, then leaves the marker (once)."""
        if trainer.global_step != self.saved_step:
            self.save(trainer)
        if trainer.is_global_zero and not (self.directory.parent / PREEMPTED).exists():
            # after the checkpoint: the marker promises a resumable step
            write_text(self.directory.parent / PREEMPTED, marker_text(trainer.global_step))
        trainer.strategy.barrier("aimpre-preempted")  # every rank sees the marker when it returns

    def save(self, trainer: pl.Trainer) -> Path:
        step = trainer.global_step
        self.pending = False
        final = self.directory / f"step-{step}.ckpt"
        tmp = self.directory / f".step-{step}.ckpt.tmp"
        if trainer.is_global_zero:
            _remove(tmp)
        trainer.strategy.barrier("aimpre-ckpt-start")
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank writes its part; ends with a barrier
        if trainer.is_global_zero:
            if final.exists():
                _remove(final)
            os.replace(tmp, final)
            point_last(self.directory, final)
            if self.keep_last > 0:
                for old in step_checkpoints(self.directory)[: -self.keep_last]:
                    _remove(old)
        trainer.strategy.barrier("aimpre-ckpt-done")
        self.saved_step = step
        return final


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks to run code or to build objects no checkpoint of ours holds; nothing was run."""


# Everything a DCP ``.metadata`` pickle names (torch 2.4-2.14, ``torch/distributed/checkpoint/metadata.py`` and
# ``filesystem.py``): plain dataclasses and an enum, whose constructors only store their arguments.
_DCP_METADATA = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # looks a layout up by name in torch's namespace
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes above (and torch dtypes), as the ``pickle`` docs' "Restricting Globals" recipe."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"refers to {module}.{name}, which no checkpoint metadata holds")


def _safe_reader() -> type:
    """``FileSystemReader`` whose ``.metadata`` goes through ``_MetadataUnpickler`` instead of ``pickle.load``.

    Defined on first use, so that importing this module (every training run does) does not import DCP.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            rank = kwargs.get("rank")  # DCP falls back to a per-rank __RANK.metadata
            path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except UnsafeCheckpointError as e:
                raise UnsafeCheckpointError(f"{path}: {e}; nothing was loaded") from None
            except Exception as e:  # truncated or foreign pickles fail in many ways
                raise ValueError(f"{path}: not a torch.distributed.checkpoint metadata file ({_line(e)})") from e
            if not isinstance(metadata, Metadata):
                raise ValueError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
            if metadata.storage_meta is None:  # as FileSystemReader.read_metadata does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader


def _safe_planner(base: type) -> type:
    """``base`` (a DCP load planner) reading non-tensor values with ``weights_only=True``.

    DefaultLoadPlanner.load_bytes unpickles them with ``weights_only=False``; in our checkpoints they are the
    optimizer's param_groups (floats, tuples, strings).
    """
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(base):
        def set_up_planner(self, state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            self.loaded = state_dict  # filled in place by the empty-state-dict planner
            super().set_up_planner(state_dict, *args, **kwargs)

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(f"value {fqn!r} refused: {_line(e)}; nothing was run") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafePlanner


# torch's weights_only refusals wrap the reason in advice (re-run with weights_only=False, file an issue, read the
# docs) whose wording changes between releases: what was refused is the global it names, else the line after
# "WeightsUnpickler error:", else the first line that is not advice
_GLOBAL = re.compile(r"unsupported (?:global:\s+)?GLOBAL\s+(\S+?)[.,;]?(?:\s|$)", re.IGNORECASE)
_ADVICE = re.compile(r"weights.only|torch\.load|pytorch\.org|file an issue|trusted source", re.IGNORECASE)


def _line(e: BaseException) -> str:
    """An exception in one line: for torch's weights_only refusals (a dozen lines of advice), what was refused."""
    text = str(e)
    if m := _GLOBAL.search(text):
        return f"it refers to {m[1]}, which no checkpoint of ours holds (only tensors and plain values load)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "WeightsUnpickler error:" in text:
        after = text.split("WeightsUnpickler error:", 1)[1]
        reason = next((line.strip() for line in after.splitlines() if line.strip()), "")
        return f"its pickle holds what weights_only loading refuses ({reason[:200] or 'no reason given'})"
    if isinstance(e, pickle.UnpicklingError) and lines and _ADVICE.search(lines[0]):
        lines = [line for line in lines if not _ADVICE.search(line)] or ["its pickle holds more than tensors"]
    return (lines or [type(e).__name__])[0][:300]


def load_torch_file(path: Path) -> Any:
    """``torch.load`` of a file of ours with ``weights_only=True``: tensors and plain containers, no code. A FIFO
    or device is refused (reading one would block or never end)."""
    regular_file(path, "checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _GLOBAL.search(str(e)):  # garbage, a truncated file, an opcode torch's loader lacks: no code named
            raise ValueError(f"{path}: not a readable torch checkpoint ({_line(e)})") from None
        raise UnsafeCheckpointError(f"{path}: refused: {_line(e)}; nothing was run") from None
    except Exception as e:  # zip, pickle and storage errors have many types
        raise ValueError(f"{path}: not a readable torch checkpoint ({_line(e)})") from e


def load_sharded(path: Path, state: dict[str, Any]) -> None:
    """Fills ``state`` (tensors in place, other values replaced) from the DCP checkpoint directory ``path``.

    As ``torch.distributed.checkpoint.load``, but nothing in the directory is unpickled beyond checkpoint
    metadata classes and weights_only values.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    reader = _safe_reader()(path)
    reader.read_metadata()  # refused here, in one line: inside dcp.load a failure is logged with tracebacks
    try:
        dcp.load(state, storage_reader=reader, planner=_safe_planner(DefaultLoadPlanner)())
    except dcp.CheckpointException as e:  # DCP gathers per-rank failures; ours carry the file and the key
        raise _unwrap(e, path) from None


def _unwrap(e: BaseException, path: Path) -> ValueError:
    """DCP's CheckpointException (per-rank (exception, traceback) pairs) as one line naming the directory."""
    causes = [pair[0] for pair in getattr(e, "failures", {}).values()] or [e]
    cause = next((c for c in causes if isinstance(c, ValueError)), causes[0])
    if isinstance(cause, ValueError) and str(path) in str(cause):
        return cause
    if isinstance(cause, UnsafeCheckpointError):
        return UnsafeCheckpointError(f"{path}: {cause}")
    return ValueError(f"{path}: not a readable sharded checkpoint ({_line(cause)})")


def _check_claimed_sizes(path: Path, metadata: Any) -> None:
    """The tensors ``.metadata`` claims must fit in the shard files: a forged claim allocates nothing."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        claimed = sum(
            math.prod(m.size) * m.properties.dtype.itemsize
            for m in metadata.state_dict_metadata.values()
            if isinstance(m, TensorStorageMetadata)
        )
    except (AttributeError, TypeError) as e:  # the classes are DCP's, their fields anything a pickle can hold
        raise ValueError(f"{path / '.metadata'}: malformed tensor entries ({_line(e)})") from e
    on_disk = sum(p.stat().st_size for p in path.glob("*.distcp"))
    if claimed > on_disk:
        raise ValueError(f"{path}: .metadata claims {claimed} bytes of tensors, its .distcp files hold {on_disk}")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint as one dict, whether a file or a sharded (FSDP) directory, which is consolidated here.

    Nothing read can run code: files load with ``weights_only=True``, a sharded directory's ``.metadata`` through
    an unpickler that admits only DCP's metadata classes (see ``_MetadataUnpickler``).
    """
    given = Path(path)
    path = given.resolve()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not path.is_dir():
        regular_file(given, "checkpoint")  # named as given (last.ckpt), not as the file it links to
        return load_torch_file(path)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    reader = _safe_reader()(path)
    _check_claimed_sizes(path, reader.read_metadata())
    planner = _safe_planner(_EmptyStateDictLoadPlanner)()  # rebuilds the state from the metadata, as dcp_to_torch_save
    try:
        dcp.load({}, storage_reader=reader, planner=planner, no_dist=True)
    except dcp.CheckpointException as e:
        raise _unwrap(e, path) from None
    full = planner.loaded
    meta = path / "meta.pt"  # Lightning keeps the non-tensor state (step, loops, ...) beside the shards
    if meta.exists():
        saved = load_torch_file(meta)
        if not isinstance(saved, dict):
            raise ValueError(f"{meta}: holds a {type(saved).__name__}, not a dict of run state")
        full = {**saved, **full}
    return full


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The AIMv2 model's state dict (keys without the LightningModule's ``model.`` prefix)."""
    state = checkpoint.get("state_dict", checkpoint)
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


def safe_model_parallel_strategy(**kwargs: Any) -> pl.strategies.Strategy:
    """Lightning's ``ModelParallelStrategy`` (FSDP2), resuming without unpickling anything untrusted.

    Its own ``load_checkpoint`` reads a sharded directory through ``torch.distributed.checkpoint.load`` (which
    ``pickle.load``s ``.metadata`` and non-tensor values) and ``meta.pt`` with the caller's ``weights_only``.
    """
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    class SafeModelParallelStrategy(ModelParallelStrategy):
        def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
            path = Path(self.broadcast(checkpoint_path))
            if not path.is_dir():  # a consolidated file: Lightning's reader, told to unpickle nothing
                try:
                    return super().load_checkpoint(path, weights_only=True)
                except pickle.UnpicklingError as e:
                    raise UnsafeCheckpointError(f"{path}: refused: {_line(e)}; nothing was run") from None
            assert self.model is not None and self.lightning_module is not None
            # the sharded branch of lightning.fabric.strategies.model_parallel._load_checkpoint, with safe reads
            module = {"state_dict": get_model_state_dict(self.model)}
            load_sharded(path, module)
            self.model.load_state_dict(module["state_dict"], strict=self.lightning_module.strict_loading)
            for i, optimizer in enumerate(self.optimizers):
                key = f"optimizer_{i}"
                optim = {key: get_optimizer_state_dict(self.model, optimizer)}
                load_sharded(path, optim)
                set_optimizer_state_dict(
                    self.model, optimizer, optim_state_dict=optim[key], options=StateDictOptions(cpu_offload=True)
                )
            meta = load_torch_file(path / "meta.pt")
            if not isinstance(meta, dict):
                raise ValueError(f"{path / 'meta.pt'}: holds a {type(meta).__name__}, not a dict of run state")
            return meta

    return SafeModelParallelStrategy(**kwargs)
