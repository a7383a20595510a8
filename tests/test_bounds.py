"""Every metadata file aimpre reads back is bounded, and every size read from one is checked before it allocates.

Hostile inputs, each through the real entry point (``aimpre.cli.main``): JSON nested 100,000 deep in each metadata
file (``json.loads`` raised RecursionError: a traceback), a YAML config over the byte bound, sizes far beyond any
model in a config, an export or a LiT folder, and an export onto a "full disk" (a real RLIMIT_FSIZE in a real
process). Each must end in one line naming the file or key, exit code 2, and nothing allocated or left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from aimpre.cli import main
from aimpre.config import dump_config, load_config
from aimpre.data import build_tokenizer
from aimpre.export import load, write_export
from aimpre.model import AIMv2Encoder, model_config
from aimpre.probe import _weights_hash
from aimpre.train import resolve

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DEEP = "[" * 100_000 + "]" * 100_000  # json.loads recursed once per level: RecursionError
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """``aimpre ARGV``: exit code 2 and exactly one line on stderr, which is returned."""
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("aimpre: error: "), (code, err)
    return err[0]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real safetensors export of a 2-block tiny encoder (random weights)."""
    torch.manual_seed(0)
    enc = AIMv2Encoder(model_config("tiny", depth=2)).eval()
    out = tmp_path_factory.mktemp("exp") / "enc"
    return write_export(enc, "safetensors", out, info={"preprocessing": {"mean": MEAN, "std": STD, "img_size": 112}})


# ---- deep JSON in every metadata file -----------------------------------------------------------------------------


def _plant(case: str, root: Path, export_dir: Path, shards: str) -> tuple[list[str], str]:
    """Writes the hostile input of ``case`` under ``root``: (the aimpre arguments that read it, the file named)."""
    d = root / "m"
    d.mkdir()
    out = ["--format", "safetensors", "--out", str(root / "out")]
    if case == "aimpre.json":
        (d / "aimpre.json").write_text(DEEP)
        (d / "model.safetensors").write_bytes((export_dir / "model.safetensors").read_bytes())
        return ["export", str(d), *out], str(d / "aimpre.json")
    if case == "config.json":
        (d / "config.json").write_text(DEEP)
        return ["export", str(d), *out], str(d / "config.json")
    if case == "preprocessor_config.json":
        (d / "config.json").write_text(json.dumps({"model_type": "aimv2_vision_model"}))
        (d / "preprocessor_config.json").write_text(DEEP)
        return ["export", str(d), *out], str(d / "preprocessor_config.json")
    if case == "model.safetensors.index.json":
        (d / "config.json").write_text(json.dumps({"architecture": "aimv2_large_patch14_224"}))
        (d / "model.safetensors.index.json").write_text(DEEP)
        return ["export", str(d), *out], str(d / "model.safetensors.index.json")
    if case == "safetensors metadata":
        f = d / "enc.safetensors"
        save_file({"x": torch.zeros(1)}, str(f), metadata={"aimpre": DEEP})
        return ["export", str(f), *out], f"{f}: header metadata 'aimpre'"
    if case == "lit.json":
        (d / "lit.json").write_text(DEEP)
        return ["zero-shot", str(d), "--shards", shards, "--classes", "a,b"], str(d / "lit.json")
    if case == "plan.json":
        (d / "plan.json").write_text(DEEP)
        return ["scaling", "run", str(d), "--commands", str(root / "cmds.sh")], str(d / "plan.json")
    if case == "summary.json":
        (d / "r").mkdir()
        (d / "r" / "summary.json").write_text(DEEP)
        return ["scaling", "collect", str(d)], str(d / "r" / "summary.json")
    if case == "fit JSON":
        (d / "fit.json").write_text(DEEP)
        return ["scaling", "predict", str(d / "fit.json"), "--flops", "1e20"], str(d / "fit.json")
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["aimpre.json", "config.json", "preprocessor_config.json", "model.safetensors.index.json", "safetensors metadata",
     "lit.json", "plan.json", "summary.json", "fit JSON"],
)  # fmt: skip
def test_deep_json_is_one_line(
    case: str, tmp_path: Path, export_dir: Path, pretrain_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, named = _plant(case, tmp_path, export_dir, pretrain_spec)
    line = _one_line(capsys, argv)
    assert named in line and "nests lists or mappings deeper than 64 levels" in line, line
    assert not (tmp_path / "out").exists()


def test_resume_reads_a_deep_tokenizer_record_in_one_line(
    tmp_path: Path, pretrain_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``aimpre train --resume`` compares the run's tokenizer.identity.json with its tokenizer before training."""
    args = [f"run.out_dir={tmp_path}", "run.name=r", f"data.train_shards={pretrain_spec}", "data.val_shards=null",
            "model.depth=2", "model.dec_depth=1", "trainer.accelerator=cpu"]  # fmt: skip
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    tokenizer = build_tokenizer("bytes", True)
    (run / "config.yaml").write_text(dump_config(resolve(load_config(None, args), tokenizer)))
    (run / "tokenizer.identity.json").write_text(DEEP)
    line = _one_line(capsys, ["train", "--resume", *args])
    assert f"{run / 'tokenizer.identity.json'}" in line and "nests lists or mappings deeper" in line, line


# ---- YAML byte bound ----------------------------------------------------------------------------------------------


def test_yaml_over_the_byte_bound_is_refused_unparsed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 5 MB config (a comment: PyYAML would read it and return the defaults) is refused before parsing."""
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (5 << 20) + "\n")
    line = _one_line(capsys, ["config", "show", "--config", str(big)])
    assert str(big) in line and "over the 4194304" in line, line


# ---- sizes --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.width=10000002", "model.width"),  # divisible by the tiny size's 3 heads
        ("model.text_len=1000000000", "model.text_len"),
        ("model.depth=100000", "model.depth"),
        ("model.vocab_size=4000000000", "model.vocab_size"),
        ("model.img_size=1000006", "model.img_size"),
        ("data.batch_size=1000000000", "data.batch_size"),
        ("trainer.global_batch_size=1000000000000", "trainer.global_batch_size"),
    ],
)
def test_implausible_sizes_name_the_key(override: str, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Checked when the config is loaded, before any model is built (``config show`` would print them)."""
    line = _one_line(capsys, ["config", "show", override])
    assert f"config key {key!r}" in line, line


def test_a_model_over_the_parameter_bound_names_its_largest_part(capsys: pytest.CaptureFixture[str]) -> None:
    """Every key inside its own limit, the whole model 400B parameters."""
    line = _one_line(capsys, ["config", "show", "model.size=3b", "model.width=32768", "model.mlp_hidden=131072"])
    assert "config key 'model.width'" in line and "over the 30B limit" in line and "its encoder" in line, line


def test_run_config_yaml_sizes_are_checked_when_read(
    tmp_path: Path, export_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run handed to ``aimpre export`` whose config.yaml claims a 10M-wide encoder."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "config.yaml").write_text("model:\n  width: 10000000\n  heads: 8\n")
    line = _one_line(capsys, ["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "o")])
    assert "config key 'model.width'" in line, line


def test_export_record_sizes_are_checked_before_building(
    tmp_path: Path, export_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "e"
    d.mkdir()
    record = json.loads((export_dir / "aimpre.json").read_text())
    record["encoder"]["width"], record["encoder"]["heads"] = 10**7, 10
    (d / "aimpre.json").write_text(json.dumps(record))
    (d / "model.safetensors").write_bytes((export_dir / "model.safetensors").read_bytes())
    line = _one_line(capsys, ["export", str(d), "--format", "safetensors", "--out", str(tmp_path / "o")])
    assert f"{d / 'aimpre.json'}: encoder field 'width': 10000000 is over the 65536" in line, line


def _lit_folder(root: Path, export_dir: Path, towers: dict) -> Path:
    """A LiT folder whose lit.json is right about its encoder and claims ``towers``; its weights are one tensor."""
    loaded = load(export_dir)
    pre = loaded.info["preprocessing"]
    d = root / "lit"
    d.mkdir()
    record = {
        "encoder": {"path": str(export_dir), "sha256": _weights_hash(loaded.encoder, pre).hexdigest()},
        "towers": towers, "tokenizer": {"spec": "bytes", "lowercase": True}, "preprocessing": pre,
    }  # fmt: skip
    (d / "lit.json").write_text(json.dumps(record))
    save_file({"text_tower.embed.weight": torch.zeros(4, 4)}, str(d / "model.safetensors"))
    return d


def test_lit_tower_sizes_allocate_nothing_before_the_check(tmp_path: Path, export_dir: Path) -> None:
    """lit.json claims a 4096-wide, 8-block text tower (0.5B parameters, 2 GB); the weights file holds none of it.
    The towers were built for real before their shapes were checked: the process's peak memory shows it."""
    d = _lit_folder(tmp_path, export_dir, {"text_width": 4096, "text_depth": 8, "text_heads": 32})
    code = f"""
import resource
from aimpre.lit import LitError, load_zero_shot_model
try:
    load_zero_shot_model({str(d)!r})
except LitError as e:
    print(str(e).splitlines()[0])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    message, peak_mib = done.stdout.strip().splitlines()[-2], int(done.stdout.strip().splitlines()[-1])
    assert "do not match the configured tower" in message, message
    assert peak_mib < 1500, f"peak RSS {peak_mib} MiB: the claimed towers were allocated"


def test_lit_tower_sizes_over_the_bound_name_the_setting(
    tmp_path: Path, export_dir: Path, pretrain_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _lit_folder(tmp_path, export_dir, {"text_width": 65536, "text_depth": 64, "text_heads": 64})
    line = _one_line(capsys, ["zero-shot", str(d), "--shards", pretrain_spec, "--classes", "a,b"])
    assert f"{d / 'lit.json'}: tower setting 'text_width'" in line and "over the 30B limit" in line, line


# ---- a full disk --------------------------------------------------------------------------------------------------


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, export_dir: Path) -> None:
    """The exporting process may not write files over 1 MB (RLIMIT_FSIZE, as ``ulimit -f``: the kernel answers
    EFBIG as it answers ENOSPC on a full disk); the weights are 4 MB. safetensors raised its own SafetensorError
    (a traceback)."""
    code = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from aimpre.cli import main
sys.exit(main(sys.argv[1:]))
"""
    out = tmp_path / "timm"
    argv = ["export", str(export_dir), "--format", "timm", "--out", str(out)]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300, env=ENV)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and last.startswith("aimpre: error: could not write "), last
    assert "model.safetensors: File too large" in last and f"files over {1 << 20} bytes (ulimit -f)" in last, last
    assert not out.exists() and os.listdir(tmp_path) == []  # no half-written export or temp folder left


# ---- safetensors headers checked before any tensor is loaded -----------------------------------------------------


def _forge(src: Path, dst: Path, claims: dict[str, tuple[str, list[int]]]) -> None:
    """``src`` (a safetensors file) rewritten to ``dst`` with ``claims`` (name -> (dtype, shape)) replacing or adding
    tensors; the claimed data are holes, so the file is sparse: it costs no disk, yet backs every claim."""
    import struct

    from safetensors import safe_open

    sizes = {"F32": 4, "F16": 2, "I64": 8}
    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    header: dict = {"__metadata__": meta} if meta else {}
    chunks, at = [], 0
    for k in sorted({*tensors, *claims}):
        dtype, shape = claims[k] if k in claims else ({torch.float32: "F32"}[tensors[k].dtype], list(tensors[k].shape))
        n = sizes[dtype] * int(torch.tensor(shape, dtype=torch.float64).prod().item())
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}
        chunks.append(None if k in claims else tensors[k].numpy().tobytes())
        at += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(head)) + head)
        base = out.tell()
        for k, chunk in zip(sorted({*tensors, *claims}), chunks, strict=True):
            if chunk is not None:
                out.seek(base + header[k]["data_offsets"][0])
                out.write(chunk)
        out.truncate(base + at)


def test_hf_weights_claiming_huge_projections_allocate_nothing(tmp_path: Path) -> None:
    """An HF export whose layer-0 q/k/v projections claim 256 MB each (a sparse file backs the claim): the whole file
    was loaded and ``from_hf`` concatenated the three (768 MB more) before ``_build`` compared shapes. Now the
    header is compared first: one line, and the process's peak memory shows nothing was loaded."""
    torch.manual_seed(0)
    hf = write_export(AIMv2Encoder(model_config("tiny", depth=1)).eval(), "hf", tmp_path / "hf",
                      info={"preprocessing": {"mean": MEAN, "std": STD, "img_size": 112}})  # fmt: skip
    (hf / "aimpre.json").unlink()  # read as a transformers directory (config.json)
    real = tmp_path / "real.safetensors"
    (hf / "model.safetensors").rename(real)
    claim = ("F32", [16384, 4096])  # 256 MB
    _forge(real, hf / "model.safetensors", {f"encoder.layers.0.attention.{x}_proj.weight": claim for x in "qkv"})
    code = f"""
import resource
from aimpre.export import ExportError, load
try:
    load({str(hf)!r})
except ExportError as e:
    print(str(e).splitlines()[0])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    message, peak_mib = done.stdout.strip().splitlines()[-2], int(done.stdout.strip().splitlines()[-1])
    assert "tensor 'blocks.0.attn.qkv.weight' has shape (49152, 4096)" in message, message
    assert peak_mib < 1500, f"peak RSS {peak_mib} MiB: the claimed projections were loaded"


@pytest.mark.parametrize(
    "claim, expect",
    [
        (("I64", None), "is torch.int64, not a floating-point type"),  # .float() turned integers into weights
        (("F32", [1 << 20]), "not a readable safetensors file"),  # then cut: the claim runs past the file's end
    ],
)
def test_safetensors_claims_are_checked_in_one_line(
    tmp_path: Path, export_dir: Path, claim: tuple, expect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "aimpre.json").write_bytes((export_dir / "aimpre.json").read_bytes())
    dtype, shape = claim
    shape = shape or list(load(export_dir).encoder.state_dict()["norm.weight"].shape)
    _forge(export_dir / "model.safetensors", d / "model.safetensors", {"norm.weight": (dtype, shape)})
    if dtype == "F32":
        os.truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size - (1 << 20))
    line = _one_line(capsys, ["export", str(d), "--format", "safetensors", "--out", str(tmp_path / "out")])
    assert expect in line and str(d) in line, line


# ---- FIFOs where a run or an export is recognised --------------------------------------------------------------


@pytest.mark.parametrize("name, what", [("config.yaml", "run config"), ("aimpre.json", "export record")])
def test_a_fifo_run_file_is_named_not_a_regular_file(
    tmp_path: Path, name: str, what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run whose config.yaml (an export whose aimpre.json) is a FIFO was "not a run (no config.yaml)"."""
    d = tmp_path / "run"
    d.mkdir()
    os.mkfifo(d / name)
    line = _one_line(capsys, ["export", str(d), "--format", "safetensors", "--out", str(tmp_path / "out")])
    assert f"{what} {d / name} is not a regular file" in line, line


# ---- plain-text reads: the lock holder, the class names file, metrics.csv ----------------------------------------


def test_a_huge_lock_note_gives_a_short_one_line_refusal(tmp_path: Path) -> None:
    """The refusal quoted the whole lock file (the holder's note): 10 MB of lines became a 10 MB, many-line error."""
    from aimpre.train.run import run_lock

    with run_lock(tmp_path):  # flock is per open file: a second open in this process is refused like another's
        (tmp_path / ".lock").write_text("host pid\n" * 1_000_000)
        with pytest.raises(FileExistsError) as e, run_lock(tmp_path):
            pass
    message = str(e.value)
    assert "is in use by host pid host pid" in message and "\n" not in message and len(message) < 1000, message[:300]


def test_a_huge_class_names_file_is_refused_unread(tmp_path: Path) -> None:
    """A 100 MB (sparse) class names file was read whole and became one class of 100 MB of NUL characters."""
    from aimpre.lit import LitError, read_classes_file

    f = tmp_path / "classes.txt"
    f.write_text("")
    os.truncate(f, 100 * 2**20)
    with pytest.raises(LitError, match=f"class names file {f} is {100 * 2**20} bytes, over the"):
        read_classes_file(f)


def _collect_val(metrics: Path) -> object:
    from aimpre.scaling.collect import _final_val

    return _final_val(metrics.parent, 10)


def _plot(metrics: Path) -> object:
    from aimpre.visualize import plot_losses

    return plot_losses(metrics)


@pytest.mark.parametrize("reader", [_collect_val, _plot], ids=["collect", "visualize"])
@pytest.mark.parametrize("case", ["long field", "1 GB"])
def test_metrics_csv_is_bounded(tmp_path: Path, reader: object, case: str) -> None:
    """A 200,000-character field raised csv.Error (not a ValueError: a traceback from the CLI); a 1 GB (sparse)
    metrics.csv was read whole. Each is one error naming the file (a file we wrote that no longer parses is
    corrupt; skipping rows would report numbers it does not hold)."""
    from aimpre.files import UntrustedInputError

    f = tmp_path / "metrics.csv"
    if case == "long field":
        f.write_text("step,loss,val_loss\n1,2.0,\n10,1.5," + "9" * 200_000 + "\n")
        match = f"metrics file {f} after line 2: field larger than field limit"
    else:
        f.write_text("step,loss,val_loss\n10,1.5,1.4\n")
        os.truncate(f, 2**30)
        match = f"metrics file {f} is {2**30} bytes, over the"
    with pytest.raises(UntrustedInputError, match=match):
        reader(f)  # type: ignore[operator]


# ---- the tokenizer's vocabulary re-checks the model's size ---------------------------------------------------------


def test_the_tokenizers_vocabulary_is_counted_in_the_size_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 65536-wide, 1-block decoder is 17B parameters: under the 30B bound while the config leaves the vocabulary
    to the tokenizer. A tokenizer.json of 120,000 words sizes the text embedding and head at 2 x 120000 x 65536 =
    15.7B more: the config alone passes; with its tokenizer, the size check refuses it, naming the vocabulary."""
    vocab = {"<pad>": 0, "</s>": 1, "[UNK]": 2, **{f"w{i}": i + 3 for i in range(120_000)}}
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    over = ["model.dec_width=65536", "model.dec_heads=512", "model.dec_depth=1", "model.dec_mlp_hidden=64"]
    cfg = load_config(None, [*over, "run.name=vocab", f"data.tokenizer={tmp_path / 'tokenizer.json'}"])
    assert cfg.model.vocab_size is None  # the config alone passed its size check
    line = _one_line(capsys, ["model-info", "--json", str(_dump(tmp_path / "c.yaml", cfg))])
    assert "(with a vocabulary of 120003)" in line and "over the 30B limit" in line and "model.vocab_size" in line, line


def _dump(path: Path, cfg: object) -> Path:
    path.write_text(dump_config(cfg))  # type: ignore[arg-type]
    return path
