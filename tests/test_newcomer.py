"""A new user's first runs (issues 18 and 23): validation is not silently on the demo set, degenerate results say
so, exported weights are readable by others, ``--help`` is fast (no torch), a timm export of a custom shape is not
named after a released model, and progress in a log file is lines, not carriage-return soup."""

from __future__ import annotations

import argparse
import csv
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from aimpre.cli import main
from aimpre.compare import format_table, warnings
from aimpre.config import load_config
from aimpre.export import preprocessing_info, write_export
from aimpre.formats import timm_architecture, timm_config
from aimpre.lit import degenerate
from aimpre.model import AIMv2Encoder, model_config
from helpers import jpeg, write_tar

PRE = preprocessing_info((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 112)


# ---- validation default -------------------------------------------------------------------------------------------


def test_val_shards_default_is_the_demo_only_for_the_demo_job() -> None:
    assert load_config().data.val_shards == "demo"  # make train: validates on the demo's val split as before
    assert load_config(None, ["data.train_shards=[demo, 'demo:digits-train']"]).data.val_shards == "demo"
    assert load_config(None, ["data.train_shards=/data/{000000..000009}.tar"]).data.val_shards is None
    assert load_config(None, ["data.train_shards=[/a.tar, demo]"]).data.val_shards is None
    mine = ["data.train_shards=/data/a.tar", "data.val_shards=/data/val.tar"]
    assert load_config(None, mine).data.val_shards == "/data/val.tar"  # what the user sets is kept
    assert load_config(None, ["data.val_shards=null"]).data.val_shards is None


def test_a_run_on_the_users_shards_does_not_validate_on_the_demo_and_says_so(
    tmp_path: Path, pretrain_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real run on real shards that are not the ``demo`` spec, with data.val_shards left at its default."""
    args = ["train", f"run.out_dir={tmp_path}", "run.name=mine", f"data.train_shards={pretrain_spec}",
            "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "model.depth=1", "model.dec_depth=1",
            "trainer.max_steps=2", "trainer.val_every=1", "trainer.log_every=1", "optim.warmup_steps=1"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "validation: none (set data.val_shards to held-out shards to validate)" in out, out
    run = tmp_path / "mine"
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and not any(r.get("val_loss") for r in rows)  # no validation rows, not even on the demo scenes
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val"] == {} and "baselines" not in summary
    assert "val_shards: null" in (run / "config.yaml").read_text()  # the resolved value is what the run records


def test_the_start_line_names_what_a_run_validates_on(pretrain_spec: str, val_spec: str) -> None:
    from aimpre.config import validation_line

    cfg = load_config(None, [f"data.train_shards={pretrain_spec}", f"data.val_shards={val_spec}"])
    assert validation_line(cfg) == f"validation: {val_spec}, 4 batches every 100 steps"
    assert "the embedded demo set's val split" in validation_line(load_config())
    assert validation_line(load_config(None, ["trainer.val_batches=0"])) == "validation: none (trainer.val_batches=0)"


# ---- degenerate results -------------------------------------------------------------------------------------------


def test_zero_shot_that_collapsed_or_sits_at_chance_is_flagged() -> None:
    names = [f"c{i}" for i in range(10)]
    labels = torch.arange(100) % 10
    collapsed = degenerate(torch.full((100,), 3), labels, names)  # every image called c3: top-1 is 10%, chance
    assert any("collapsed: 100 of the 100 images (100%) got class 'c3'" in w for w in collapsed), collapsed
    assert any("top-1 10.0% is not above chance (10.0% with 10 classes" in w for w in collapsed), collapsed
    assert degenerate(labels.clone(), labels, names) == []  # all right: nothing to say
    mostly = labels.clone()
    mostly[:95] = 0  # 95 of 100 predicted c0, yet top-1 is 10 + 5 = 15%
    collapsed, chance = degenerate(mostly, labels, names)
    assert collapsed.startswith("predictions collapsed: 95 of the 100 images (95%) got class 'c0'")
    assert chance == "top-1 15.0% is not above chance (10.0% with 10 classes; two standard errors at 100 images: 6.0%)"


def _result(seeds: list[int], probes: dict[str, dict[str, list[float]]], zs_warnings: list[str] | None = None) -> dict:
    """compare.json's shape, with only what the table reads."""
    rows = [{"objective": o, "steps": 0 if o == "random init" else 10, "samples": 40, "flops": 0.0 if o == "random init"
             else 1e9, "final_loss": None, "probe_top1": p, "zero_shot_top1": None if o == "random init" else 0.1,
             "zero_shot_via": "LiT", "zero_shot_warnings": zs_warnings} for o, p in probes.items()]  # fmt: skip
    return {"rows": rows, "seeds": seeds, "probe": {"train": "a", "test": "b"}, "machine": "m", "date": "d",
            "seconds": 60.0}  # fmt: skip


def test_compare_shows_a_spread_only_over_two_or_more_seeds_and_warns_when_random_init_wins(capsys) -> None:
    one = _result([0], {"aimv2": {"attentive": [0.5], "linear": [0.4]},
                        "random init": {"attentive": [0.3], "linear": [0.2]}})  # fmt: skip
    table = format_table(one)
    assert "±" not in table and "| 50.0 | 40.0 |" in table and "one probe seed (no spread" in table
    assert warnings(one) == [] and "Warning" not in table
    two = _result([0, 1], {"aimv2": {"attentive": [0.5, 0.6], "linear": [0.2, 0.2]},
                           "siglip": {"attentive": [0.4, 0.4], "linear": [0.25, 0.25]},
                           "random init": {"attentive": [0.3, 0.3], "linear": [0.3, 0.3]}})  # fmt: skip
    table = format_table(two)
    assert "| 55.0 ± 7.1 |" in table and "mean ± std over 2 probe seeds" in table
    (w,) = warnings(two)
    assert w.startswith("random init does as well as every objective on the linear probe (30.0% vs the best, "
                        "siglip, 25.0%)")  # fmt: skip
    assert f"**Warning:** {w}." in table
    flagged = _result([0, 1], {"aimv1": {"attentive": [0.5, 0.6], "linear": [0.5, 0.5]},
                               "random init": {"attentive": [0.3, 0.3], "linear": [0.3, 0.3]}}, ["predictions collapsed"])  # fmt: skip # noqa: E501
    assert "10.0 (LiT) (degenerate)" in format_table(flagged) and warnings(flagged) == [
        "aimv1 zero-shot: predictions collapsed"
    ]


# ---- exports ------------------------------------------------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("fmt", ["timm", "hf", "safetensors"])
def test_exported_files_honour_the_umask(fmt: str, tmp_path: Path, umask_022: None) -> None:
    """safetensors writes its file 0600 (a temp file, renamed): others on a shared cluster could not read weights."""
    torch.manual_seed(0)
    out = write_export(AIMv2Encoder(model_config("tiny", depth=1, vocab_size=258)), fmt, tmp_path / fmt,
                       info={"preprocessing": PRE})  # fmt: skip
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), {k: oct(v) for k, v in modes.items()}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_timm_architecture_is_timms_name_only_for_a_released_shape(tmp_path: Path, capsys) -> None:
    assert timm_architecture(model_config("huge", img_size=336)) == ("aimv2_huge_patch14_336", None)
    assert timm_architecture(model_config("large")) == ("aimv2_large_patch14_224", None)
    # a shape timm never released: timm's constructor (model_args give the shape), a tag that names ours
    assert timm_architecture(model_config("large", depth=12)) == ("aimv2_large_patch14_224",
                                                                  "aimpre_large_12x1024_p14_224")  # fmt: skip
    tiny = model_config("tiny", depth=1, vocab_size=258)
    assert timm_config(tiny, PRE)["pretrained_cfg"]["tag"] == "aimpre_tiny_1x192_p14_112"
    assert "tag" not in timm_config(model_config("large"), PRE)["pretrained_cfg"]

    import timm  # timm's own local-dir loader builds our shape and keeps the tag

    torch.manual_seed(0)
    enc = AIMv2Encoder(tiny).eval()
    src = write_export(enc, "safetensors", tmp_path / "src", info={"preprocessing": PRE})
    assert main(["export", str(src), "--format", "timm", "--out", str(tmp_path / "timm")]) == 0
    said = capsys.readouterr().out
    assert f"timm.create_model('local-dir:{tmp_path / 'timm'}', pretrained=True)" in said
    assert "timm has no model of this shape (aimpre_tiny_1x192_p14_112)" in said
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert len(model.blocks) == 1 and model.embed_dim == 192
    assert model.pretrained_cfg["tag"] == "aimpre_tiny_1x192_p14_112"
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), enc(x), atol=1e-4)


# ---- command line start-up -----------------------------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out += _commands(child, (*path, name))
    return out


def test_help_of_every_command_imports_no_torch() -> None:
    """``aimpre --help`` and ``aimpre CMD --help`` import no torch (2-5 s of a new user's first command)."""
    from aimpre.cli import build_parser

    commands = _commands(build_parser())
    assert len(commands) > 30 and ("scaling", "fit") in commands
    code = (
        "import contextlib, io, json, sys\n"
        "from aimpre.cli import main\n"
        f"for cmd in {[list(c) for c in commands]!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main([*cmd, '--help'])\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'numpy'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []
    start = time.perf_counter()  # the console entry point, as a user runs it: its import tree has no torch either
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "aimpre", "--help"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    seconds = time.perf_counter() - start
    assert done.returncode == 0 and "usage: aimpre" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "aimpre.cli" in imported and "torch" not in imported, sorted(imported)[:50]
    print(f"aimpre --help: {seconds:.2f} s with -X importtime")


def test_cli_objectives_are_the_models() -> None:
    from aimpre.cli import OBJECTIVES
    from aimpre.model.sizes import OBJECTIVES as MODEL_OBJECTIVES

    assert OBJECTIVES == MODEL_OBJECTIVES  # the CLI's copy, kept free of torch imports


# ---- progress in a file --------------------------------------------------------------------------------------------


def _first(src: Path, dst: Path, n: int) -> str:
    """A shard of the first ``n`` samples of ``src`` (fewer images to decode: the test is about the output)."""
    samples: dict[str, dict] = {}
    with tarfile.open(src) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            if key not in samples and len(samples) == n:
                break
            member = tar.extractfile(m)
            assert member is not None
            samples.setdefault(key, {"__key__": key})[ext] = member.read()
    return str(write_tar(dst, list(samples.values())))


def test_probe_progress_in_a_log_file_is_plain_lines(demo: Path, tmp_path: Path) -> None:
    """``aimpre probe`` with stderr going to a file (a SLURM log): lines, no carriage returns."""
    torch.manual_seed(0)
    enc = write_export(AIMv2Encoder(model_config("tiny", depth=1, vocab_size=258)), "safetensors", tmp_path / "enc",
                       info={"preprocessing": PRE})  # fmt: skip
    log = tmp_path / "err.log"
    train, test = (_first(demo / f"digits-{s}-000000.tar", tmp_path / f"{s}.tar", 96) for s in ("train", "test"))
    args = [sys.executable, "-m", "aimpre", "probe", str(enc), "--train", train, "--test", test, "--kind", "linear",
            "--epochs", "20", "--no-cache"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as err:
        done = subprocess.run(args, stdout=subprocess.PIPE, stderr=err, text=True, timeout=300, env=env)
    text = log.read_bytes().decode()  # not read_text(): universal newlines would turn each "\r" into a line break
    assert done.returncode == 0, text[-2000:]
    assert "\r" not in text and max(len(line) for line in text.splitlines()) < 200, text[:500]
    epochs = [line for line in text.splitlines() if line.startswith("linear probe: ")]
    assert [line.split()[2] for line in epochs] == [f"{n}/20" for n in range(2, 21, 2)], text  # every 2nd epoch
    features = [line.split()[1] for line in text.splitlines() if line.startswith("features: ")]
    assert features == ["1/2", "2/2"] * 2, text  # 96 images in batches of 64, train then test


def test_make_shards_and_inspect_progress_in_a_log_file_is_plain_lines(tmp_path: Path) -> None:
    """``aimpre data make-shards`` and ``data inspect`` into a log file: their last line, not a redrawn bar."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(30):
        (photos / f"p{i:02d}.jpg").write_bytes(jpeg((10 * i, 40, 200)))
        (photos / f"p{i:02d}.txt").write_text(f"photo number {i}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd, last in (
        (["make-shards", "--from-folder", str(photos), "--out", str(tmp_path / "s"), "--per-shard", "10"], "30 img"),
        (["inspect", str(tmp_path / "s" / "shard-{000000..000002}.tar"), "--workers", "0"], "3/3 shard"),
    ):
        log = tmp_path / f"{cmd[0]}.log"
        with open(log, "w") as err:
            done = subprocess.run([sys.executable, "-m", "aimpre", "data", *cmd], stdout=subprocess.PIPE, stderr=err,
                                  text=True, timeout=300, env=env)  # fmt: skip
        text = log.read_bytes().decode()
        assert done.returncode == 0 and "\r" not in text, text[-2000:]
        assert f"{cmd[0]}: {last}" in text, text
