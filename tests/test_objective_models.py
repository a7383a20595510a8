"""Every objective's model, trained for real: on a fixed batch of demo samples, through a Lightning run, and
its run's encoder exported, probed and visualised like an AIMv2 run's."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from aimpre.config import OptimConfig, load_config
from aimpre.data import Augment, ByteTokenizer, ImageTextStream, shard_set
from aimpre.export import read_run
from aimpre.model import model_config
from aimpre.objectives import build, uses_prefix
from aimpre.train.optim import build_optimizer, lr_factor

OBJECTIVES = ("aimv2", "aimv1", "siglip", "clip", "classification")
RUN_ARGS = (
    "data.batch_size=4", "data.num_workers=0", "model.depth=1", "model.dec_depth=1", "model.text_depth=1",
    "model.head_depth=1", "trainer.log_every=1", "trainer.val_batches=1", "optim.warmup_steps=2",
)  # fmt: skip


@pytest.fixture(scope="module")
def fixed_batch(pretrain_spec: str) -> dict:
    ds = ImageTextStream([shard_set(pretrain_spec)], ByteTokenizer(), 96, 4, Augment(112), shuffle=0)
    batch = next(iter(ds))
    batch["label"] = torch.tensor([0, 1, 2, 1])  # the data pipeline gives labels from part "objdata" on
    return batch


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_learns_a_fixed_batch(objective: str, fixed_batch: dict) -> None:
    """30 steps on one batch of real demo samples: the objective's loss falls well below where it started."""
    torch.manual_seed(0)
    cfg = model_config("tiny", vocab_size=258, depth=1, dec_depth=1, objective=objective, num_classes=3, text_depth=1,
                       head_depth=1)  # fmt: skip
    model = build(cfg)
    opt_cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=3, weight_decay=0.0)
    opt = build_optimizer(model, opt_cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(opt_cfg, 30))
    images = (fixed_batch["image"].float() / 255 - 0.45) / 0.225
    prefix = torch.tensor([1, 10, 30, 63]) if uses_prefix(objective) else None
    losses = []
    for _ in range(30):
        out = model(images, fixed_batch, prefix)
        losses.append(float(out["loss"].detach()))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
    if objective == "classification":  # a zero-initialised classifier starts at exactly log(classes)
        assert losses[0] == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=1e-5)
    assert losses[-1] < 0.5 * losses[0], losses
    if objective == "siglip":  # below what the bias alone reaches (1 positive in 4 captions: 4 x H(1/4) = 2.25)
        assert losses[-1] < 1.5, losses
    if objective == "clip":  # well below chance, log(4) = 1.39: images and captions are matched
        assert losses[-1] < 0.5, losses


def _run(out: Path, name: str, objective: str, pretrain_spec: str, val_spec: str, steps: int = 4) -> Path:
    from aimpre.train import train

    extra = ["model.num_classes=14"] if objective == "classification" else []  # the demo's digits + 4 shapes
    return train(load_config(None, [
        f"run.out_dir={out}", f"run.name={name}", f"data.train_shards={pretrain_spec}", f"data.val_shards={val_spec}",
        f"model.objective={objective}", f"trainer.max_steps={steps}", f"trainer.val_every={steps}",
        f"trainer.ckpt_every={steps}", *RUN_ARGS, *extra,
    ]))  # fmt: skip


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory: pytest.TempPathFactory, pretrain_spec: str, val_spec: str) -> Path:
    return _run(tmp_path_factory.mktemp("runs"), "siglip", "siglip", pretrain_spec, val_spec)


def test_siglip_run_logs_its_loss_and_checkpoints_every_part(siglip_run: Path) -> None:
    from aimpre.export import read_run
    from aimpre.scaling import flops_per_sample

    rows = _rows(siglip_run)
    train_rows, val_rows = [r for r in rows if r["loss"]], [r for r in rows if r["val_loss"]]
    assert [r["step"] for r in train_rows] == ["1", "2", "3", "4"] and [r["step"] for r in val_rows] == ["4"]
    assert all(not r["loss_image"] and not r["loss_text"] and not r["val_loss_text"] for r in rows)
    summary = json.loads((siglip_run / "summary.json").read_text())
    assert set(summary["final"]) == {"loss"} and set(summary["val"]) == {"loss"} and "baselines" not in summary
    run = read_run(siglip_run)
    assert summary["params"] == build(run.cfg.model).param_counts()
    assert summary["flops_per_sample"] == flops_per_sample(run.cfg.model)
    assert {k.split(".")[0] for k in run.state} == {"encoder", "image_head", "text_tower", "loss"}
    assert run.state["loss.bias"].item() != -10.0  # SigLIP's bias trained from its -10 start


def test_siglip_run_exports_probes_and_visualises(siglip_run: Path, demo: Path, tmp_path: Path) -> None:
    from aimpre.cli import main
    from aimpre.probe import ProbeSettings, run_probe
    from aimpre.visualize import visualize

    assert main(["export", str(siglip_run), "--format", "safetensors", "--out", str(tmp_path / "enc")]) == 0
    assert json.loads((tmp_path / "enc" / "aimpre.json").read_text())["objective"] == "siglip"
    train, test = str(demo / "digits-train-000000.tar"), str(demo / "digits-test-000000.tar")
    res = run_probe(tmp_path / "enc", train, test, kinds=("linear",), settings=ProbeSettings(epochs=1), cache=False)
    assert res["n_test"] == 539 and 0 <= res["results"]["encoder"]["linear"]["top1"] <= 1
    written = visualize(siglip_run, tmp_path / "figures", n=2)  # no decoder: losses and attention, no predictions
    assert sorted(Path(p).name for p in written) == ["attention.png", "losses.png"]


@pytest.mark.parametrize("objective", ["aimv1", "clip", "classification"])
def test_lightning_trains_objective(objective: str, tmp_path: Path, pretrain_spec: str, val_spec: str) -> None:
    run = _run(tmp_path, objective, objective, pretrain_spec, val_spec, steps=3)
    rows = _rows(run)
    train_rows = [r for r in rows if r["loss"]]
    assert len(train_rows) == 3 and all(not r["loss_text"] for r in rows)
    if objective == "aimv1":  # its one part is the pixel loss
        assert all(r["loss_image"] == r["loss"] for r in train_rows)
        assert json.loads((run / "summary.json").read_text())["baselines"]["loss_image_mean_patch"] > 0
    elif objective == "classification":  # the demo shards' labels reach the loss: it starts at log(14), the head is 0
        assert float(train_rows[0]["loss"]) == pytest.approx(math.log(14), abs=1e-4)
        assert all(not r["loss_image"] for r in rows)
        assert {k.split(".")[0] for k in read_run(run).state} == {"encoder", "head"}
    else:
        assert all(not r["loss_image"] for r in rows)


def test_module_trains_classification_on_a_batch_without_text() -> None:
    """AIMv2Module builds the objective's model and passes the batch through: a classification batch (image and
    label only, as part "objdata" yields) trains without a prefix; its zero-initialised head starts at log(3)."""
    from aimpre.train.module import AIMv2Module

    cfg = load_config(None, ["model.objective=classification", "model.num_classes=3", "model.depth=1"])
    module = AIMv2Module(cfg)
    batch = {"image": torch.randint(0, 256, (4, 3, 112, 112), dtype=torch.uint8), "label": torch.tensor([0, 2, 1, 2])}
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached here
        out = module.training_step(batch, 0)
    assert set(out) == {"loss"} and out["loss"].item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=1e-5)
    out["loss"].backward()
    assert module.model.head.linear.weight.grad.abs().sum() > 0


def test_parallelize_reaches_the_text_tower_blocks() -> None:
    from aimpre.train.parallel import blocks, parallelize

    model = build(model_config("tiny", vocab_size=258, objective="siglip"))
    parallelize(model, recompute=True)
    tower = list(model.text_tower.blocks)
    assert tower and all(b.recompute for b in tower) and {id(b) for b in tower} <= {id(b) for b in blocks(model)}


def test_model_info_counts_the_configured_objective(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aimpre.cli import main
    from aimpre.scaling import flops_per_sample, param_counts

    (tmp_path / "c.yaml").write_text("model:\n  size: tiny\n  objective: siglip\n")
    assert main(["model-info", str(tmp_path / "c.yaml"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = model_config("tiny", objective="siglip", vocab_size=ByteTokenizer().vocab_size)
    assert (
        info == {**param_counts(cfg), "img_size": cfg.img_size, "flops_per_sample": flops_per_sample(cfg)}
        and info["text"] > 0
    )
