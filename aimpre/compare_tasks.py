"""The held-out scene evaluations of ``aimpre compare``: scene attributes, localization and the VLM probe, per row.

One set of held-out scenes (``aimpre.eval.scenes.render_scenes``: streams disjoint from the demo's) is rendered per
comparison at the compared resolution, with a few held-out digits for the VLM probe's digit questions; every row's
tokens of those pictures are extracted once and shared by the three probes, and each (task, row) result is cached in
``out/eval`` as JSON keyed by a digest of what produced it (the row's run and architecture, the task's settings), so
an interrupted comparison continues and a second call recomputes nothing. Rows: each trained encoder, the same
architecture at random initialisation, the raw patchified pixels, and per task the answer that ignores the picture
(attributes: the majority class; localization: the training set's mean map and box; VLM: the language model with no
image at all). Every encoder gets the same budget (``EvalSettings``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from aimpre.files import read_json_object, write_text

TASKS = ("digits", "zero-shot", "attributes", "localize", "vlm")
SCENE_TASKS = ("attributes", "localize", "vlm")
ATTRS = ("count", "shape", "colour", "size", "row", "column")  # issue 19's; the background is too easy to tell apart
LOC_METRICS = ("patch_iou", "box_iou", "box_acc50", "reg_box_iou")
PICTURE_FREE = {"attributes": "majority", "localize": "mean", "vlm": "text only"}  # the rows that see no picture


@dataclass(frozen=True)
class EvalSettings:
    """The scene probes' budget, the same for every row. The defaults are sized for the default comparison's time
    budget (7 rows, about a minute per row for all three tasks on the 2-core CPU); measured on a shared machine
    only (see the compare-eval report): the default comparison's time is the lead's to confirm idle.

    Args:
        train_scenes, test_scenes: held-out scenes the heads train on and are scored on.
        train_digits, test_digits: held-out digits added to the VLM probe (its digit questions).
        train_text, test_text: held-out scenes with a number written on them, for the VLM probe's "read the text"
            questions (``aimpre.eval.vlm.render_text_scene``).
        attr_readouts: attribute-probe readouts (``aimpre.eval.names.READOUTS``).
        attr_epochs, attr_seeds: attribute-probe epochs and seeds (0 .. N-1).
        loc_epochs, loc_seeds: localization head epochs and seeds.
        vlm_steps, vlm_seeds, vlm_connector: the VLM probe's training steps, seeds and connector.
    """

    train_scenes: int = 400
    test_scenes: int = 200
    train_digits: int = 100
    test_digits: int = 60
    train_text: int = 100
    test_text: int = 50
    attr_readouts: tuple[str, ...] = ("linear", "patch")
    attr_epochs: int = 10
    attr_seeds: int = 2
    loc_epochs: int = 10
    loc_seeds: int = 2
    vlm_steps: int = 200
    vlm_seeds: int = 1
    vlm_connector: str = "mlp"

    def task(self, name: str) -> dict[str, Any]:
        """The settings one task's results depend on (its cache key and its record)."""
        scenes = {"train_scenes": self.train_scenes, "test_scenes": self.test_scenes}
        if name == "attributes":
            return {**scenes, "readouts": list(self.attr_readouts), "epochs": self.attr_epochs,
                    "seeds": self.attr_seeds, "attributes": list(ATTRS)}  # fmt: skip
        if name == "localize":
            return {**scenes, "epochs": self.loc_epochs, "seeds": self.loc_seeds}
        return {**scenes, "train_digits": self.train_digits, "test_digits": self.test_digits,
                "train_text": self.train_text, "test_text": self.test_text,
                "steps": self.vlm_steps, "seeds": self.vlm_seeds, "connector": self.vlm_connector}  # fmt: skip


def parse_settings(pairs: list[str]) -> EvalSettings:
    """``EvalSettings`` from ``KEY=VALUE`` strings (``compare --eval``); a ValueError names a bad one.

    Args:
        pairs: e.g. ``["train_scenes=200", "attr_readouts=linear,patch"]``.
    """
    from aimpre.eval.names import READOUTS
    from aimpre.eval.vlm import CONNECTORS

    known = {f.name: f for f in fields(EvalSettings)}
    given: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in known:
            raise ValueError(f"--eval: {pair!r} is not KEY=VALUE with KEY one of {', '.join(known)}")
        if key == "attr_readouts":
            given[key] = tuple(v for v in value.split(",") if v)
            if not given[key] or any(r not in READOUTS for r in given[key]):
                raise ValueError(f"--eval: attr_readouts={value}: choose from {', '.join(READOUTS)}")
        elif key == "vlm_connector":
            if value not in CONNECTORS:
                raise ValueError(f"--eval: vlm_connector={value}: choose from {', '.join(CONNECTORS)}")
            given[key] = value
        else:
            try:
                given[key] = int(value)
            except ValueError:
                raise ValueError(f"--eval: {key}={value}: not an integer") from None
            if given[key] < 1:
                raise ValueError(f"--eval: {key}={value}: must be at least 1")
    return EvalSettings(**given)


@dataclass
class Row:
    """One row of the scene tables: its name, what identifies its encoder in the cache key, and how to get a
    tokens function (uint8 images [N, 3, S, S] -> tokens [N, T, C]) when a result is missing."""

    name: str
    identity: dict[str, Any]
    tokens: Callable[[], Callable[[Any], Any]]


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_path(out: Path, task: str, row: str, key: dict[str, Any]) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in row)
    return out / "eval" / f"{task}-{slug}-{_digest(key)}.json"


def _cached(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        rec = read_json_object(path, "compare record")
        return rec if isinstance(rec.get("result"), dict) else None
    except ValueError:  # unreadable: compute it again and replace it
        return None


class _Data:
    """The held-out pictures, rendered on first use: scenes (then digits, for the VLM probe) per split."""

    def __init__(self, img_size: int, s: EvalSettings) -> None:
        self.img_size, self.s = img_size, s
        self._made: dict[str, Any] | None = None

    def get(self) -> dict[str, Any]:
        if self._made is None:
            from PIL import Image

            from aimpre.eval.scenes import attribute_labels, render_scenes
            from aimpre.eval.vlm import make_split

            made: dict[str, Any] = {}
            s = self.s
            for split, n, digits, text in (("train", s.train_scenes, s.train_digits, s.train_text),
                                           ("test", s.test_scenes, s.test_digits, s.test_text)):  # fmt: skip
                scenes = render_scenes(n, self.img_size, split)
                pictures = [(Image.fromarray(im.permute(1, 2, 0).numpy()), c)
                            for im, c in zip(scenes.images, scenes.captions, strict=True)]  # fmt: skip
                vlm = make_split(split, n, digits, self.img_size, 0, n_text=text, scenes=pictures)
                made[split] = {"scenes": scenes, "vlm": vlm, "labels": attribute_labels(scenes.facts)}
            self._made = made
        return self._made

    def queries(self, grid: int) -> tuple[Any, Any]:
        from aimpre.eval.localize import queries

        d = self.get()
        key = f"queries{grid}"
        if key not in d:
            d[key] = (queries(d["train"]["scenes"].facts, grid), queries(d["test"]["scenes"].facts, grid))
        return d[key]


def _attributes(x: Any, xt: Any, data: _Data, s: EvalSettings) -> dict[str, Any]:
    """Top-1 (test and train) per readout and attribute, one value per seed."""
    from aimpre.eval.attributes import readout_probe
    from aimpre.eval.scenes import ATTRIBUTES
    from aimpre.probe import ProbeSettings

    assert set(ATTRS) <= set(ATTRIBUTES)
    d = data.get()
    y, yt = d["train"]["labels"], d["test"]["labels"]
    res: dict[str, Any] = {r: {a: {"top1": [], "train_top1": []} for a in ATTRS} for r in s.attr_readouts}
    for seed in range(s.attr_seeds):
        ps = ProbeSettings(epochs=s.attr_epochs, warmup_epochs=min(3, s.attr_epochs - 1), seed=seed)
        for r in s.attr_readouts:
            for a in ATTRS:
                got = readout_probe(r, (x, y[a]), (xt, yt[a]), ps)
                res[r][a]["top1"].append(got["top1"])
                res[r][a]["train_top1"].append(got["train_top1"])
    return res


def _localize(x: Any, xt: Any, data: _Data, s: EvalSettings) -> dict[str, Any]:
    """Localization scores per metric (test, and the training fit), one value per seed."""
    from aimpre.eval.fusion import token_grid
    from aimpre.eval.localize import LocalizeSettings, train_localizer

    q, qt = data.queries(token_grid(x))
    res: dict[str, list[float]] = {}
    for seed in range(s.loc_seeds):
        ls = LocalizeSettings(epochs=s.loc_epochs, warmup_epochs=min(2, s.loc_epochs - 1), seed=seed)
        for k, v in train_localizer(x, q, xt, qt, ls).items():
            res.setdefault(k, []).append(v)
    return res


def _vlm_settings(s: EvalSettings, seed: int) -> Any:
    from aimpre.eval.vlm import VLMSettings

    return VLMSettings(connector=s.vlm_connector, steps=s.vlm_steps, seed=seed, train_scenes=s.train_scenes,
                       test_scenes=s.test_scenes, train_digits=s.train_digits, test_digits=s.test_digits,
                       train_text=s.train_text, test_text=s.test_text)  # fmt: skip


def _vlm(tokens: tuple[Any, Any] | None, data: _Data, s: EvalSettings) -> dict[str, Any]:
    """``vlm_rows``'s columns, one value per seed; ``tokens`` None: the text-only language model."""
    from aimpre.eval.fusion import align, token_grid
    from aimpre.eval.vlm import train_vlm, vlm_rows

    d = data.get()
    res: dict[str, list[float]] = {}
    for seed in range(s.vlm_seeds):
        vs = _vlm_settings(s, seed)
        feats = None
        if tokens is not None:
            grid = token_grid(tokens[0]) if vs.connector == "xattn" else min(token_grid(tokens[0]), vs.max_grid)
            feats = (align([tokens[0]], grid), align([tokens[1]], grid))
        got = train_vlm(feats, d["train"]["vlm"], d["test"]["vlm"], vs)
        (row,) = vlm_rows({"results": {"row": got}})
        for k, v in row.items():
            if k != "source":
                res.setdefault(k, []).append(v)
    return res


def scene_tasks(
    rows: list[Row], out: Path, img_size: int, grid: int, s: EvalSettings, tasks: tuple[str, ...]
) -> dict[str, Any]:
    """Every asked scene task for every row (tokens extracted once per row, only when a result is missing), plus
    each task's picture-free row; results cached in ``out/eval``.

    Args:
        rows: the encoders to judge, in table order (trained rows, then random init and raw pixels).
        out: the comparison folder.
        img_size: the resolution the scenes are rendered at (the compared encoders').
        grid: the compared encoders' patch grid (the localization baseline's).
        s: the budget.
        tasks: which of SCENE_TASKS.

    Returns:
        Per task: ``settings`` and ``rows`` (each ``objective``, ``result``, ``seconds`` and ``tokens_s``, the
        extraction time shared by the row's tasks).
    """
    data = _Data(img_size, s)
    todo = [t for t in SCENE_TASKS if t in tasks]
    res: dict[str, Any] = {t: {"settings": s.task(t), "rows": []} for t in todo}
    for row in rows:
        keys = {t: {"task": t, "row": row.name, "encoder": row.identity, "img_size": img_size, **s.task(t)}
                for t in todo}  # fmt: skip
        paths = {t: _cache_path(out, t, row.name, keys[t]) for t in todo}
        recs = {t: _cached(paths[t]) for t in todo}
        tokens: dict[str, Any] = {}
        tokens_s = 0.0
        if any(r is None for r in recs.values()):  # extract once, for every task that is missing
            t0 = time.time()
            fn = row.tokens()
            d = data.get()
            n_tr, n_te = s.train_scenes, s.test_scenes
            tr, te = fn(d["train"]["vlm"].images).half(), fn(d["test"]["vlm"].images).half()
            tokens = {"vlm": (tr, te), "scenes": (tr[:n_tr], te[:n_te])}  # the scenes come first, then digits
            tokens_s = round(time.time() - t0, 1)
        for t in todo:
            if recs[t] is None:
                t0 = time.time()
                x, xt = tokens["scenes"]
                if t == "attributes":
                    result = _attributes(x, xt, data, s)
                elif t == "localize":
                    result = _localize(x, xt, data, s)
                else:
                    result = _vlm(tokens["vlm"], data, s)
                recs[t] = {"key": keys[t], "result": result, "seconds": round(time.time() - t0, 1),
                           "tokens_s": tokens_s}  # fmt: skip
                write_text(paths[t], json.dumps(recs[t], indent=2) + "\n")
            rec = recs[t]
            assert rec is not None
            res[t]["rows"].append({"objective": row.name, "result": rec["result"], "seconds": rec["seconds"],
                                   "tokens_s": rec.get("tokens_s", 0.0)})  # fmt: skip
    for t in todo:  # the answer that never looks at the picture
        key = {"task": t, "row": PICTURE_FREE[t], "img_size": img_size, **s.task(t)}
        path = _cache_path(out, t, PICTURE_FREE[t], key)
        if (rec := _cached(path)) is None:
            t0 = time.time()
            rec = {"key": key, "result": _picture_free(t, data, s, grid), "tokens_s": 0.0}
            rec["seconds"] = round(time.time() - t0, 1)
            write_text(path, json.dumps(rec, indent=2) + "\n")
        res[t]["rows"].append({"objective": PICTURE_FREE[t], "result": rec["result"], "seconds": rec["seconds"],
                               "tokens_s": 0.0})  # fmt: skip
    return res


def _picture_free(task: str, data: _Data, s: EvalSettings, grid: int) -> dict[str, Any]:
    d = data.get()
    if task == "attributes":
        from aimpre.eval.attributes import majority

        y, yt = d["train"]["labels"], d["test"]["labels"]
        return {"-": {a: {"top1": [majority(y[a], yt[a])], "train_top1": []} for a in ATTRS}}
    if task == "localize":
        from aimpre.eval.localize import mean_baseline

        q, qt = data.queries(grid)  # the compared encoders' patch grid
        return {k: [v] for k, v in mean_baseline(q, qt).items()}
    return _vlm(None, data, s)


# ---- reading the results -----------------------------------------------------------------------------------------


def headline(task: str, result: dict[str, Any]) -> list[float]:
    """One number per seed (fractions) that a task's row is judged by: attributes, the mean top-1 over attributes
    and readouts; localization, the patch IoU; VLM, exact match over all held-out questions.

    Args:
        task: one of SCENE_TASKS.
        result: a row's ``result``.
    """
    if task == "attributes":
        per = [v["top1"] for by in result.values() for v in by.values()]
        return [float(np.mean(seed)) for seed in zip(*per, strict=True)]
    if task == "localize":
        return list(result["patch_iou"])
    return list(result["vlm_all"])


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std in % (std None for one value: no spread to show, not a spread of 0)."""
    if not values:
        return math.nan, None
    a = np.asarray(values, dtype=float) * 100
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None


def cell(values: list[float], scale: float = 100, digits: int = 1) -> str:
    """``mean ± std`` (or the mean alone for one seed); values scaled by ``scale`` (100: fractions to %)."""
    if not values:
        return "-"
    a = np.asarray(values, dtype=float) * scale
    return f"{a.mean():.{digits}f}" if len(a) < 2 else f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}"


def versus_random(task: str, rows: list[dict[str, Any]], trained: list[str], metric: Callable[[Any], list[float]]
                  ) -> str:  # fmt: skip
    """One line: each trained row's lead over random init on ``metric`` in points, and whether it is outside the
    seed spread (the two rows' stds added)."""
    by = {r["objective"]: r for r in rows}
    if "random init" not in by:
        return ""
    rm, rs = mean_std(metric(by["random init"]))
    parts = []
    for name in trained:
        if name not in by:
            continue
        m, sd = mean_std(metric(by[name]))
        diff = m - rm
        if sd is None or rs is None:
            spread = "one seed, no spread"
        else:
            spread = "outside the seed spread" if abs(diff) > sd + rs else "within the seed spread"
        verdict = "beats" if diff > 0 else "does not beat"
        parts.append(f"{name} {verdict} it ({diff:+.1f} points, {spread})")
    return f"Against random init ({rm:.1f}) on {task}: " + "; ".join(parts) + "."
