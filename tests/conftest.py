"""Shared fixtures: a small real demo shard set, and a private cache so tests never touch ~/.cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Under pytest-xdist (make test) each worker process gets one thread: the workers already fill the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
# Without a GPU the Triton kernels run in Triton's interpreter. The switch is read when a kernel is defined, i.e. on
# the first import of aimpre.kernels.triton_attention, which happens lazily, after this.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"  # transformers and timm must never reach the network in tests


@pytest.fixture(autouse=True)
def _triton_tiles(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed Triton tiles, no benchmarking, except in tests marked ``autotune``: autotuning every GPU test made
    tests/test_triton_attention.py take minutes on an H200. Read by the kernels at call time."""
    monkeypatch.setenv("AIMPRE_TRITON_AUTOTUNE", "1" if request.node.get_closest_marker("autotune") else "0")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["AIMPRE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo data set (800 scenes + the digits), written once per session as real tar shards."""
    from aimpre.data import write_demo

    return write_demo(tmp_path_factory.mktemp("demo") / "demo", n_scenes=800, n_val=128, per_shard=250)


@pytest.fixture(scope="session")
def pretrain_spec(demo: Path) -> str:
    from aimpre.data import demo_shards

    shards = demo_shards("pretrain", demo)
    return f"{demo}/pretrain-{{000000..{len(shards) - 1:06d}}}.tar"


@pytest.fixture(scope="session")
def val_spec(demo: Path) -> str:
    return str(demo / "val-000000.tar")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, pretrain_spec: str, val_spec: str) -> Path:
    """A real 6-step Lightning run of a 2-block tiny model (checkpoints, metrics.csv, summary.json)."""
    from aimpre.config import load_config
    from aimpre.train import train

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        None,
        [
            f"run.out_dir={out}", "run.name=tiny2", f"data.train_shards={pretrain_spec}", f"data.val_shards={val_spec}",
            "data.batch_size=4", "data.num_workers=0", "model.depth=2", "model.dec_depth=1", "trainer.max_steps=6",
            "trainer.ckpt_every=3", "trainer.log_every=1", "trainer.val_every=3", "trainer.val_batches=1",
            "optim.warmup_steps=2",
        ],
    )  # fmt: skip
    return train(cfg)
