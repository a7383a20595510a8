"""Files that would run code if unpickled, planted in everything aimpre reads, through every entry point.

Each payload is a real pickle whose ``__reduce__`` creates a marker file (what an attacker's ``os.system`` would
do). Every planted run or export must end in a one-line ``aimpre: error: ...`` naming the file, exit code 2,
and no marker. The sharded fixtures are real: a 1-process FSDP run writes a torch.distributed.checkpoint
directory, which is then tampered with.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shlex
import shutil
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from aimpre.cli import main
from aimpre.export import ExportError, load_encoder, write_export
from aimpre.model import AIMv2Encoder, model_config
from aimpre.train.checkpoint import load_checkpoint, model_state

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["model.depth=2", "model.dec_depth=1", "data.batch_size=4", "data.num_workers=0", "trainer.log_every=1"]


class Payload:
    """Unpickling this opens (creates) ``marker`` for writing: any code at all would run just as well."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "CODE-RAN"  # one per test, so that each test tells on its own entry point


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory, pretrain_spec: str) -> Path:
    """A real run trained under FSDP (1 process): its last.ckpt is a sharded checkpoint directory."""
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "aimpre", "train", f"run.out_dir={out}", "run.name=f",
           f"data.train_shards={pretrain_spec}", "data.val_shards=null", "trainer.max_steps=2", "trainer.ckpt_every=2",
           "trainer.strategy=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
           *TINY]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "f" / "checkpoints" / "last.ckpt").resolve().is_dir()
    return out / "f"


# ---- planting ---------------------------------------------------------------------------------------------------


def _sharded(run: Path) -> Path:
    return (run / "checkpoints" / "last.ckpt").resolve()


def _replace_last(run: Path, make: Callable[[Path], None]) -> None:
    last = run / "checkpoints" / "last.ckpt"
    target = last.resolve()
    shutil.rmtree(target)
    last.unlink()
    make(last)


def plant_ckpt_torch(run: Path, marker: Path) -> None:
    """last.ckpt a torch.save zip whose pickle holds the payload beside a real state_dict."""
    state = model_state(load_checkpoint(run / "checkpoints" / "last.ckpt"))
    _replace_last(run, lambda p: torch.save({"state_dict": state, "global_step": 2, "x": Payload(marker)}, p))


def plant_ckpt_pickle(run: Path, marker: Path) -> None:
    """last.ckpt a raw (legacy, non-zip) pickle."""
    _replace_last(run, lambda p: p.write_bytes(pickle.dumps({"state_dict": {}, "x": Payload(marker)})))


def plant_metadata(run: Path, marker: Path) -> None:
    (_sharded(run) / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def plant_distcp(run: Path, marker: Path) -> None:
    """The optimizer's learning rate, a value --resume reads, becomes the payload inside the .distcp shard."""
    ckpt = _sharded(run)
    state = load_checkpoint(ckpt)
    state.pop("global_step")  # meta.pt's keys stay in meta.pt
    for key in [k for k in state if k not in ("state_dict", "optimizer_0")]:
        state.pop(key)
    state["optimizer_0"]["param_groups"][0]["lr"] = Payload(marker)
    for f in ckpt.iterdir():
        if f.name != "meta.pt":
            f.unlink()
    dcp.save(state, checkpoint_id=ckpt, no_dist=True)


def plant_meta_pt(run: Path, marker: Path) -> None:
    meta = _sharded(run) / "meta.pt"
    saved = torch.load(meta, weights_only=True)
    torch.save({**saved, "x": Payload(marker)}, meta)


def plant_config_yaml(run: Path, marker: Path) -> None:
    """yaml.unsafe_load would run this tag."""
    (run / "config.yaml").write_text(f"!!python/object/apply:builtins.open [{str(marker)!r}, 'w']\n")


RUN_PLANTS = {
    "ckpt-torch-zip": plant_ckpt_torch,
    "ckpt-raw-pickle": plant_ckpt_pickle,
    "dcp-.metadata": plant_metadata,
    "dcp-.distcp": plant_distcp,
    "dcp-meta.pt": plant_meta_pt,
    "config.yaml": plant_config_yaml,
}
FILE_NAMED = {"ckpt-torch-zip": "last.ckpt", "ckpt-raw-pickle": "last.ckpt", "dcp-.metadata": ".metadata",
              "dcp-.distcp": "optimizer_0.param_groups.0.lr", "dcp-meta.pt": "meta.pt",
              "config.yaml": "config.yaml"}  # fmt: skip


def _exported(tmp: Path, fmt: str) -> Path:
    torch.manual_seed(0)
    enc = AIMv2Encoder(model_config("tiny", depth=2, img_size=56)).eval()
    return write_export(enc, fmt, tmp / fmt, info={"preprocessing": {"mean": [0.5] * 3, "std": [0.25] * 3,
                                                                      "img_size": 56}})  # fmt: skip


def plant_aimpre_json(tmp: Path, marker: Path) -> Path:
    out = _exported(tmp, "safetensors")
    (out / "aimpre.json").write_bytes(pickle.dumps(Payload(marker)))
    return out


def plant_config_json(tmp: Path, marker: Path) -> Path:
    out = _exported(tmp, "timm")
    (out / "aimpre.json").unlink()  # read as a timm hub directory: config.json says what it is
    (out / "config.json").write_bytes(pickle.dumps(Payload(marker)))
    return out


def plant_safetensors_header(tmp: Path, marker: Path) -> Path:
    out = _exported(tmp, "safetensors")
    evil = pickle.dumps(Payload(marker))
    (out / "model.safetensors").write_bytes(struct.pack("<Q", len(evil)) + evil)
    return out


def plant_safetensors_metadata(tmp: Path, marker: Path) -> Path:
    """A well-formed safetensors file whose ``aimpre`` metadata string is a pickle, not JSON."""
    out = _exported(tmp, "safetensors")
    tensors = {"pos_embed": torch.zeros(1, 16, 192)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"aimpre": pickle.dumps(Payload(marker)).hex()})
    return out / "model.safetensors"


EXPORT_PLANTS = {
    "aimpre.json": (plant_aimpre_json, "aimpre.json"),
    "config.json": (plant_config_json, "config.json"),
    "safetensors-header": (plant_safetensors_header, "model.safetensors"),
    "safetensors-metadata": (plant_safetensors_metadata, "model.safetensors"),
}


# ---- entry points -----------------------------------------------------------------------------------------------


def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def _subprocess(argv: list[str], _capsys: object) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "aimpre", *argv], capture_output=True, text=True, timeout=300,
                          env=ENV)  # fmt: skip
    return done.returncode, done.stderr


def _load_encoder(path: Path, _capsys: object) -> tuple[int, str]:
    """The Python API: the same one-line error, raised (the CLI turns it into exit code 2)."""
    try:
        load_encoder(path)
    except (ValueError, FileNotFoundError) as e:
        return 2, f"aimpre: error: {e}\n"
    return 0, ""


def _assert_refused(code: int, err: str, named: str, marker: Path) -> None:
    assert not marker.exists(), "the planted payload ran"
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("aimpre: error: ")]
    assert len(errors) == 1 and named in errors[0], err[-2000:]


@pytest.mark.parametrize("entry", ["export", "probe", "visualize", "load_encoder", "resume"])
@pytest.mark.parametrize("plant", list(RUN_PLANTS))
def test_planted_run_runs_nothing(
    plant: str, entry: str, fsdp_run: Path, marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "f"
    shutil.copytree(fsdp_run, run, symlinks=True)
    RUN_PLANTS[plant](run, marker)
    if entry == "load_encoder":
        code, err = _load_encoder(run, capsys)
    elif entry == "resume":
        # the config a user would resume with: the run's own, from outside the (planted) directory
        strategy = "trainer.strategy=auto" if plant.startswith("ckpt") else "trainer.strategy=fsdp"
        cfg = ["--config", str(fsdp_run / "config.yaml"), f"run.out_dir={tmp_path}", "trainer.max_steps=3", strategy]
        # FSDP initialises a process group: a process of its own, as a user's job has
        call = _cli if plant.startswith("ckpt") or plant == "config.yaml" else _subprocess
        code, err = call(["train", "--resume", *cfg], capsys)
    else:
        argv = {"export": ["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "out")],
                "probe": ["probe", str(run), "--epochs", "1"],
                "visualize": ["visualize", str(run), "--out", str(tmp_path / "fig")]}[entry]  # fmt: skip
        code, err = _cli(argv, capsys)
    _assert_refused(code, err, FILE_NAMED[plant], marker)


@pytest.mark.parametrize("entry", ["export", "probe", "load_encoder"])
@pytest.mark.parametrize("plant", list(EXPORT_PLANTS))
def test_planted_export_runs_nothing(
    plant: str, entry: str, marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make, named = EXPORT_PLANTS[plant]
    src = make(tmp_path, marker)
    if entry == "load_encoder":
        code, err = _load_encoder(src, capsys)
    else:
        argv = {"export": ["export", str(src), "--format", "timm", "--out", str(tmp_path / "out")],
                "probe": ["probe", str(src), "--epochs", "1"]}[entry]  # fmt: skip
        code, err = _cli(argv, capsys)
    _assert_refused(code, err, named, marker)


def test_real_sharded_checkpoint_still_exports_and_resumes(fsdp_run: Path, tmp_path: Path) -> None:
    """What the safe readers admit is what FSDP training writes: it exports, and resumes to the next steps."""
    consolidated = load_checkpoint(_sharded(fsdp_run))
    assert consolidated["global_step"] == 2 and consolidated["optimizer_0"]["param_groups"][0]["lr"] > 0
    state = model_state(consolidated)
    enc = load_encoder(fsdp_run)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, state[f"encoder.{k}"]), k
    run = tmp_path / "f"
    shutil.copytree(fsdp_run, run, symlinks=True)
    argv = ["train", "--resume", "--config", str(fsdp_run / "config.yaml"), f"run.out_dir={tmp_path}",
            "trainer.max_steps=3"]  # fmt: skip
    code, err = _subprocess(argv, None)
    assert code == 0, err[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_sharded_metadata_claiming_huge_tensors_allocates_nothing(tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    dcp.save({"state_dict": {"model.w": torch.zeros(4, 4)}}, checkpoint_id=ckpt, no_dist=True)
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())  # our own file, written just above
    metadata.state_dict_metadata["state_dict.model.w"].size = torch.Size([1 << 20, 1 << 20])
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match=r"\.metadata claims 4398046511104 bytes of tensors, its \.distcp files hold"):
        load_checkpoint(ckpt)


def test_claimed_depth_is_checked_before_anything_is_built(tmp_path: Path) -> None:
    """A 2-block export whose aimpre.json claims 1000 blocks: refused by comparing the header with the model built
    on the meta device (no weights allocated); the size limits (depth <= 1024) bound what that can cost."""
    out = _exported(tmp_path, "safetensors")
    info = json.loads((out / "aimpre.json").read_text())
    info["encoder"]["depth"] = 1000
    (out / "aimpre.json").write_text(json.dumps(info))
    tracemalloc.start()
    try:
        with pytest.raises(ExportError, match=r"aimpre\.json says depth 1000, but .* holds 2 blocks"):
            load_encoder(out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 150e6  # 1000 meta blocks: module objects only, about 67 MB; no tensor data


def _edit_json(file: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


MALFORMED = {  # what is wrong -> (the format to export, an edit of its JSON file, the words the error must hold)
    "encoder not an object": ("safetensors", "aimpre.json", lambda d: d.update(encoder=[1, 2]), "encoder fields"),
    "depth a string": ("safetensors", "aimpre.json", lambda d: d["encoder"].update(depth="2"), "'depth'"),
    "width negative": ("safetensors", "aimpre.json", lambda d: d["encoder"].update(width=-192), "'width'"),
    "norm_eps zero": ("safetensors", "aimpre.json", lambda d: d["encoder"].update(norm_eps=0), "'norm_eps'"),
    "heads not dividing": ("safetensors", "aimpre.json", lambda d: d["encoder"].update(heads=5), "heads 5"),
    "unknown format": ("safetensors", "aimpre.json", lambda d: d.update(format="onnx"), "'format'"),
    "mean not 3 numbers": ("safetensors", "aimpre.json", lambda d: d["preprocessing"].update(mean="x"), "mean"),
    "record without format": ("safetensors", "aimpre.json", lambda d: d.pop("format"), "missing key 'format'"),
    "timm model_args a list": ("timm", "config.json", lambda d: d.update(model_args=[1]), "model_args"),
    "timm depth a float": ("timm", "config.json", lambda d: d["model_args"].update(depth=2.5), "model_args.depth"),
    "timm img_size not square": ("timm", "config.json", lambda d: d["model_args"].update(img_size=[56, 42]),
                                 "not square"),
    "timm mlp_ratio a string": ("timm", "config.json", lambda d: d["model_args"].update(mlp_ratio="4"), "mlp_ratio"),
    "timm pretrained_cfg a string": ("timm", "config.json", lambda d: d.update(pretrained_cfg="x"), "pretrained_cfg"),
    "timm std a dict": ("timm", "config.json", lambda d: d["pretrained_cfg"].update(std={}), "std"),
    "hf vision_config a string": ("hf", "config.json", lambda d: d.update(model_type="aimv2", vision_config="x"),
                                "vision_config"),
    "hf hidden_size null": ("hf", "config.json", lambda d: d.update(hidden_size=None), "'hidden_size'"),
    "hf image_mean a string": ("hf", "preprocessor_config.json", lambda d: d.update(image_mean="0.5"), "mean"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_export_fields_are_one_line_errors(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fmt, name, edit, words = MALFORMED[case]
    out = _exported(tmp_path, fmt)
    if name != "aimpre.json":
        (out / "aimpre.json").unlink()  # read as a timm / transformers directory
    _edit_json(out / name, edit)
    code, err = _cli(["export", str(out), "--format", "safetensors", "--out", str(tmp_path / "again")], capsys)
    assert code == 2 and err.startswith("aimpre: error: ") and err.count("\n") == 1, err
    assert name in err and words in err, err


@pytest.mark.parametrize("state_dict", [[1, 2], {"model.encoder.pos_embed": [0.0]}, "weights"])
def test_state_dict_not_a_mapping_of_tensors(
    state_dict: object, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    torch.save({"state_dict": state_dict, "global_step": 1}, run / "checkpoints" / "last.ckpt")
    code, err = _cli(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and "last.ckpt: 'state_dict'" in err, err


@pytest.mark.parametrize("weight_map", [{"pos_embed": "../elsewhere.safetensors"}, ["model.safetensors"]])
def test_weight_index_names_only_files_beside_it(weight_map: object, tmp_path: Path) -> None:
    out = _exported(tmp_path, "safetensors")
    (out / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ExportError, match=r"index\.json: weight_map"):
        load_encoder(out)


@pytest.mark.parametrize(("key", "value", "words"), [("depth", 1000, "says depth 1000, but the state dict holds 2"),
                                                     ("dec_width", 3072, "the config implies")])  # fmt: skip
def test_run_config_claims_are_checked_before_the_model_is_built(
    key: str, value: int, words: str, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """visualize builds the whole model from the run's config.yaml: a claim the checkpoint does not back is an
    error before anything of the claimed size is allocated."""
    import yaml

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run, symlinks=True)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    tracemalloc.start()
    try:
        code, err = _cli(["visualize", str(run), "--out", str(tmp_path / "fig")], capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert peak < 50e6


def test_resuming_a_sharded_checkpoint_without_fsdp_says_how(
    fsdp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shutil.copytree(fsdp_run, tmp_path / "f", symlinks=True)
    argv = ["train", "--resume", "--config", str(fsdp_run / "config.yaml"), f"run.out_dir={tmp_path}",
            "trainer.max_steps=3", "trainer.strategy=auto"]  # fmt: skip
    code, err = _cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "resume it with trainer.strategy=fsdp" in err, err


# ---- names and generated scripts --------------------------------------------------------------------------------

HOSTILE_NAMES = ["../../escaped", "a\ntouch PWNED", ".hidden", "a/b", "x; touch PWNED", ""]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_run_name_is_a_plain_name(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """run.name becomes out_dir/NAME: one that climbs out of run.out_dir, or holds a newline, is refused before
    any directory is made."""
    out = tmp_path / "runs"
    argv = ["train", f"run.out_dir={out}", f"run.name={json.dumps(name)}", "trainer.max_steps=1", *TINY]
    code, err = _cli(argv, capsys)
    assert code == 2 and err.startswith("aimpre: error: config key 'run.name': ") and err.count("\n") == 1, err
    assert not out.exists() and not (tmp_path / "escaped").exists()


def test_run_out_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_dir = json.dumps(str(tmp_path / "a\nb"))
    code, err = _cli(["train", f"run.out_dir={out_dir}", "run.name=r"], capsys)
    assert code == 2 and "config key 'run.out_dir'" in err and err.count("\n") == 1, err


def _shims(tmp_path: Path) -> dict[str, str]:
    """srun and scontrol that do nothing: the generated script's own lines run, the training does not."""
    shims = tmp_path / "shims"
    shims.mkdir()
    for tool in ("srun", "scontrol", "aimpre"):
        (shims / tool).write_text("#!/bin/sh\nexit 0\n")
        (shims / tool).chmod(0o755)
    return {**ENV, "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "1",
            "SLURM_ARRAY_TASK_ID": "0"}  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--name", "r\ntouch PWNED"), ("--name", "../r"), ("--time", "1:00:00\ntouch PWNED"),
     ("--sbatch", "--account=x\ntouch PWNED"), ("--python", "python\ntouch PWNED")],
)  # fmt: skip
def test_launch_slurm_refuses_values_that_would_be_script_lines(
    flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "c.yaml").write_text("data: {num_workers: 0}\n")
    argv = ["launch", "slurm", "--config", str(tmp_path / "c.yaml"), "--name", "r", flag, value]
    code, err = _cli(argv, capsys)
    assert code == 2 and err.startswith(f"aimpre: error: {flag}: ") and err.count("\n") == 1, err


def test_launch_slurm_quotes_one_line_values(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Values with quotes, spaces, ``#`` and ``;`` stay words of their own line: the script, run by bash with
    SLURM's tools as no-ops, runs nothing they hold."""
    (tmp_path / "c.yaml").write_text("data: {num_workers: 0}\n")
    evil = f'x" ; touch {tmp_path}/PWNED #'
    argv = ["launch", "slurm", "--config", str(tmp_path / "c.yaml"), "--name", "r", "--time", evil,
            "--sbatch", evil, "--python", evil, f"run.out_dir={tmp_path / 'runs'}", "optim.lr=0.001"]  # fmt: skip
    assert main(argv) == 0
    script = capsys.readouterr().out
    for line in script.splitlines():  # sbatch splits an #SBATCH line at whitespace outside double quotes
        if line.startswith("#SBATCH "):
            assert len(shlex.split(line[len("#SBATCH ") :])) == 1, line
    (tmp_path / "job.sbatch").write_text(script)
    done = subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=_shims(tmp_path), capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "PWNED").exists()


def _sweep(tmp_path: Path, name: str = "s") -> Path:
    sweep = {"name": name, "design": "grid", "samples": [64], "sizes": {"xs": {"width": 32, "depth": 1}},
             "head_dim": 16, "mlp_ratio": 2.0,
             "overrides": {"data.num_workers": 0, "optim.warmup_steps": 1}}  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(json.dumps(sweep))  # JSON is YAML
    return tmp_path / "sweep.yaml"


@pytest.mark.parametrize("name", ["s\ntouch PWNED", "../s", "s s"])
def test_sweep_name_is_a_plain_name(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = _cli(["scaling", "plan", str(_sweep(tmp_path, name)), "--out", str(tmp_path / "plan")], capsys)
    assert code == 2 and "sweep key 'sweep.name'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "plan").exists()


PLAN_EDITS = {  # a plan.json someone hands you -> the field the error must name
    "sweep newline": (lambda d: d.update(sweep="s\ntouch PWNED"), "sweep"),
    "design newline": (lambda d: d.update(design="grid\ntouch PWNED"), "design"),
    "point climbs out": (lambda d: d["points"][0].update(name="../../escaped"), "points[0].name"),
    "group newline": (lambda d: d["points"][0].update(group="g\ntouch PWNED"), "points[0].group"),
    "config elsewhere": (lambda d: d["points"][0].update(config="/etc/passwd"), "points[0].config"),
    "runs_dir climbs out": (lambda d: d.update(runs_dir=".."), "runs_dir"),
    "points not a list": (lambda d: d.update(points={"a": 1}), "points"),
}


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("plan")
    assert main(["scaling", "plan", str(_sweep(tmp)), "--out", str(tmp / "plan")]) == 0
    return tmp / "plan"


@pytest.mark.parametrize("edit", list(PLAN_EDITS))
@pytest.mark.parametrize("entry", ["slurm", "commands", "run"])
def test_planted_plan_names_are_refused(
    edit: str, entry: str, plan_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    plan = tmp_path / "plan"
    shutil.copytree(plan_dir, plan)
    change, field = PLAN_EDITS[edit]
    _edit_json(plan / "plan.json", change)
    extra = {"slurm": ["--slurm", str(tmp_path / "job.sbatch")], "commands": ["--commands", str(tmp_path / "c.sh")],
             "run": []}[entry]  # fmt: skip
    code, err = _cli(["scaling", "run", str(plan), *extra], capsys)
    assert code == 2 and err.startswith("aimpre: error: ") and err.count("\n") == 1, err
    assert f"plan.json: {field}" in err, err
    assert not (tmp_path / "job.sbatch").exists() and not (tmp_path / "escaped").exists()


def test_plan_slurm_script_quotes_its_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A plan folder whose path holds spaces and shell syntax: the array script passes it as one word."""
    odd = tmp_path / "a b;touch PWNED"
    assert main(["scaling", "plan", str(_sweep(tmp_path)), "--out", str(odd)]) == 0
    job = tmp_path / "job.sbatch"
    assert main(["scaling", "run", str(odd), "--slurm", str(job), "--sbatch", "--comment=x y"]) == 0
    for line in job.read_text().splitlines():
        if line.startswith("#SBATCH "):
            assert len(shlex.split(line[len("#SBATCH ") :])) == 1, line
    done = subprocess.run(["bash", str(job)], env=_shims(tmp_path), capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "PWNED").exists()


# ---- commands in a run's saved config ---------------------------------------------------------------------------


def _saved_config(run: Path, **data: object) -> None:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"].update(data)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


SAVED_SPECS = {  # data.* of a planted config.yaml (MARK: the marker file, VAL: a real shard) -> the key named
    "val pipe:": ({"val_shards": "pipe:touch MARK; cat VAL"}, "data.val_shards"),
    "val PIPE: (any case)": ({"val_shards": "PIPE:touch MARK; cat VAL"}, "data.val_shards"),
    "train pipe:, no val": ({"val_shards": None, "train_shards": "pipe:touch MARK; cat VAL"}, "data.train_shards"),
    "pipe: in a list": ({"val_shards": ["VAL", "pipe:touch MARK; cat VAL"]}, "data.val_shards"),
    "pipe: after ::": ({"val_shards": "VAL::pipe:touch MARK; cat VAL"}, "data.val_shards"),
    "pipe: in braces": ({"val_shards": "pipe:touch MARK{1..2}; cat VAL"}, "data.val_shards"),
    "http URL (curl)": ({"val_shards": "http://127.0.0.1:9/x.tar"}, "data.val_shards"),
}


@pytest.mark.parametrize("case", list(SAVED_SPECS))
def test_saved_config_shards_start_no_process(
    case: str, tiny_run: Path, val_spec: str, marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """visualize reads images from the run's saved shards: a command there is refused in one line naming the key
    and config.yaml; the same spec given with --data is the user's own and runs."""
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run, symlinks=True)
    data, key = SAVED_SPECS[case]
    fill = lambda v: v.replace("MARK", str(marker)).replace("VAL", val_spec) if isinstance(v, str) else v
    _saved_config(run, **{k: [fill(x) for x in v] if isinstance(v, list) else fill(v) for k, v in data.items()})
    code, err = _cli(["visualize", str(run), "--out", str(tmp_path / "fig")], capsys)
    assert not list(tmp_path.glob(f"{marker.name}*")), "the saved config's command ran"
    assert code == 2 and err.startswith("aimpre: error: ") and err.count("\n") == 1, err
    assert "config.yaml" in err and key in err and "--data" in err, err


def test_explicit_pipe_data_is_honoured(
    tiny_run: Path, val_spec: str, marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run, symlinks=True)
    _saved_config(run, val_shards=f"pipe:touch {marker}; cat {val_spec}", index=None)
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"shards": {Path(val_spec).name: 128}}))
    argv = ["visualize", str(run), "--out", str(tmp_path / "fig"), "-n", "2", "--data", f"pipe:touch {marker}; cat "
            f"{val_spec}"]  # fmt: skip
    _saved_config(run, index=str(index))
    code, err = _cli(argv, capsys)
    assert code == 0, err
    assert marker.exists() and (tmp_path / "fig" / "attention.png").is_file()


@contextlib.contextmanager
def _eof_later(fifo: Path, after: float = 20.0) -> Iterator[None]:
    """Opens ``fifo`` for writing (EOF to a reader blocked on it) if the block runs past ``after`` seconds, so that
    code that waits on a FIFO fails the test instead of hanging it."""
    done = threading.Event()

    def rescue() -> None:
        if not done.wait(after):
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    t = threading.Thread(target=rescue, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def test_saved_config_fifo_shard_is_refused_not_waited_on(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run, symlinks=True)
    fifo = tmp_path / "val-000000.tar"
    os.mkfifo(fifo)
    _saved_config(run, val_shards=str(fifo))
    with _eof_later(fifo):
        code, err = _cli(["visualize", str(run), "--out", str(tmp_path / "fig")], capsys)
    assert code == 2 and "not a regular file" in err and "data.val_shards" in err and err.count("\n") == 1, err


# ---- writes outside the run directory ---------------------------------------------------------------------------


def _link(target: Path) -> Callable[[Path], None]:
    return lambda p: p.symlink_to(target)


RUN_DIR_PLANTS = {  # what is planted in (or as) the run directory before training -> the path the error names
    ".lock symlink": (".lock", "file", ".lock"),
    "out.log symlink": ("out.log", "file", "out.log"),
    "metrics.csv symlink": ("metrics.csv", "file", "metrics.csv"),
    "checkpoints/ symlink": ("checkpoints", "dir", "checkpoints"),
    "run directory symlink": ("", "dir", "r"),
    ".lock FIFO": (".lock", "fifo", ".lock"),
}


@pytest.mark.parametrize("plant", list(RUN_DIR_PLANTS))
def test_training_writes_nothing_through_planted_links(
    plant: str, pretrain_spec: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run directory may be handed over with links in it: training refuses them in one line naming the file,
    and the file or folder they point at is left as it was."""
    name, kind, named = RUN_DIR_PLANTS[plant]
    out, run = tmp_path / "runs", tmp_path / "runs" / "r"
    victim = tmp_path / "victim"
    (run if name else out).mkdir(parents=True)
    where = run / name if name else run
    if kind == "file":
        victim.write_text("precious\n")
        where.symlink_to(victim)
    elif kind == "dir":
        victim.mkdir()
        where.symlink_to(victim, target_is_directory=True)
    else:
        os.mkfifo(where)
    argv = ["train", f"run.out_dir={out}", "run.name=r", f"data.train_shards={pretrain_spec}", "data.val_shards=null",
            "trainer.max_steps=2", "trainer.ckpt_every=1", *TINY]  # fmt: skip
    with _eof_later(where) if kind == "fifo" else contextlib.nullcontext():
        code, err = _cli(argv, capsys)
    if kind == "file":
        assert victim.read_text() == "precious\n"
    elif kind == "dir":
        assert list(victim.iterdir()) == []
    assert code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("aimpre: error: ")]
    assert len(errors) == 1 and f"{named} is " in errors[0] and "Traceback" not in err, err[-2000:]


@pytest.mark.parametrize("entry", ["resume", "export"])
def test_last_ckpt_a_fifo_is_refused_not_waited_on(
    entry: str, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "tiny2"
    shutil.copytree(tiny_run, run, symlinks=True)
    last = run / "checkpoints" / "last.ckpt"
    last.unlink()
    os.mkfifo(run / "checkpoints" / "step-6.fifo")
    last.symlink_to("step-6.fifo")
    argv = {"resume": ["train", "--resume", "--config", str(tiny_run / "config.yaml"), f"run.out_dir={tmp_path}",
                       "trainer.max_steps=7"],
            "export": ["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "o")]}[entry]  # fmt: skip
    with _eof_later(run / "checkpoints" / "step-6.fifo"):
        code, err = _cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "last.ckpt is not a regular file" in err, err


class ShellPayload:
    """Unpickling this runs a shell command (os.system: a module torch 2.14 blocks outright, with other wording)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("plant", ["ckpt-torch-zip", "ckpt-torch-zip-os.system", "ckpt-raw-pickle"])
def test_weights_only_refusal_says_what_and_gives_no_unsafe_advice(
    plant: str, tiny_run: Path, marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """torch's refusal text advises re-running with weights_only=False: the one line says what was refused."""
    run = tmp_path / "tiny2"
    shutil.copytree(tiny_run, run, symlinks=True)
    last = run / "checkpoints" / "last.ckpt"
    last.unlink()
    payload = {"state_dict": {}, "x": ShellPayload(marker) if plant.endswith("os.system") else Payload(marker)}
    if plant.startswith("ckpt-torch-zip"):
        torch.save(payload, last)
    else:
        last.write_bytes(pickle.dumps(payload))
    code, err = _cli(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "out")], capsys)
    _assert_refused(code, err, "last.ckpt", marker)
    line = err.replace(str(tmp_path), "TMP")  # the test's own name holds "weights_only"
    assert "False" not in line and "weights_only=" not in line and "trusted source" not in line, err
    what = {"ckpt-torch-zip": "it refers to io.open", "ckpt-torch-zip-os.system": "it refers to posix.system",
            "ckpt-raw-pickle": "Unsupported operand"}[plant]  # fmt: skip
    assert what in err, err


# ---- feature caches ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny export and the feature cache file the probe writes for its demo:digits-test features."""
    from aimpre.export import load
    from aimpre.probe import features, shard_urls

    tmp = tmp_path_factory.mktemp("cached")
    src = _exported(tmp, "safetensors")
    loaded = load(src)
    features(loaded.encoder, loaded.info["preprocessing"], shard_urls("demo:digits-test"), tmp / "features")
    (file,) = (tmp / "features").glob("*.pt")
    return src, file


def _garbage(f: Path, marker: Path) -> None:
    f.write_bytes(b"\x00not a torch file" * 10)


def _truncated(f: Path, marker: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _wrong_fields(f: Path, marker: Path) -> None:
    torch.save({"tokens": "x", "labels": [1]}, f)


def _fifo(f: Path, marker: Path) -> None:
    f.unlink()
    os.mkfifo(f)


def _code(f: Path, marker: Path) -> None:
    saved = torch.load(f, weights_only=True)
    torch.save({**saved, "x": Payload(marker)}, f)


CACHE_PLANTS = {"garbage": _garbage, "truncated": _truncated, "wrong fields": _wrong_fields, "FIFO": _fifo,
                "pickle with code": _code}  # fmt: skip


@pytest.mark.parametrize(  # each recompute takes ~10 s on the CI machine: two kinds of damage by default
    "plant", [p if p in ("garbage", "FIFO", "pickle with code") else pytest.param(p, marks=pytest.mark.slow)
              for p in CACHE_PLANTS],
)  # fmt: skip
def test_planted_feature_cache(plant: str, cached: tuple[Path, Path], marker: Path, tmp_path: Path) -> None:
    """Our own cache, damaged, is recomputed and replaced (a note on stderr says so); one asking to run code is
    refused in one line naming it (someone tampered with the cache: recomputing would hide it). Nothing runs."""
    from aimpre.export import load
    from aimpre.probe import features, shard_urls
    from aimpre.train.checkpoint import UnsafeCheckpointError

    src, good = cached
    file = tmp_path / "features" / good.name
    file.parent.mkdir()
    shutil.copy(good, file)
    CACHE_PLANTS[plant](file, marker)
    loaded, urls = load(src), shard_urls("demo:digits-test")
    with _eof_later(file):
        if plant == "pickle with code":
            with pytest.raises(UnsafeCheckpointError, match=rf"feature cache .*{file.name}: refused: .*io\.open"):
                features(loaded.encoder, loaded.info["preprocessing"], urls, file.parent)
            assert not marker.exists()
            return
        tokens, labels = features(loaded.encoder, loaded.info["preprocessing"], urls, file.parent)
    assert not marker.exists()
    expected = torch.load(good, weights_only=True)
    assert torch.equal(tokens, expected["tokens"]) and torch.equal(labels, expected["labels"])
    assert torch.equal(torch.load(file, weights_only=True)["tokens"], tokens)  # replaced by the recomputed ones


def test_planted_feature_cache_is_one_line_from_the_cli(
    cached: tuple[Path, Path], marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    src, good = cached
    (tmp_path / "features").mkdir()
    shutil.copy(good, tmp_path / "features" / good.name)
    _code(tmp_path / "features" / good.name, marker)
    for d in Path(os.environ["AIMPRE_CACHE"]).iterdir():  # the demo data: shared, not copied
        if d.name != "features":  # (this worker's own feature caches, from other tests: not this one's)
            (tmp_path / d.name).symlink_to(d)
    monkeypatch.setenv("AIMPRE_CACHE", str(tmp_path))
    argv = ["probe", str(src), "--train", "demo:digits-test", "--test", "none", "--epochs", "1"]
    code, err = _cli(argv, capsys)
    _assert_refused(code, err, f"feature cache {tmp_path / 'features' / good.name}: refused", marker)
