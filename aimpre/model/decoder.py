"""The AIMv2 causal multimodal decoder.

Input sequence (apple/ml-l3m ``VisionAndTextPreprocessor``, "vision||text"):
``[Linear(encoder tokens) ; start + embed(caption) + text positions]``. The image tokens get no extra position
embedding. Every position attends causally over the whole sequence.

Departure from the reference, with no change to the function: ml-l3m feeds start + all 77 caption tokens
(334 long) and drops the last output. Under a causal mask the last input token influences no kept output, so we
feed start + the first ``text_len - 1`` tokens: the sequence is ``N + text_len`` (333 at 224 px) and the text
position table has ``text_len`` rows instead of 78.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aimpre.model.layers import Block, RMSNorm, blocks_mask, init_linear_xavier
from aimpre.model.sizes import ModelConfig


class MultimodalDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        D = cfg.dec_width
        self.img_proj = nn.Linear(cfg.width, D, bias=True)
        self.text_embed = nn.Embedding(vocab_size, D)
        self.start_token = nn.Parameter(torch.zeros(1, 1, D))
        self.text_pos = nn.Parameter(torch.zeros(1, cfg.text_len, D))
        self.blocks = nn.ModuleList(
            Block(D, cfg.dec_heads, cfg.dec_mlp_hidden, cfg.norm_eps, cfg.attn_backend, cfg.fused)
            for _ in range(cfg.dec_depth)
        )
        self.norm = RMSNorm(D, cfg.norm_eps, cfg.fused)
        self.init_weights()

    def init_weights(self) -> None:
        init_linear_xavier(self.blocks)
        self.norm.reset_parameters()
        self.img_proj.reset_parameters()  # ml-l3m builds it as a plain nn.Linear: PyTorch's default init
        nn.init.normal_(self.text_embed.weight, std=0.02)
        nn.init.normal_(self.start_token, std=0.02)
        nn.init.normal_(self.text_pos, std=0.01)

    def forward(self, image_tokens: Tensor, text: Tensor) -> Tensor:
        """Args:
            image_tokens: encoder output [B, N, width].
            text: caption ids [B, text_len]; the last one is never an input (see the module docstring).

        Returns:
            Final-norm hidden states [B, N + text_len, dec_width].
        """
        B, L = text.shape
        txt = self.text_embed(text[:, :-1])  # [B, L-1, D]
        txt = torch.cat([self.start_token.expand(B, -1, -1), txt], dim=1) + self.text_pos[:, :L]  # [B, L, D]
        x = torch.cat([self.img_proj(image_tokens), txt], dim=1)  # [B, N + L, D]
        mask = blocks_mask(self.blocks, "causal", None, x)  # once for every block
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)
