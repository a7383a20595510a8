"""Issue 22 (the first GPU lease returns every number), its CPU side: the plain build of `bench step` compiles to one
graph, and training steps between logging steps read nothing back from the device."""

from __future__ import annotations

import torch

from aimpre.model import AIMv2, model_config
from aimpre.train.bench import plain_attention

# The tiny model as `bench step` builds it for plain (torch's own fused ops), at a small image for speed.
TINY = {"vocab_size": 258, "img_size": 56, "text_len": 16, "fused": "torch"}


def test_plain_build_compiles_to_one_graph() -> None:
    """The Flex block mask is built once in the encoder's forward and handed to the blocks: a block-mask cache
    looked up in every block broke the graph there (12 graphs, 11 breaks for the tiny model before)."""
    torch.manual_seed(0)
    net = AIMv2(model_config("tiny", **TINY))
    plain_attention(net, compile=True)  # Flex in the encoder, SDPA in the decoder
    B, cfg = 2, net.cfg
    images = torch.randn(B, 3, cfg.img_size, cfg.img_size)
    text = torch.randint(2, 258, (B, cfg.text_len))
    prefix = torch.randint(1, cfg.num_patches, (B,))
    torch._dynamo.reset()
    with torch.no_grad():  # Flex has no CPU backward; the graphs Dynamo captures are the same
        explained = torch._dynamo.explain(net)(images, text, torch.ones_like(text, dtype=torch.bool), prefix)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1
