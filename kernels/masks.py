"""The three attention masks of AIMv2, as predicates and as dense boolean matrices.

A query at position i may see key j when:
  full:    always
  causal:  j <= i
  prefix:  j <= i or j < prefix_len[b]   (bidirectional inside the prefix, causal after; AIMv2 / ml-l3m
           ``PrefixAttentionMaskBuilder``)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

MASKS = ("full", "causal", "prefix")


def check_mask(mask: str, prefix_len: Tensor | None, batch: int) -> None:
    if mask not in MASKS:
        raise ValueError(f"unknown attention mask {mask!r}; expected one of {MASKS}")
    if mask == "prefix":
        if prefix_len is None:
            raise ValueError("mask='prefix' needs prefix_len, an int tensor [B]")
        if prefix_len.shape != (batch,) or prefix_len.is_floating_point():
            raise ValueError(f"prefix_len must be an int tensor of shape [{batch}], got {tuple(prefix_len.shape)}")


def dense_mask(mask: str, prefix_len: Tensor | None, T: int, device: torch.device) -> Tensor | None:
    """Boolean [B or 1, 1, T, T] matrix, True where a query sees a key; None for the full mask."""
    if mask == "full":
        return None
    i = torch.arange(T, device=device)
    allowed = (i[None, :] <= i[:, None])[None, None]  # [1, 1, T, T] causal
    if mask == "prefix":
        assert prefix_len is not None
        in_prefix = i[None, :] < prefix_len.to(device)[:, None]  # [B, T] keys inside each sample's prefix
        allowed = allowed | in_prefix[:, None, None, :]  # [B, 1, T, T]
    return allowed


@dataclass(frozen=True)
class Mask:
    """A mask built once per forward and handed to every block (torchtitan, apple/ml-l3m): what a backend would
    otherwise build in each block. Nothing inside a (compiled) block builds, caches or looks it up.

    Args:
        kind: "full", "causal" or "prefix".
        prefix_len: int tensor [B] for "prefix", else None.
        block_mask: FlexAttention's BlockMask, when a block runs the flex backend (else None).
        dense: the boolean [B, 1, T, T] matrix of ``dense_mask`` for SDPA's prefix mask (else None).
    """

    kind: str
    prefix_len: Tensor | None = None
    block_mask: Any = None
    dense: Tensor | None = None
