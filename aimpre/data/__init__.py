"""Data: shard writing, the loading pipeline and tokenizers (knows nothing of the model)."""

from aimpre.data.demo import demo_dir, demo_shards, write_demo
from aimpre.data.pipeline import Augment, ImageTextStream
from aimpre.data.shards import expand_shards, write_shards
from aimpre.data.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer, encode_captions

__all__ = [
    "Augment",
    "ByteTokenizer",
    "ImageTextStream",
    "Tokenizer",
    "build_tokenizer",
    "demo_dir",
    "demo_shards",
    "encode_captions",
    "expand_shards",
    "write_demo",
    "write_shards",
]
