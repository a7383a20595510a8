"""Contrastive losses: their definitions at initialisation, and on 2 gloo processes the loss and gradients of one
process holding the global batch."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aimpre.objectives import ClipLoss, SigLipLoss

# One step of two linear towers and a loss on a global batch of 8 pairs; under torch.distributed each rank holds
# its slice, and gradients are averaged over ranks as DDP does. Prints nothing; saves the loss (averaged over
# ranks) and every gradient.
STEP = """
import os, sys, torch
import torch.distributed as dist
from aimpre.objectives import ClipLoss, SigLipLoss

def step(kind, rank, world):
    g = torch.Generator().manual_seed(0)
    images, texts = (torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(2))
    torch.manual_seed(1)
    towers = torch.nn.ModuleDict({"image": torch.nn.Linear(5, 4), "text": torch.nn.Linear(5, 4),
                                  "loss": ClipLoss() if kind == "clip" else SigLipLoss()}).double()
    mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
    loss = towers["loss"](towers["image"](images[mine]), towers["text"](texts[mine]))
    loss.backward()
    out = {"loss": loss.detach()} | {n: p.grad for n, p in towers.named_parameters()}
    if world > 1:
        for v in out.values():
            dist.all_reduce(v)
            v /= world
    return out

if __name__ == "__main__":
    kind, out, store = sys.argv[1:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    result = step(kind, rank, world)
    if rank == 0:
        torch.save(result, out)
    if world > 1:
        dist.destroy_process_group()
"""


def _run(tmp_path: Path, kind: str, world: int) -> dict[str, torch.Tensor]:
    script, out = tmp_path / "step.py", tmp_path / f"{kind}-{world}.pt"
    script.write_text(STEP)
    store = tmp_path / f"store-{kind}-{world}"
    procs = [
        subprocess.Popen([sys.executable, str(script), kind, str(out), str(store)],
                         env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]  # fmt: skip
    for p in procs:
        log, _ = p.communicate(timeout=120)
        assert p.returncode == 0, log
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_ranks_give_the_loss_and_gradients_of_the_global_batch(tmp_path: Path, kind: str) -> None:
    one, two = _run(tmp_path, kind, 1), _run(tmp_path, kind, 2)
    assert one.keys() == two.keys() and len(one) == (6 if kind == "clip" else 7)  # loss, 2 towers' weight and bias,
    # and the loss's own parameters (CLIP's scale; SigLIP's temperature and bias)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-12, atol=1e-12, msg=name)
    assert all(v.abs().sum() > 0 for v in one.values())


def test_clip_loss_is_symmetric_infonce_with_a_learnable_temperature_clamped_after_the_step() -> None:
    torch.manual_seed(0)
    image, text = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    loss = ClipLoss().double()
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    sim = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / 0.07
    by_hand = -(sim.log_softmax(1).diag().mean() + sim.log_softmax(0).diag().mean()) / 2
    torch.testing.assert_close(loss(image, text), by_hand)
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(1000.0))
    loss.clamp_()  # what the trainer does after each optimiser step; the forward uses the scale as it is
    sim100 = sim * 0.07 * 100  # clamped at 100
    torch.testing.assert_close(
        loss(image, text), -(sim100.log_softmax(1).diag().mean() + sim100.log_softmax(0).diag().mean()) / 2
    )


def test_siglip_loss_is_the_papers_sum_over_pairs() -> None:
    torch.manual_seed(0)
    image, text = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    loss = SigLipLoss().double()
    assert (loss.log_t.exp().item(), loss.bias.item()) == (pytest.approx(10.0), -10.0)
    x, y = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    t = loss.log_t.exp().item()  # 10 up to the float32 rounding of log 10
    total = sum(
        -math.log(torch.sigmoid((1 if i == j else -1) * (t * x[i] @ y[j] - 10)).item())
        for i in range(5)
        for j in range(5)
    )
    assert loss(image, text).item() == pytest.approx(total / 5, rel=1e-12)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        loss(image, text[:4])
