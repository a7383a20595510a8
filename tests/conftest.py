"""Shared fixtures: a small real demo shard set, and a private cache so tests never touch ~/.cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Without a GPU the Triton kernels run in Triton's interpreter. The switch is read when a kernel is defined, i.e. on
# the first import of aimpre.kernels.triton_attention, which happens lazily, after this.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
