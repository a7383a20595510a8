"""Bad input of every kind ends in one line, ``aimpre: error: ...`` (or argparse's one-line error) naming what is
wrong, with exit code 2 and no traceback: configs, overrides, flags and files across the subcommands, refused
before any training starts. Then the run-time stops that must end the same way: a full disk, the non-finite
step guard and a shard set too small for one batch."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from aimpre.cli import main
from aimpre.config import ConfigError, load_config, short

# 9 levels of 9 nested aliases in 385 bytes: 9**9 strings once expanded (the 10 GB, 54 s, 2 GB message)
LAUGHS = "optim:\n  betas: [" + ", ".join(
    ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"&{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
) + "]\n"  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Malformed files of each kind, by name."""
    d = tmp_path_factory.mktemp("bad")
    out = {"tmp": str(d), "missing": str(d / "missing.yaml"), "dir": str(d)}
    content: dict[str, str | bytes] = {
        "garbage": os.urandom(256) + b"\xff\xfe",  # binary: not UTF-8
        "bad_yaml": "model: [1, 2\n",
        "list_yaml": "- model\n- optim\n",
        "not_mapping": "model: 5\n",
        "unknown": "modle:\n  depth: 2\n",
        "laughs": LAUGHS,
        "huge_value": "model:\n  depth: " + "x" * 1_000_000 + "\n",
        "deep": "model:\n  depth: " + "[" * 5000 + "\n",
        "sweep_unknown": "design: grid\nsizez: [tiny]\n",
        "sweep_laughs": "sizes: &s [tiny]\nbase_sizes: *s\n",
        "csv": "params,samples,flops,val_loss\n1e6,1e8,6e14,3.0\n2e6,1e8,1.2e15,2.9\n",
        "empty_csv": "",
        "fit_json": "{not json",
    }
    for name, text in content.items():
        p = d / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        out[name] = str(p)
    return out


# (argv, what the message must name); {name} is a path from `files`
CASES: list[tuple[str, str]] = [
    # overrides: unknown keys, wrong types, impossible and non-finite values; each check names its own key
    ("train optim.lrr=1", "'optim.lrr'"),
    ("train optimizer.lr=1", "'optimizer'"),
    ("train lr=1", "section.key"),
    ("train optim.lr", "section.key=value"),
    ("train optim.lr=fast", "'optim.lr' must be float"),
    ("train optim.lr=inf", "'optim.lr'"),
    ("train optim.lr=.nan", "'optim.lr'"),
    ("train optim.lr=0", "'optim.lr'"),
    ("train optim.lr=[1", "'optim.lr=[1'"),
    ("train optim.min_lr=1", "'optim.min_lr'"),
    ("train optim.eps=-1", "'optim.eps'"),
    ("train optim.eps=.inf", "'optim.eps'"),
    ("train optim.betas=[0.9,1.5]", "'optim.betas'"),
    ("train optim.betas=[.nan,0.9]", "'optim.betas'"),
    ("train optim.weight_decay=.inf", "'optim.weight_decay'"),
    ("train optim.grad_clip=-1", "'optim.grad_clip'"),
    ("train optim.schedule=linear", "'optim.schedule'"),
    ("train data.mean=[nan,0,0]", "'data.mean'"),
    ("train data.mean=[0,0]", "'data.mean'"),
    ("train data.std=[0,1,1]", "'data.std'"),
    ("train data.std=[.inf,1,1]", "'data.std'"),
    ("train data.max_pixels=0", "'data.max_pixels'"),
    ("train data.shuffle_buffer=-1", "'data.shuffle_buffer'"),
    ("train data.batch_size=0", "'data.batch_size'"),
    ("train data.num_workers=-1", "'data.num_workers'"),
    ("train data.crop_scale=[0.9,0.2]", "'data.crop_scale'"),
    ("train data.weights=[1,2]", "'data.weights'"),
    ("train data.hflip=maybe", "'data.hflip'"),
    ("train model.norm_eps=-1", "'model.norm_eps'"),
    ("train model.norm_eps=0", "'model.norm_eps'"),
    ("train model.depth=0", "'model.depth'"),
    ("train model.objective=siglip data.batch_size=1", "'data.batch_size'"),
    ("train model.objective=clip data.batch_size=1", "at least 2 pairs per rank"),
    ("train model.objective=classification", "'model.num_classes'"),
    ("train model.objective=classification model.num_classes=1", "'model.num_classes'"),
    ("train model.embed_dim=0", "'model.embed_dim'"),
    ("train model.text_heads=0", "'model.text_heads'"),
    ("train model.text_heads=3", "'model.text_width'"),
    ("train model.text_depth=0", "'model.text_depth'"),
    ("train model.text_mlp_hidden=0", "'model.text_mlp_hidden'"),
    ("train model.head_depth=-1", "'model.head_depth'"),
    ("train model.head_width=0", "'model.head_width'"),
    ("train model.depth=2.5", "'model.depth'"),
    ("train model.size=giant", "'model.size'"),
    ("train model.heads=5", "'model.width'"),
    ("train model.w_text=.inf", "'model.w_text'"),
    ("train 'model.depth=[&a 1, *a]'", "aliases"),
    ("train trainer.devices=abc", "'trainer.devices'"),
    ("train trainer.devices=0", "'trainer.devices'"),
    ("train trainer.accelerator=tpu", "'trainer.accelerator'"),
    ("train trainer.strategy=deepspeed", "'trainer.strategy'"),
    ("train trainer.precision=fp4", "'trainer.precision'"),
    ("train trainer.precision=fp8 trainer.fp8_recipe=delayed", "'trainer.fp8_recipe'"),
    ("train trainer.max_steps=0", "'trainer.max_steps'"),
    ("train trainer.keep_last=0", "'trainer.keep_last'"),
    ("train trainer.log_every=0", "'trainer.log_every'"),
    # config files: missing, a directory, binary, bad YAML, the wrong shape, aliases, megabyte values
    ("train --config {missing}", "missing.yaml"),
    ("train --config {dir}", "is a directory"),
    ("train --config {garbage}", "garbage is not UTF-8"),
    ("train --config {bad_yaml}", "bad_yaml is not valid YAML: line 2"),
    ("train --config {list_yaml}", "must hold a mapping"),
    ("train --config {not_mapping}", "'model' must be a mapping"),
    ("train --config {unknown}", "'modle'"),
    ("train --config {laughs}", "aliases"),
    ("train --config {huge_value}", "'model.depth' must be int"),
    ("train --config {deep}", "deep nests lists or mappings too deeply"),
    ("train model.depth=" + "[" * 5000, "nests lists or mappings too deeply"),
    ("train --resume --config {garbage}", "garbage"),
    # data
    ("data inspect demo --workers -1", "--workers"),
    ("data inspect demo optim.lr=inf", "'optim.lr'"),
    ("data inspect demo --config {bad_yaml}", "bad_yaml"),
    ("data make-shards --from-folder {tmp} --out {tmp}/o --per-shard 0", "--per-shard"),
    ("data make-shards --from-folder {tmp} --out {tmp}/o --max-side -5", "--max-side"),
    ("data make-shards --out {tmp}/o", "--from-folder"),
    ("data train-tokenizer demo --vocab-size 0 --out {tmp}/t.json", "--vocab-size"),
    ("data train-tokenizer demo --vocab-size 100 --out {tmp}/t.json", "--vocab-size 100"),
    ("data index {tmp}/none-{{0..3}}.tar", "none-0.tar"),
    ("data demo", "--out"),
    # export, probe, visualize
    ("export {missing} --format timm --out {tmp}/e", "missing.yaml"),
    ("export {tmp} --format onnx --out {tmp}/e", "--format"),
    ("export {tmp} --format timm", "--out"),
    ("export {tmp} --format timm --out {tmp}/e --dtype fp64", "--dtype"),
    ("probe {tmp} --batch-size -1", "--batch-size"),
    ("probe {tmp} --batch-size many", "--batch-size"),
    ("probe {tmp} --epochs 0", "--epochs"),
    ("probe {tmp} --lr -1", "--lr"),
    ("probe {tmp} --lr nan", "--lr"),
    ("probe {tmp} --kind svm", "--kind"),
    ("lit {missing} --out {tmp}/l", "missing.yaml"),
    ("lit {tmp} --out {tmp}/l --steps 0", "--steps"),
    ("lit {tmp} --out {tmp}/l --loss hinge", "--loss"),
    ("lit {tmp} --out {tmp}/l --text-width -8", "--text-width"),
    ("lit {tmp}", "--out"),
    ("zero-shot {tmp}", "--shards"),
    ("zero-shot {missing} --shards {csv} --classes a,b", "missing.yaml"),
    ("zero-shot {tmp} --shards {csv} --classes a,b", "neither a LiT folder"),
    ("zero-shot {tmp} --shards {csv} --classes-file {missing}", "missing.yaml"),
    ("zero-shot {tmp} --shards {csv} --classes-file {empty_csv}", "names no class"),
    ("zero-shot {tmp} --shards {csv}", "no class names for"),
    ("zero-shot {tmp} --shards {csv} --classes a,a", "distinct"),
    ("zero-shot {tmp} --shards {csv} --classes a,b --templates 'a photo'", "'a photo'"),
    ("zero-shot {tmp} --shards {tmp}/none.tar --classes a,b", "none.tar"),
    ("visualize {missing}", "missing.yaml"),
    ("visualize {tmp} -n 0", "-n"),
    # scaling
    ("scaling fit {csv} --ci -5", "--ci"),
    ("scaling fit {csv} --ci 100", "--ci"),
    ("scaling fit {csv} --tol 0", "--tol"),
    ("scaling fit {csv} --bootstrap -1", "--bootstrap"),
    ("scaling fit {csv} --holdout -2", "--holdout"),
    ("scaling fit {csv} --budgets 1e15 -1", "--budgets"),
    ("scaling fit {csv} --form cubic", "--form"),
    ("scaling fit {tmp}/none.csv", "none.csv"),
    ("scaling fit {empty_csv}", "empty_csv"),
    ("scaling plot {csv} --out {tmp}/p.png --extrapolate 0.5", "--extrapolate"),
    ("scaling predict {fit_json} --flops -1", "--flops"),
    ("scaling plan {missing} --out {tmp}/plan", "missing.yaml"),
    ("scaling plan {garbage} --out {tmp}/plan", "garbage is not UTF-8"),
    ("scaling plan {sweep_unknown} --out {tmp}/plan", "'sweep.sizez'"),
    ("scaling plan {sweep_laughs} --out {tmp}/plan", "aliases"),
    ("scaling run {tmp} --jobs 0", "--jobs"),
    ("scaling run {tmp} --threads -1", "--threads"),
    # launch, model-info, bench
    ("launch slurm --config {missing} --name x", "missing.yaml"),
    ("launch torchrun --config {bad_yaml} --name x", "bad_yaml"),
    ("launch slurm --config {laughs} --name x", "aliases"),
    ("launch slurm --name x", "--config"),
    ("model-info {bad_yaml}", "bad_yaml"),
    ("model-info {garbage}", "garbage"),
    ("bench loader --batch 0", "--batch"),
    ("bench loader --workers -1", "--workers"),
    ("bench step --steps 0", "--steps"),
    ("bench step --builds plain,fp16", "--builds"),
    ("bench fp8 --log-every 0", "--log-every"),
    ("bench fp8 --recipe delayed", "--recipe"),
    ("bench attention --reps 0", "--reps"),
    ("bench attention --dtype fp8", "--dtype"),
    ("frobnicate", "frobnicate"),
]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("line, fragment", CASES, ids=[c[0][:60] for c in CASES])
def test_bad_invocations_are_one_line_errors(
    line: str, fragment: str, files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.format(**files) for a in shlex.split(line)]
    code, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("aimpre") and ": error: " in lines[0], err[-2000:]
    assert fragment in lines[0], lines[0]
    assert len(lines[0]) < 600  # values are quoted shortened, never whole


def test_table_is_large() -> None:
    assert len(CASES) >= 60


def test_yaml_aliases_are_refused_at_once_in_little_memory(files: dict[str, str]) -> None:
    assert len(LAUGHS) < 400
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match=r"line 2, column \d+: YAML aliases \(\*a\) are not supported"):
            load_config(files["laughs"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0 and peak < 5 * 2**20


def test_short_bounds_any_value() -> None:
    nested: list = ["lol"] * 9
    for _ in range(8):
        nested = [nested] * 9  # 9**9 leaves, shared: repr() would be gigabytes
    for value in (nested, "x" * 10**7, list(range(10**6)), {i: i for i in range(10**5)}, b"\0" * 10**6):
        assert len(short(value)) <= 120
    assert short([1, 2]) == "[1, 2]" and short("ab") == "'ab'"


def _train_args(tmp_path: Path, spec: str, *extra: str) -> list[str]:
    return [
        f"run.out_dir={tmp_path}", "run.name=r", f"data.train_shards={spec}", "data.val_shards=null",
        "data.batch_size=4", "data.num_workers=0", "model.depth=1", "model.dec_depth=1", "trainer.log_every=1",
        *extra,
    ]  # fmt: skip


def _cli(*args: str, code: str = "from aimpre.cli import main; sys.exit(main(sys.argv[1:]))") -> tuple[int, str]:
    """``aimpre ARGS`` in a real process (a training run leaves Lightning's loggers bound to its stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", f"import sys\n{code}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.returncode, done.stderr.strip().splitlines()[-1]


def test_non_finite_stop_is_one_line_and_names_the_checkpoint_on_disk(tmp_path: Path, pretrain_spec: str) -> None:
    """A learning rate of 1e30 makes step 2 onwards NaN: the guard stops the run with the truth about what is on
    disk, first with no checkpoint written yet, then with step 1's."""
    blowup = ["optim.lr=1e30", "optim.warmup_steps=0", "trainer.max_bad_steps=2", "trainer.max_steps=20"]
    args = _train_args(tmp_path, pretrain_spec, *blowup)
    code, last = _cli("train", *args, "trainer.ckpt_every=100")
    assert code == 2 and last.startswith("aimpre: error: 2 consecutive steps had non-finite gradients"), last
    assert f"No checkpoint was written: {tmp_path / 'r' / 'checkpoints' / 'last.ckpt'} does not exist" in last
    assert not (tmp_path / "r" / "checkpoints" / "last.ckpt").exists()

    code, last = _cli("train", *args, "run.name=r1", "trainer.ckpt_every=1")
    assert code == 2 and "The last checkpoint on disk is" in last and "-> step-1.ckpt" in last, last
    assert (tmp_path / "r1" / "checkpoints" / "last.ckpt").resolve().name == "step-1.ckpt"


def test_settings_lightning_refuses_are_one_line(tmp_path: Path) -> None:
    """Valid config values the machine cannot honour (no GPU here; on a GPU machine, more devices than it has)."""
    import torch

    devices = (
        "trainer.devices=1" if not torch.cuda.is_available() else f"trainer.devices={torch.cuda.device_count() + 1}"
    )
    code, last = _cli("train", f"run.out_dir={tmp_path}", "trainer.accelerator=gpu", devices)
    assert code == 2 and last.startswith("aimpre: error: Lightning refused the trainer.* settings"), last


def test_shard_set_too_small_for_one_batch(tmp_path: Path, demo: Path) -> None:
    """2 data workers cannot each get a batch of 100 from 128 samples: said before the workers start."""
    shard = demo / "val-000000.tar"  # 128 samples
    code, last = _cli("train", *_train_args(tmp_path, str(shard), "data.batch_size=100", "data.num_workers=2"))
    assert code == 2 and last.startswith("aimpre: error: config key 'data.train_shards': 128 samples in "), last
    assert str(shard) in last and "one batch of 100 for each of 2 readers" in last


def test_disk_full_names_the_file_and_the_free_space(tmp_path: Path, pretrain_spec: str) -> None:
    """A real write failure: the training process may not write files over 1 MB (RLIMIT_FSIZE, as ``ulimit -f``;
    the kernel answers EFBIG as it answers ENOSPC on a full disk), so the first checkpoint cannot be written."""
    limit = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from aimpre.cli import main
sys.exit(main(sys.argv[1:]))
"""
    args = _train_args(tmp_path, pretrain_spec, "trainer.max_steps=2", "trainer.ckpt_every=1")
    code, last = _cli("train", *args, code=limit)
    ckpts = tmp_path / "r" / "checkpoints"
    assert code == 2 and last.startswith(f"aimpre: error: could not write {ckpts}/.step-1.ckpt.tmp"), last
    assert "GiB free on its filesystem" in last and f"files over {1 << 20} bytes (ulimit -f)" in last, last
    assert not (ckpts / "last.ckpt").exists() and not list(ckpts.glob(".*tmp*"))  # nothing half-written left
