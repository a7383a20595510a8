"""trainer.loggers on real Lightning runs: metrics.csv, TensorBoard event files, offline W&B, the text log, the bar."""

from __future__ import annotations

import csv
import re
import struct
import sys
from pathlib import Path

import pytest
import torch

from aimpre.cli import main
from aimpre.config import ConfigError, load_config
from aimpre.train import train
from aimpre.train.callbacks import COLUMNS, NAMES, peak_flops

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step (\d+)/4 loss [\d.]+ loss_image [\d.]+ loss_text [\d.]+ "
    r"lr \d\.\d\de-\d\d img/s [\d.]+ eta \d+:\d\d:\d\d$"
)


def _cfg(tmp_path: Path, pretrain_spec: str, val_spec: str, name: str, loggers: str):
    return load_config(
        None,
        [
            f"run.out_dir={tmp_path}", f"run.name={name}", f"data.train_shards={pretrain_spec}",
            f"data.val_shards={val_spec}", "data.batch_size=4", "data.num_workers=0", "model.depth=1",
            "model.dec_depth=1", "trainer.max_steps=4", "trainer.log_every=2", "trainer.val_every=4",
            "trainer.val_batches=1", "trainer.ckpt_every=4", "optim.warmup_steps=2", f"trainer.loggers={loggers}",
        ],
    )  # fmt: skip


def _csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == COLUMNS  # the columns scaling collect and visualize read
        return list(reader)


def _csv_values(rows: list[dict[str, str]]) -> dict[tuple[str, int], float]:
    return {(k, int(r["step"])): float(v) for r in rows for k, v in r.items() if k != "step" and v != ""}


def _tensorboard(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a TensorBoard log directory as TensorBoard reads them (its event accumulator: every event
    file in order, purging what a ``purge_step`` session drops), per tag the (step, value) points in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _tb_values(log_dir: Path) -> dict[tuple[str, int], float]:
    """The points of ``_tensorboard`` by (metrics.csv column, step); each point must be there once."""
    names = {v: k for k, v in NAMES.items()}
    points = [((names[tag], step), v) for tag, series in _tensorboard(log_dir).items() for step, v in series]
    assert len(points) == len(dict(points)), "a step logged twice"
    return dict(points)


def test_csv_and_tensorboard_get_the_same_rows_and_a_file_log_gets_text_lines(
    tmp_path: Path, pretrain_spec: str, val_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tensorboard")
    run = train(_cfg(tmp_path, pretrain_spec, val_spec, "tb", "[csv,tensorboard]"))
    rows = _csv_rows(run)
    assert [(r["step"], bool(r["loss"]), bool(r["val_loss"])) for r in rows] == [
        ("1", True, False), ("2", True, False), ("4", True, False), ("4", False, True)
    ]  # fmt: skip
    expected = _csv_values(rows)
    assert {k for k, _ in expected} >= {*COLUMNS[1:]} - {"mfu", "loss_balance", "loss_distill", "val_loss_distill"}
    # (no MFU on a CPU; the balance and distillation losses are those of MoE and distillation runs)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    tags = set(_tensorboard(run / "tensorboard"))
    assert {"train/loss", "val/loss", "optim/lr", "perf/img_per_s", "data/skipped", "progress/samples"} <= tags
    assert all(tag.split("/")[0] in ("train", "val", "optim", "perf", "data", "progress") for tag in tags)
    scalars = _tb_values(run / "tensorboard")
    assert set(scalars) == set(expected)  # every metric at the same steps, nothing else
    for key, value in expected.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6), key

    # stdout is not a terminal under pytest: no progress bar, a text line per logged step, the same in out.log
    out = capsys.readouterr().out
    assert "\r" not in out
    printed = [line for line in out.splitlines() if " step " in line]
    logged = (run / "out.log").read_text().splitlines()
    assert printed == logged and len(logged) == 4
    assert [LINE.match(line)[1] for line in logged[:3]] == ["1", "2", "4"]  # type: ignore[index]
    train_row = next(r for r in rows if r["step"] == "2" and r["loss"])
    assert f"loss {float(train_row['loss']):.4f} " in logged[1] and f"lr {float(train_row['lr']):.2e} " in logged[1]
    val_row = rows[-1]
    assert re.search(rf"step 4/4 val loss {float(val_row['val_loss']):.4f} loss_image", logged[3])


def test_a_terminal_gets_a_bar_with_loss_lr_and_img_per_s(
    tmp_path: Path,
    pretrain_spec: str,
    val_spec: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    run = train(_cfg(tmp_path, pretrain_spec, val_spec, "bar", "[csv]"))
    out = capsys.readouterr().out
    last = out.split("\r")[-1]  # the bar's final state
    assert re.search(r"train: 100%.*4/4.*loss=[\d.]+, lr=\d\.\d\de-\d\d, img/s=[\d.]+", out), last
    assert not [line for line in out.splitlines() if LINE.match(line)]  # no text lines on a terminal
    assert len((run / "out.log").read_text().splitlines()) == 4  # but still in out.log
    assert not (run / "tensorboard").exists() and not (run / "wandb").exists()


def _wandb_history(path: Path) -> dict[tuple[str, int], float]:
    """The metrics of an offline W&B run file: a 7-byte W&B header, then LevelDB-log records (32 KiB blocks; each
    record: crc, length, type FULL/FIRST/MIDDLE/LAST) holding protobuf Records, of which ``history`` are the logs."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk, out = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or kind == 0:  # block trailer / padding
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL, LAST: a whole Record
            rec = wandb_internal_pb2.Record.FromString(chunk)
            chunk = b""
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): float(i.value_json) for i in rec.history.item}
                step = int(items.pop("trainer/global_step"))
                assert int(items["_step"]) == step  # W&B's step is ours: monotone across a resume
                out.update({(k, step): v for k, v in items.items() if not k.startswith("_")})
    return out


def test_offline_wandb_run_in_the_run_directory(
    tmp_path: Path, pretrain_spec: str, val_spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(k, raising=False)
    run = train(_cfg(tmp_path, pretrain_spec, val_spec, "wb", "[wandb]"))
    expected = _csv_values(_csv_rows(run))  # metrics.csv is written whatever the list holds
    (offline,) = (run / "wandb").glob("offline-run-*-wb")  # offline, the run name as its id
    logged = _wandb_history(offline / "run-wb.wandb")
    assert set(logged) == {(NAMES[k], step) for k, step in expected}  # grouped names: train/loss, perf/mfu ...
    for (k, step), value in expected.items():
        assert logged[NAMES[k], step] == pytest.approx(value, rel=1e-6), (k, step)


@pytest.mark.parametrize(
    ("loggers", "message"),
    [("[mlflow]", r"'trainer\.loggers': 'mlflow' not one of csv, tensorboard, wandb"),
     ("csv", r"'trainer\.loggers' must be a list")],
)  # fmt: skip
def test_unknown_logger_is_a_config_error(loggers: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"trainer.loggers={loggers}"])


def test_missing_logger_package_names_the_key_and_the_pip_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec returns None
    code = main(["train", f"run.out_dir={tmp_path}", "run.name=x", "trainer.loggers=[csv,wandb]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "trainer.loggers" in err and "pip install 'aimpre[wandb]'" in err


@pytest.mark.parametrize(
    ("name", "dtype", "peak"),
    [
        ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),  # Lightning's table (ours said 989e12 for every H100)
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA H200", torch.bfloat16, 989e12),  # names Lightning misses or misreads: our fallback
        ("NVIDIA GH200 480GB", torch.bfloat16, 989e12),
        ("NVIDIA L40S", torch.bfloat16, 362e12),
        ("NVIDIA H200", torch.float32, None),  # the fallback knows 16-bit peaks only
        ("Some Future GPU", torch.bfloat16, None),
    ],
)
def test_peak_flops_from_lightning_with_a_fallback(
    name: str, dtype: torch.dtype, peak: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), dtype) == peak
    assert peak_flops(torch.device("cpu"), dtype) is None
