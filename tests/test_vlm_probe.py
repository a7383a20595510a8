"""The VLM probe (aimpre.eval.vlm): questions from the demo's scene facts, held-out splits, a pixel oracle that
beats the text-only baseline, encoders fused and at twice their trained grid, and the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aimpre.cli import main
from aimpre.data import demo
from aimpre.eval.vlm import (
    TEMPLATES,
    TEXT_SCALE,
    Source,
    VLMRun,
    VLMSettings,
    make_split,
    render_text_scene,
    run_vlm_probe,
    scene_facts,
    text_font,
    vlm_rows,
    vocabulary,
    words,
)
from aimpre.export import write_export
from aimpre.model import AIMv2Encoder, model_config

TINY: dict[str, Any] = dict(train_scenes=150, test_scenes=40, train_digits=60, test_digits=30, dim=64, heads=2, depth=1,
                            train_text=60, test_text=20)  # fmt: skip


def test_facts_are_the_rendered_scene() -> None:
    """Parsed facts name exactly what the renderer drew (the caption is built from the same draws)."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        _, caption, label = demo.render_scene(rng)
        facts = scene_facts(caption)
        assert 1 <= len(facts["objects"]) <= 2 and facts["background"] in demo.BACKGROUNDS
        for o in facts["objects"]:
            assert o["colour"] in demo.COLOURS and o["shape"] in demo.SHAPES and o["row"] in demo.ROWS
            assert o["size"] in ("large", "small")
        top = min(facts["objects"], key=lambda o: demo.ROWS[o["row"]])
        assert demo.CLASSES[label] == top["shape"]


def test_held_out_templates_use_only_training_words_and_scenes_are_new() -> None:
    seen = {w for t in TEMPLATES.values() for tmpl in t[:2] for w in words(tmpl.format(shape="", colour="", row=""))}
    for kind, t in TEMPLATES.items():
        held = set(words(t[2].format(shape="", colour="", row="")))
        assert held <= seen | {"image"}, (kind, held - seen)  # "image" is in the caption prompt
        assert t[2] not in t[:2]
    train, test = make_split("train", 20, 5, 64), make_split("test", 20, 5, 64)
    assert not any(it.new_template for it in train.items)
    assert sum(it.new_template for it in test.items) * 2 == len(test.items)
    vocab = set(vocabulary())
    assert all(set(it.question + it.answer) <= vocab for it in train.items + test.items + test.captions)
    # the probe's scenes are not the demo's pretraining or val scenes
    ours = [c for c in (it.answer for it in test.captions[:20])]
    for seed in (2, 4):
        rng = np.random.default_rng(seed)
        theirs = [words(demo.render_scene(rng, 64)[1]) for _ in range(20)]
        assert ours != theirs
    assert not torch.equal(train.images[:20], test.images[:20])


def test_pixels_beat_the_text_only_baseline() -> None:
    """The same budget with and without the image: raw pixel patches (an oracle encoder that loses nothing) answer
    what the picture shows (the background colour; overall) far above the text-only model, which can only learn
    the answers' priors."""
    s = VLMSettings(steps=300, lr=3e-3, **TINY)  # ~20 s on one core
    res = run_vlm_probe(VLMRun([Source("pixels", "pixels", img_size=64)], s))
    text, pixels = res["results"]["text_only"], res["results"]["pixels"]
    assert pixels["accuracy"]["background"] > text["accuracy"]["background"] + 0.3
    assert pixels["accuracy"]["all"] > text["accuracy"]["all"] + 0.05
    assert pixels["caption_ppl"] < text["caption_ppl"]
    rows = {r["source"]: r for r in vlm_rows(res)}
    assert rows["pixels"]["vlm_background"] == pixels["accuracy"]["background"]
    assert set(rows) == {"text_only", "pixels"}


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    enc = AIMv2Encoder(model_config("tiny", depth=1)).eval()
    out = tmp_path_factory.mktemp("vlm") / "enc"
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "img_size": 112}
    return write_export(enc, "safetensors", out, info={"preprocessing": pre})


def test_fused_encoders_at_twice_the_grid(tiny_export: Path) -> None:
    """A 192-wide encoder at 224 px (16x16 patches, trained at 8x8) fused with 768-wide pixel patches: each alone
    and together, through the cross-attention adapter, projected and summed."""
    small = dict(TINY, train_scenes=30, test_scenes=10, train_digits=10, test_digits=10, train_text=5, test_text=5)
    s = VLMSettings(steps=3, connector="xattn", fuse="sum", queries=4, **small)
    sources = [Source("enc@224", str(tiny_export), 224), Source("pixels", "pixels", 64)]
    res = run_vlm_probe(VLMRun(sources, s, text_only=False))
    assert res["grids"] == {"enc@224": 16, "pixels": 4}
    assert set(res["results"]) == {"enc@224", "pixels", "enc@224 (+) pixels"}
    assert res["results"]["enc@224 (+) pixels"]["tokens"] == 256  # on the first source's grid
    for r in res["results"].values():
        assert 0 <= r["accuracy"]["all"] <= 1 and np.isfinite(r["caption_ppl"])


def test_cli_runs_and_refuses_bad_input(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "vlm.json"
    argv = ["vlm-probe", str(tiny_export), "--steps", "2", "--train-scenes", "20", "--test-scenes", "10"]
    argv += ["--digits", "10", "--layers", "0", "--out", str(out)]
    assert main([*argv, "--img-size", "112", "224"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--img-size: give one size, or one per encoder (1), not 2" in err
    assert main([*argv[:2], "--layers", "5", "--steps", "1", "--train-scenes", "5", "--digits", "5"]) == 2
    assert "--layers: block indices [5] out of range" in capsys.readouterr().err
    assert main([*argv, "--connector", "linear", "--compare-random"]) == 0
    printed = capsys.readouterr().out
    assert "text_only" in printed and f"random_init({tiny_export})" in printed and out.is_file()


def _label(number: str) -> np.ndarray:
    """``number`` as render_text_scene writes it, drawn here on its own: the label's pixels."""
    from PIL import Image, ImageDraw

    font = text_font()
    _, _, x1, y1 = font.getbbox(number)
    glyphs = Image.new("L", (int(x1) + 2, int(y1) + 2), 255)
    ImageDraw.Draw(glyphs).text((1, 1), number, font=font, fill=0)
    size = (glyphs.width * TEXT_SCALE, glyphs.height * TEXT_SCALE)
    return np.asarray(glyphs.resize(size, Image.Resampling.NEAREST).convert("RGB"))


def test_read_the_text_items_say_what_is_drawn() -> None:
    """Each "read the text" picture holds, inside its box, exactly its answer's digits drawn with the bundled font
    (and not another number's); the same seed gives the same pictures and questions; the test split asks the
    held-out template too, with training words only, and its scenes are not the training ones."""
    rng = np.random.default_rng(3)
    lengths = set()
    for _ in range(30):
        img, number, (x0, y0, x1, y1) = render_text_scene(rng)
        lengths.add(len(number))
        crop = np.asarray(img)[y0:y1, x0:x1]
        assert np.array_equal(crop, _label(number)), number
        other = str(int(number) + 1) if len(str(int(number) + 1)) == len(number) else str(int(number) - 1)
        assert not np.array_equal(crop, _label(other))
        ink = crop.min(-1) < 128
        assert 0.05 < ink.mean() < 0.6  # some ink, on paper
    assert lengths == {2, 3}
    a, b = make_split("test", 0, 0, 128, n_text=12), make_split("test", 0, 0, 128, n_text=12)
    assert torch.equal(a.images, b.images) and [it.answer for it in a.items] == [it.answer for it in b.items]
    assert all(it.kind == "text" and it.answer == list("".join(it.answer)) for it in a.items)
    assert sum(it.new_template for it in a.items) == 12 and set(w for it in a.items for w in it.question) <= set(
        vocabulary()
    )
    train = make_split("train", 0, 0, 128, n_text=12)
    assert not any(it.new_template for it in train.items)
    assert not torch.equal(train.images, a.images)
