"""Per-block activation checkpointing and compile change neither the function nor the parameter names."""

from __future__ import annotations

import torch

from aimpre.model import AIMv2, model_config
from aimpre.train.parallel import parallelize


def _model() -> AIMv2:
    torch.manual_seed(0)
    return AIMv2(model_config("tiny", vocab_size=64, img_size=28, depth=1, dec_depth=1, text_len=8))


def _loss_and_grads(model: AIMv2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    images, text = torch.randn(2, 3, 28, 28, generator=g), torch.randint(2, 64, (2, 8), generator=g)
    out = model(images, text, torch.ones_like(text, dtype=torch.bool), torch.tensor([1, 3]))
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_recompute_and_compile_keep_the_function_and_names() -> None:
    loss, grads = _loss_and_grads(_model())
    for kw in ({"recompute": True}, {"recompute": True, "compile": True}):
        model = parallelize(_model(), **kw)
        assert list(dict(model.named_parameters())) == list(grads)  # checkpoints and exports stay the same
        loss2, grads2 = _loss_and_grads(model)
        torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
        for n in grads:
            torch.testing.assert_close(grads2[n], grads[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
