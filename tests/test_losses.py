"""The pixel and text losses, checked against sums written out by hand."""

from __future__ import annotations

import math

import torch

from aimpre.model.losses import normalize_patches, patchify, pixel_loss, text_loss, unpatchify


def test_patchify_layout_is_row_column_channel() -> None:
    img = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)  # B=2, C=3, H=4, W=6, p=2
    patches = patchify(img, 2)
    assert patches.shape == (2, 6, 12)
    for b in range(2):
        for gy in range(2):
            for gx in range(3):
                for r in range(2):
                    for q in range(2):
                        for c in range(3):
                            got = patches[b, gy * 3 + gx, (r * 2 + q) * 3 + c]
                            assert got == img[b, c, gy * 2 + r, gx * 2 + q]
    torch.testing.assert_close(unpatchify(patchify(img[:, :, :, :4], 2), 2), img[:, :, :, :4])


def _by_hand_normalise(values: list[float]) -> list[float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)  # unbiased, as ml-l3m
    return [(v - mean) / math.sqrt(var + 1e-6) for v in values]


def test_pixel_loss_by_hand() -> None:
    torch.manual_seed(0)
    B, N, P = 2, 4, 3
    patches = torch.randn(B, N, P, dtype=torch.float64)
    pred = torch.randn(B, N - 1, P, dtype=torch.float64)
    prefix = torch.tensor([1, 3])  # sample 0: targets are patches 1, 2, 3; sample 1: only patch 3
    total, count = 0.0, 0
    for b in range(B):
        for i in range(N - 1):  # prediction i is for patch i + 1
            if i + 1 < int(prefix[b]):
                continue
            target = _by_hand_normalise(patches[b, i + 1].tolist())
            total += sum((float(pred[b, i, k]) - target[k]) ** 2 for k in range(P)) / P
            count += 1
    assert count == 4
    torch.testing.assert_close(pixel_loss(pred, patches, prefix), torch.tensor(total / count, dtype=torch.float64))


def test_prefix_patches_carry_no_loss() -> None:
    patches = torch.randn(1, 5, 6)
    pred = torch.zeros(1, 4, 6)
    prefix = torch.tensor([3])
    base = pixel_loss(pred, patches, prefix)
    pred[0, :2] = 100.0  # predictions of patches 1 and 2, inside the prefix
    assert pixel_loss(pred, patches, prefix) == base
    pred[0, 2] = 100.0  # prediction of patch 3, the first after the prefix
    assert pixel_loss(pred, patches, prefix) > base


def test_normalised_targets() -> None:
    x = torch.randn(4, 7, 588, dtype=torch.float64) * 5 + 3
    t = normalize_patches(x)
    torch.testing.assert_close(t.mean(-1), torch.zeros(4, 7, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(4, 7, dtype=torch.float64), atol=1e-6, rtol=0)
    flat = normalize_patches(torch.full((1, 1, 588), 0.7))
    assert flat.abs().max() < 1e-3  # a flat patch is a zero target, not noise blown up


def test_text_loss_ignores_pads() -> None:
    logits = torch.randn(2, 4, 10, dtype=torch.float64)
    text = torch.tensor([[3, 4, 1, 0], [5, 1, 0, 0]])  # 1 = EOS (a target), 0 = pad
    mask = text != 0
    total = 0.0
    for b in range(2):
        for j in range(4):
            if mask[b, j]:
                total += float(torch.logsumexp(logits[b, j], 0) - logits[b, j, text[b, j]])
    torch.testing.assert_close(text_loss(logits, text, mask), torch.tensor(total / 5, dtype=torch.float64))
    logits[1, 3] += 50.0  # a pad position: no effect
    torch.testing.assert_close(text_loss(logits, text, mask), torch.tensor(total / 5, dtype=torch.float64))
