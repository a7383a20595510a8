"""LiT and zero-shot: a text tower trained against a frozen tiny encoder on real captioned shards learns to name
the classes of held-out labelled shards; the LiT folder checks its encoder; a siglip/clip run is read the same way;
bad input is a one-line error."""

from __future__ import annotations

import io
import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from aimpre.cli import main
from aimpre.config import dump_config, load_config
from aimpre.export import preprocessing_info, write_export
from aimpre.files import current_umask
from aimpre.lit import LitError, LitSettings, train_lit, zero_shot
from aimpre.model import AIMv2Encoder, model_config
from helpers import write_tar

COLOURS = {"red": (210, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (235, 210, 30)}
CAPTIONS = ("a photo of a {}.", "a {} picture", "something {}", "this is {}.")
TOWERS = {"text_len": 24, "text_depth": 1, "text_width": 64, "text_heads": 2, "text_mlp_hidden": 128, "embed_dim": 64}
SETTINGS = LitSettings(steps=200, batch_size=32, lr=3e-3)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _image(rgb: tuple[int, int, int], rng: np.random.Generator) -> bytes:
    """A noisy patch of one colour on a random grey background: the class is the colour."""
    px = np.full((64, 64, 3), rng.integers(60, 200), np.uint8)
    x, y, s = rng.integers(0, 24), rng.integers(0, 24), rng.integers(24, 40)
    px[y : y + s, x : x + s] = np.clip(np.array(rgb) + rng.normal(0, 15, 3), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG")
    return buf.getvalue()


def _samples(n: int, seed: int, caption: bool = True, label: bool = True) -> list[dict]:
    rng, names = np.random.default_rng(seed), list(COLOURS)
    out = []
    for i in range(n):
        c = i % len(names)
        s: dict = {"__key__": f"s{seed}-{i:04d}", "jpg": _image(COLOURS[names[c]], rng)}
        if caption:
            s["txt"] = CAPTIONS[rng.integers(len(CAPTIONS))].format(names[c])
        if label:
            s["cls"] = str(c)
        out.append(s)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lit")
    train = write_tar(d / "train.tar", _samples(192, 0))
    test = write_tar(d / "test.tar", _samples(64, 1, caption=False))
    index = {"splits": {"test": {"shards": ["test.tar"], "samples": 64, "classes": list(COLOURS)}}}
    (d / "index.json").write_text(json.dumps(index))
    other = d / "other"
    other.mkdir()
    shutil.copy(test, other / "test.tar")
    (other / "classes.txt").write_text("\n".join(list(COLOURS)[::-1]) + "\n")  # the names in the wrong order
    torch.manual_seed(0)
    enc = AIMv2Encoder(model_config("tiny", depth=1, vocab_size=258))
    info = {"preprocessing": preprocessing_info(*IMAGENET, 112)}
    return {"dir": d, "train": train, "test": test, "other": other / "test.tar",
            "encoder": write_export(enc, "safetensors", d / "enc", info=info)}  # fmt: skip


@pytest.fixture(scope="module")
def lit(data: dict[str, Path]) -> tuple[Path, dict]:
    out = data["dir"] / "lit"
    return out, train_lit(data["encoder"], out, str(data["train"]), SETTINGS, TOWERS)


def test_lit_learns_to_name_the_classes_zero_shot(data: dict[str, Path], lit: tuple[Path, dict], capsys) -> None:
    out, rec = lit
    assert rec["samples"] == 192 and rec["steps"] == 200 and rec["loss"] == "siglip"
    assert rec["loss_final"] < 0.5 * rec["loss_initial"], (rec["loss_initial"], rec["loss_final"])
    assert json.loads((out / "lit.json").read_text())["encoder"]["path"] == str(data["encoder"].resolve())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        parts = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118 (not a dict)
    assert parts == {"token_norm", "image_head", "text_tower", "loss"}  # the encoder is not copied
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~current_umask()  # not 0600

    res = zero_shot(out, str(data["test"]))  # class names from index.json, default templates
    assert res["classes"] == list(COLOURS) and res["n"] == 64 and "top5" not in res
    assert res["top1"] >= 0.6 and res["warnings"] == [], res  # chance is 0.25
    wrong = zero_shot(out, str(data["other"]))  # classes.txt names them in reverse label order
    assert wrong["classes"] == list(COLOURS)[::-1] and wrong["top1"] < 0.3, wrong
    assert any(w.startswith(f"top-1 {wrong['top1']:.1%} is not above chance (25.0% with 4 classes") for w in
               wrong["warnings"]), wrong["warnings"]  # fmt: skip
    assert main(["zero-shot", str(out), "--shards", str(data["other"]), "--out", str(data["dir"] / "w.json")]) == 0
    assert "aimpre: warning: zero-shot: top-1" in capsys.readouterr().err

    assert main(["zero-shot", str(out), "--shards", str(data["test"]), "--classes", ",".join(COLOURS)]) == 0
    assert f"top-1 {res['top1']:.1%}" in capsys.readouterr().out
    assert json.loads((out / "zero_shot.json").read_text())["top1"] == res["top1"]


def test_changed_encoder_is_refused(data: dict[str, Path], lit: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    """The LiT folder records the encoder's hash: a different encoder at the same path is an error, not a
    silently meaningless zero-shot number."""
    enc = tmp_path / "enc"
    shutil.copytree(data["encoder"], enc)
    folder = tmp_path / "lit"
    shutil.copytree(lit[0], folder)
    rec = json.loads((folder / "lit.json").read_text())
    (folder / "lit.json").write_text(json.dumps({**rec, "encoder": {**rec["encoder"], "path": str(enc)}}))
    assert zero_shot(folder, str(data["test"]))["top1"] >= 0.6  # the same weights elsewhere: accepted
    shutil.rmtree(enc)
    torch.manual_seed(1)
    other = AIMv2Encoder(model_config("tiny", depth=1, vocab_size=258))
    write_export(other, "safetensors", enc, info={"preprocessing": preprocessing_info(*IMAGENET, 112)})
    with pytest.raises(LitError, match="is not the one this LiT model was trained on"):
        zero_shot(folder, str(data["test"]))
    assert main(["zero-shot", str(folder), "--shards", str(data["test"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aimpre: error: ") and "retrain with aimpre lit" in err[0]


def _run(root: Path, objective: str, state: dict[str, torch.Tensor], *extra: str) -> Path:
    """A run as the trainer writes it: config.yaml and a Lightning checkpoint of ``model.*``."""
    text = [f"model.{k}={v}" for k, v in TOWERS.items()]
    cfg = load_config(None, ["model.size=tiny", "model.depth=1", f"model.objective={objective}", *text, *extra])
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.yaml").write_text(dump_config(cfg))
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "global_step": 3},
               root / "checkpoints" / "last.ckpt")  # fmt: skip
    return root


def test_a_contrastive_run_is_read_as_a_lit_folder_is(data: dict[str, Path], lit: tuple[Path, dict], tmp_path: Path):
    """A siglip run holding the LiT folder's towers and the same encoder gives the same zero-shot numbers as the
    folder does with its token standardisation made the identity (a run's head reads raw tokens); an aimv2 run has
    no text tower to use."""
    from safetensors.torch import load_file, save_file

    from aimpre.export import load

    towers = load_file(str(lit[0] / "model.safetensors"))
    encoder = {f"encoder.{k}": v for k, v in load(data["encoder"]).encoder.state_dict().items()}
    run = _run(tmp_path / "siglip", "siglip", {**encoder, **{k: v for k, v in towers.items() if "token_norm" not in k}})
    folder = tmp_path / "lit-raw"
    shutil.copytree(lit[0], folder)
    mean, std = towers["token_norm.mean"], towers["token_norm.std"]
    towers.update({"token_norm.mean": torch.zeros_like(mean), "token_norm.std": torch.ones_like(std)})
    save_file(towers, str(folder / "model.safetensors"))
    via_lit = zero_shot(folder, str(data["test"]), templates=["a photo of a {}."])
    via_run = zero_shot(run, str(data["test"]), templates=["a photo of a {}."])
    assert via_run["top1"] == via_lit["top1"] and via_run["per_class"] == via_lit["per_class"]
    aimv2 = _run(tmp_path / "aimv2", "aimv2", encoder)
    with pytest.raises(LitError, match="a aimv2 run has no text tower"):
        zero_shot(aimv2, str(data["test"]))


def test_lit_on_a_run_uses_its_tokenizer(data: dict[str, Path], tmp_path: Path) -> None:
    """LiT on a run's encoder tokenizes captions as the run did (here a BPE file), and records it."""
    from aimpre.data.tokenizer import train_bpe
    from aimpre.export import load

    bpe = train_bpe([c.format(n) for c in CAPTIONS for n in COLOURS] * 4, 300, tmp_path / "bpe.json")
    encoder = {f"encoder.{k}": v for k, v in load(data["encoder"]).encoder.state_dict().items()}
    run = _run(tmp_path / "run", "aimv2", encoder, f"data.tokenizer={bpe}")
    rec = train_lit(run / "checkpoints" / "last.ckpt", tmp_path / "lit", str(data["train"]), LitSettings(steps=3),
                    TOWERS)  # fmt: skip
    assert rec["tokenizer"]["spec"] == str(bpe) and rec["tokenizer"]["identity"]["kind"] == "hf"
    assert zero_shot(tmp_path / "lit", str(data["test"]))["n"] == 64  # read back with the same tokenizer


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar


def test_bad_input_is_one_line(data: dict[str, Path], lit: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    uncaptioned = write_tar(tmp_path / "nocap.tar", _samples(6, 2, caption=False))
    unlabelled = write_tar(tmp_path / "nolabel.tar", _samples(6, 3, label=False))
    enc, out, test = str(data["encoder"]), str(tmp_path / "l"), str(data["test"])
    last = _error(["lit", str(tmp_path / "none"), "--out", out], capsys)
    assert last == f"aimpre: error: no such file or directory: {tmp_path / 'none'}"
    last = _error(["lit", enc, "--out", out, "--shards", str(uncaptioned), "--no-cache"], capsys)
    assert "no sample has a caption" in last and "'s2-0000'" in last, last
    assert not Path(out).exists()
    last = _error(["zero-shot", str(lit[0]), "--shards", test, "--classes-file", str(tmp_path / "names.txt")], capsys)
    assert last == f"aimpre: error: class names file {tmp_path / 'names.txt'} does not exist"
    last = _error(["zero-shot", str(lit[0]), "--shards", str(unlabelled), "--classes", "a,b"], capsys)
    assert "zero-shot needs labelled images" in last and "no_label" in last, last
    last = _error(["zero-shot", str(lit[0]), "--shards", str(unlabelled)], capsys)
    assert "no class names for" in last and "classes.txt" in last, last
    last = _error(["zero-shot", str(lit[0]), "--shards", test, "--classes", "red,green"], capsys)
    assert "label 3 has no class name (2 given" in last, last
    last = _error(["zero-shot", str(lit[0]), "--shards", test, "--templates", "a photo"], capsys)
    assert "'a photo' must hold exactly one '{}'" in last, last


def test_cutting_trailing_pads_changes_no_text_embedding() -> None:
    """Training cuts each batch's captions after its longest one: the causal tower must give the same embeddings."""
    from aimpre.lit import _towers, tower_config

    torch.manual_seed(0)
    tower = _towers(tower_config(model_config("tiny", depth=1), 258, TOWERS), "siglip")["text_tower"].eval()
    ids = torch.randint(2, 258, (4, 24))
    mask = torch.arange(24)[None] < torch.tensor([[5], [9], [3], [9]])  # real tokens first, then pads
    ids[~mask] = 0
    assert torch.allclose(tower(ids, mask), tower(ids[:, :9], mask[:, :9]), atol=1e-5)


def test_token_norm_standardises_each_position_and_channel() -> None:
    from aimpre.lit import TokenNorm

    torch.manual_seed(0)
    tokens = (torch.randn(300, 4, 6) * torch.rand(4, 6) * 5 + torch.randn(4, 6) * 10).half()
    norm = TokenNorm(4, 6)
    norm.fit(tokens, chunk=7)  # chunks that do not divide N
    out = norm(tokens.float())
    assert torch.allclose(out.mean(0), torch.zeros(4, 6), atol=1e-4)
    assert torch.allclose(out.std(0, unbiased=False), torch.ones(4, 6), atol=1e-3)
