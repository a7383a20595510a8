"""Parallelising the model, per block: activation checkpointing -> torch.compile -> FSDP2 (torchtitan's order).

Each step keeps the parameter names (a flag for recomputation, in-place ``Module.compile``), so checkpoints and
exports look the same whatever was applied.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from aimpre.model.layers import Block

M = TypeVar("M", bound=nn.Module)


def blocks(model: nn.Module) -> list[Block]:
    """Every transformer block of any objective's model: encoder, decoder, text tower."""
    return [b for b in model.modules() if isinstance(b, Block)]


def parallelize(
    model: M,
    *,
    recompute: bool = False,
    compile: bool = False,
    mesh: DeviceMesh | None = None,
    param_dtype: torch.dtype | None = None,
) -> M:
    """Applies, in order: activation checkpointing, compile, then FSDP2 ``fully_shard`` of every block and of
    the whole model (the embeddings, norms and heads) over ``mesh``.

    Args:
        model: the model, in place.
        recompute: recompute each block in backward.
        compile: ``torch.compile`` each block.
        mesh: the data-parallel device mesh to shard over; None: no sharding (DDP or one device).
        param_dtype: FSDP2 compute dtype of parameters (bf16 for bf16 training); gradients reduce in fp32.
    """
    for block in blocks(model):
        block.recompute = recompute
        if compile:
            block.compile()
    if mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
