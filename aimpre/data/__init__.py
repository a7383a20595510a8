"""Data: shard writing, the loading pipeline and tokenizers (knows nothing of the model)."""

from aimpre.data.decode import SKIP_REASONS, Augment
from aimpre.data.demo import demo_dir, demo_shards, demo_spec, sources, spec_urls, write_demo
from aimpre.data.pipeline import ImageTextStream, StreamLoader, batches_per_epoch
from aimpre.data.shards import write_shards
from aimpre.data.shardset import Shard, expand_shards, shard_set
from aimpre.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer, encode_captions

__all__ = [
    "SKIP_REASONS",
    "Augment",
    "ByteTokenizer",
    "HFTokenizer",
    "ImageTextStream",
    "Shard",
    "StreamLoader",
    "Tokenizer",
    "batches_per_epoch",
    "build_tokenizer",
    "demo_dir",
    "demo_shards",
    "demo_spec",
    "encode_captions",
    "expand_shards",
    "shard_set",
    "sources",
    "spec_urls",
    "write_demo",
    "write_shards",
]
