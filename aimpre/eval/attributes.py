"""Held-out scene-attribute probe (issue 19, point 7): which facts of a freshly rendered scene an encoder's frozen
tokens still hold, beside the same architecture at random init, the raw pixels, and the majority class.

The digits probe has little headroom (logistic regression on raw 8x8 pixels 96.5%, a random-init encoder 89.8%);
scene attributes separate encoders. Questions (``aimpre.eval.scenes.ATTRIBUTES``): how many objects, and the shape,
colour, size, row, column of the upper object, and the background. Each is one classification probe per readout:

- ``attentive``: AIM's attention-pooling head (``aimpre.model.pooling``), as ``aimpre probe`` trains it;
- ``linear``: a linear layer on the mean-pooled tokens;
- ``patch``: a linear layer on all tokens flattened ([T x C] features), so each patch has weights of its own and
  position is read from *where* a feature is, not from the position embedding. Pooled readouts can only read
  position if the tokens carry it, and the position embedding is ~2% of the token norm (issue 19).

On ``pixels`` the ``patch`` readout is logistic regression on the whole (normalised) picture.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aimpre.eval import finish_record
from aimpre.eval.names import READOUTS
from aimpre.eval.scenes import ATTRIBUTES, attribute_labels, judged_encoders, judged_record, render_scenes
from aimpre.probe import Layers, ProbeSettings, train_probe


def probe_heads(dim: int) -> int:
    """Attentive-probe heads for a width: head dim 64 where it divides (as ``aimpre probe``), else the largest
    divisor of ``dim`` not over ``dim // 64`` (the raw-pixel tokens are 588 wide at patch 14)."""
    want = max(1, dim // 64)
    return next(h for h in range(want, 0, -1) if dim % h == 0)


def readout_probe(
    readout: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    s: ProbeSettings,
    widths: list[int] | None = None,
    fusion: str = "concat",
) -> dict[str, Any]:
    """One probe of ``readout`` (in READOUTS) trained on ``train`` tokens [N, T, C] and labels, scored on ``test``.

    Args:
        readout: "attentive", "linear" or "patch" (a linear layer on the flattened tokens).
        train: tokens [N, T, C] and labels [N].
        test: held-out tokens and labels.
        s: probe training settings.
        widths: for fused tokens (several encoders' concatenated), each one's width; ``fusion`` "sum" then
            projects and sums them with the head (``train_probe``). The patch readout always reads the
            concatenation: a linear layer on all tokens contains any projection and sum of them.
        fusion: "concat" or "sum".
    """
    if readout not in READOUTS:
        raise ValueError(f"unknown readout {readout!r}; readouts: {', '.join(READOUTS)}")
    if readout == "patch":  # one token of T x C features: the linear probe's mean over it is the identity
        train, test = ((x.flatten(1)[:, None], y) for x, y in (train, test))
        widths = None
    dim = train[0].shape[-1] if widths is None or fusion == "concat" else max(widths)
    s = replace(s, heads=s.heads or probe_heads(dim))
    return train_probe("linear" if readout == "patch" else readout, train, test, s, widths, fusion)


def majority(train: Tensor, test: Tensor) -> float:
    """Test accuracy of always answering the most common training class."""
    return float((test == torch.bincount(train).argmax()).float().mean())


def attribute_rows(
    encoder_path: str | Path,
    n_train: int = 2000,
    n_test: int = 1000,
    readouts: tuple[str, ...] = READOUTS,
    attributes: tuple[str, ...] = tuple(ATTRIBUTES),
    settings: ProbeSettings | None = None,
    baselines: bool = True,
    fuse: tuple[str, ...] = (),
    fusion: str = "concat",
    layers: Layers | None = None,
) -> list[dict[str, Any]]:
    """Rows of the attribute table: one per encoder, attribute and readout (``aimpre compare`` can add them).

    Args:
        encoder_path: anything ``aimpre.export.load`` reads.
        n_train: held-out scenes the probe heads train on.
        n_test: other held-out scenes they are scored on.
        readouts: from READOUTS.
        attributes: from ``aimpre.eval.scenes.ATTRIBUTES``.
        settings: probe training (default: ``ProbeSettings(epochs=30)``).
        baselines: add the random-init and raw-pixel encoders and the majority class.
        fuse: more encoders (paths, or "pixels"), each probed alone and fused with the encoder
            (``aimpre.eval.scenes.judged_encoders``).
        fusion: how the fused row combines them: "concat" or "sum".
        layers: the blocks the encoder and its random-init twin are read at (None: the output).

    Returns:
        Dicts with ``encoder`` ("encoder", "random_init", "pixels", each ``fuse`` path, the fused row "encoder + ..."
        or "encoder (+) ...", "majority"), ``attribute``, ``readout``,
        ``top1`` and ``train_top1`` (None for the majority class).
    """
    unknown = [a for a in attributes if a not in ATTRIBUTES] + [r for r in readouts if r not in READOUTS]
    if unknown:
        raise ValueError(f"unknown attribute or readout {unknown[0]!r}; attributes: {', '.join(ATTRIBUTES)}; "
                         f"readouts: {', '.join(READOUTS)}")  # fmt: skip
    s = settings or ProbeSettings(epochs=30)
    judged = judged_encoders(encoder_path, s.seed, random_init=baselines, pixels=baselines, fuse=fuse, fusion=fusion,
                             layers=layers)  # fmt: skip
    train, test = render_scenes(n_train, judged.img_size, "train"), render_scenes(n_test, judged.img_size, "test")
    y, yt = attribute_labels(train.facts), attribute_labels(test.facts)
    rows: list[dict[str, Any]] = []
    for name, tokens in judged.tokens.items():
        x, xt = tokens(train.images), tokens(test.images)
        for a in attributes:
            for r in readouts:
                res = readout_probe(r, (x, y[a]), (xt, yt[a]), s, judged.widths.get(name), fusion)
                rows.append({"encoder": name, "attribute": a, "readout": r, "top1": res["top1"],
                             "train_top1": res["train_top1"]})  # fmt: skip
    if baselines:
        rows += [
            {"encoder": "majority", "attribute": a, "readout": "-", "top1": majority(y[a], yt[a]), "train_top1": None}
            for a in attributes
        ]
    return rows


def run_attributes(encoder_path: str | Path, out: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """``attribute_rows`` with what they were measured on; written as JSON to ``out`` (atomically) if given.

    Args:
        encoder_path: anything ``aimpre.export.load`` reads.
        out: results JSON.
        **kwargs: ``attribute_rows``'s options.
    """

    start = time.time()
    rows = attribute_rows(encoder_path, **kwargs)
    s = kwargs.get("settings") or ProbeSettings(epochs=30)
    res = {
        "encoder_path": str(encoder_path),
        "scenes": {
            "train": kwargs.get("n_train", 2000),
            "test": kwargs.get("n_test", 1000),
            "held_out": "aimpre.eval.scenes: streams seeded (19, split), disjoint from the demo's",
        },
        "settings": vars(s),
        **judged_record(kwargs),
        "rows": rows,
    }
    return finish_record(res, start, out)
