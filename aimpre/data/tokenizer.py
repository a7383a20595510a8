"""Caption tokenizers behind one small interface.

AIMv2 used SigLIP's 32k SentencePiece model (lower-cased, 77 tokens), which we cannot ship. The default here is
a byte-level tokenizer that needs no file. Unlike ml-l3m, where pad and end-of-text share one id (so end-of-text
is never trained), pad and EOS are distinct ids and EOS is a prediction target.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of a caption, without EOS."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records to detect a different tokenizer on resume."""
        ...


class ByteTokenizer:
    """UTF-8 bytes shifted by two: id 0 is pad, 1 is end-of-text, 2..257 are bytes."""

    pad_id = 0
    eos_id = 1
    vocab_size = 258

    def __init__(self, lowercase: bool = True) -> None:
        self.lowercase = lowercase

    def encode(self, text: str) -> list[int]:
        if self.lowercase:
            text = text.lower()
        return [b + 2 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 2 for i in ids if i >= 2).decode("utf-8", errors="replace")

    def identity(self) -> dict[str, Any]:
        return {"kind": "bytes", "vocab_size": self.vocab_size, "lowercase": self.lowercase}


def build_tokenizer(spec: str, lowercase: bool = True) -> Tokenizer:
    """Args:
    spec: "bytes" (the default, no file needed).
    lowercase: lower-case captions before encoding (as AIMv2 does).
    """
    if spec == "bytes":
        return ByteTokenizer(lowercase)
    raise ValueError(f"data.tokenizer: unknown tokenizer {spec!r}; supported: 'bytes'")


def encode_captions(tok: Tokenizer, captions: list[str], length: int) -> tuple[Tensor, Tensor]:
    """Ids [B, length] (caption + EOS, truncated, then padded) and the mask [B, length] of non-pad positions.

    A caption longer than ``length - 1`` tokens is cut and keeps no EOS: it did not end there.
    """
    ids = torch.full((len(captions), length), tok.pad_id, dtype=torch.long)
    for row, caption in enumerate(captions):
        toks = [*tok.encode(caption), tok.eos_id][:length]
        ids[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    return ids, ids != tok.pad_id
