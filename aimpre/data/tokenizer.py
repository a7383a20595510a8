"""Caption tokenizers behind one small interface.

AIMv2 used SigLIP's 32k SentencePiece model (lower-cased, 77 tokens), which we cannot ship. The default here is
a byte-level tokenizer that needs no file; any Hugging Face ``tokenizers`` file (``tokenizer.json``) works too,
and ``train_bpe`` makes one from the captions of a shard set. Unlike ml-l3m, where pad and end-of-text share one
id (so end-of-text is never trained), pad and EOS are distinct ids and EOS is a prediction target.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from aimpre.files import atomic_path

PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "[EOS]", "<|eos|>", "[SEP]")
MAX_VOCAB = 1 << 20  # ids a trained BPE may have: 30 times SigLIP's


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


class HFTokenizer:
    """A Hugging Face ``tokenizers`` file. Its pad and end-of-text tokens are found by their usual names."""

    def __init__(self, path: str | Path, lowercase: bool = True) -> None:
        from tokenizers import Tokenizer as _HF

        self.path = Path(path)
        try:
            self.tok = _HF.from_file(str(self.path))
        except Exception as e:
            raise ValueError(f"data.tokenizer: {self.path} is not a tokenizers file: {e}") from e
        self.lowercase = lowercase
        self.vocab_size = self.tok.get_vocab_size()
        self.pad_id = self._special(PAD_NAMES, "pad")
        self.eos_id = self._special(EOS_NAMES, "end-of-text")
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def _special(self, names: tuple[str, ...], what: str) -> int:
        for name in names:
            i = self.tok.token_to_id(name)
            if i is not None:
                return int(i)
        raise ValueError(f"data.tokenizer: {self.path} has no {what} token (looked for {', '.join(names)})")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text.lower() if self.lowercase else text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in (self.pad_id, self.eos_id)])

    def identity(self) -> dict[str, Any]:
        return {"kind": "hf", "sha256": self.sha256, "vocab_size": self.vocab_size, "lowercase": self.lowercase}


def build_tokenizer(spec: str, lowercase: bool = True) -> Tokenizer:
    """Args:
    spec: "bytes" (the default, no file needed) or the path of a Hugging Face ``tokenizer.json``.
    lowercase: lower-case captions before encoding (as AIMv2 does).
    """
    if spec == "bytes":
        return ByteTokenizer(lowercase)
    if not os.path.isfile(spec):
        raise ValueError(f"data.tokenizer: {spec!r} is neither 'bytes' nor an existing tokenizer.json file")
    return HFTokenizer(spec, lowercase)


def train_bpe(captions: Iterable[str], vocab_size: int, out: Path, lowercase: bool = True) -> Path:
    """Trains a byte-level BPE on captions and writes it (atomically) as a ``tokenizers`` file.

    Ids 0 and 1 are ``<pad>`` and ``</s>``; byte-level pre-tokenisation means no caption is ever unknown.
    """
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least 258 ids")
    if vocab_size > MAX_VOCAB:  # the trainer would panic (Rust) or exhaust memory
        raise ValueError(f"--vocab-size {vocab_size} is too large: at most {MAX_VOCAB} ids (SigLIP's has 32000)")
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((c.lower() if lowercase else c for c in captions), trainer=trainer)
    out = Path(out)
    with atomic_path(out) as tmp:
        tok.save(str(tmp))
    return out


def encode_captions(tok: Tokenizer, captions: list[str], length: int) -> tuple[Tensor, Tensor]:
    """Ids [B, length] (caption + EOS, truncated, then padded) and the mask [B, length] of non-pad positions.

    A caption longer than ``length - 1`` tokens is cut and keeps no EOS: it did not end there.
    """
    rows = []
    for caption in captions:
        toks = [*tok.encode(caption), tok.eos_id][:length]
        rows.append(toks + [tok.pad_id] * (length - len(toks)))
    ids = torch.tensor(rows, dtype=torch.long).reshape(len(captions), length)  # reshape: an empty batch too
    return ids, ids != tok.pad_id
