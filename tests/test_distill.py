"""Distillation (issue 21 points 2 and 3): a student encoder regressing a frozen teacher's patch features.

Real teachers (an export written by ``write_export``, the session's real tiny Lightning run), real Lightning runs,
real subprocesses for the command line; the teacher's FLOPs checked against torch's FlopCounterMode.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from aimpre.compare import plan
from aimpre.config import ConfigError, load_config
from aimpre.export import export_encoder, load_encoder, read_run, write_export
from aimpre.model.sizes import model_config
from aimpre.model.vit import AIMv2Encoder
from aimpre.objectives import build
from aimpre.objectives.distill import Distill, feature_loss
from aimpre.scaling.flops import forward_flops, param_counts, training_flops
from aimpre.train import train
from helpers import metric_rows

V = 300


def _teacher(tmp_path: Path, **kw: object) -> Path:
    """A random tiny teacher of another width, depth and resolution than the student, as a safetensors export."""
    cfg = model_config("tiny", **{"width": 96, "heads": 3, "depth": 2, "mlp_hidden": 128, "img_size": 84, **kw})
    torch.manual_seed(0)
    enc = AIMv2Encoder(cfg)
    enc.init_weights()
    return write_export(enc, "safetensors", tmp_path / f"teacher{len(list(tmp_path.iterdir()))}")


def _student(teacher: Path, objective: str = "distill", **kw: object) -> object:
    return model_config("tiny", depth=2, dec_depth=1, objective=objective, distill_teacher=str(teacher),
                        vocab_size=V, **kw)  # fmt: skip


@pytest.mark.parametrize("objective", ["distill", "aimv2_distill"])
def test_counts_flops_and_no_teacher_in_the_state(tmp_path: Path, objective: str) -> None:
    """Built model = scaling counts; the teacher's FLOPs are its forward at its resolution (FlopCounterMode), the
    same in forward and training FLOPs; the teacher is neither a parameter nor in the state dict; a backward step
    leaves it untouched and without gradients."""
    teacher = _teacher(tmp_path)
    cfg = _student(teacher, objective)
    model = build(cfg)  # type: ignore[arg-type]
    assert model.param_counts() == param_counts(cfg)  # type: ignore[arg-type]
    assert not any("teacher" in k for k in model.state_dict())
    t = model.distill.teacher
    assert {id(p) for p in t.parameters()}.isdisjoint(id(p) for p in model.parameters())

    counted = AIMv2Encoder(replace(t.cfg, attn_backend="reference"))  # eager attention: FlopCounterMode sees it
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        counted(torch.randn(1, 3, 84, 84))
    assert training_flops(cfg).teacher == forward_flops(cfg).teacher == fc.get_total_flops()  # type: ignore[arg-type]
    assert training_flops(cfg).total == pytest.approx(
        training_flops(cfg).encoder + training_flops(cfg).decoder + training_flops(cfg).heads + fc.get_total_flops()
    )  # type: ignore[arg-type]

    before = {k: v.clone() for k, v in t.state_dict().items()}
    batch = {"text": torch.randint(3, V, (2, 96)), "text_mask": torch.ones(2, 96, dtype=torch.bool)}
    prefix = torch.tensor([3, 9]) if objective == "aimv2_distill" else None
    out = model(torch.randn(2, 3, 112, 112), batch, prefix)
    out["loss"].backward()
    assert out["loss_distill"].item() > 0
    assert model.distill.proj.weight.grad is not None and model.encoder.patch_embed.proj.weight.grad is not None
    assert all(p.grad is None for p in t.parameters())
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())


def test_feature_loss_forms() -> None:
    """Both forms are 0 for the teacher's own features (at any scale: normalised) and positive otherwise."""
    x = torch.randn(2, 5, 8)
    for kind in ("cosine", "smooth_l1"):
        assert feature_loss(3 * x + 1, x, kind).item() == pytest.approx(0, abs=1e-5)
        assert feature_loss(torch.randn(2, 5, 8), x, kind).item() > 0.1


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.distill_loss=l2", "model.distill_loss"),
        ("model.distill_weight=0", "model.distill_weight"),
        ("model.distill_teacher=null", "model.distill_teacher"),
    ],
)
def test_bad_distill_config_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["model.objective=distill", "model.distill_teacher=somewhere", override])


def test_teacher_with_another_patch_size_is_refused(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path, patch_size=7)
    with pytest.raises(ConfigError, match=r"model\.distill_teacher.*patch size 7"):
        build(_student(teacher))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"model\.distill_teacher.*patch size 7"):
        training_flops(_student(teacher))  # type: ignore[arg-type]


def test_unreadable_teachers_name_the_key(tmp_path: Path) -> None:
    """A teacher that is a damaged safetensors file, an empty folder or a checkpoint outside its run: a
    ConfigError naming model.distill_teacher and what is wrong, at build and at counting time."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "t.safetensors").write_text("garbage")
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "last.ckpt").write_text("x")
    cases = {"t.safetensors": "safetensors", "empty": "not a run", "ckpts/last.ckpt": "config"}
    for name, words in cases.items():
        cfg = _student(tmp_path / name)
        for make in (build, training_flops):
            with pytest.raises(ConfigError, match=rf"model\.distill_teacher.*{words}"):
                make(cfg)  # type: ignore[arg-type]


@pytest.mark.slow  # two subprocesses that import torch
def test_cli_bad_teacher_is_one_line_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "d.yaml"
    for teacher, words in ((tmp_path / "missing", "missing"), (_teacher(tmp_path, patch_size=7), "patch size 7")):
        cfg.write_text(f"model:\n  size: tiny\n  objective: distill\n  distill_teacher: {teacher}\n")
        out = subprocess.run([sys.executable, "-m", "aimpre", "model-info", str(cfg)], capture_output=True, text=True)
        assert out.returncode == 2 and words in out.stderr, out.stderr[-2000:]
        assert len(out.stderr.strip().splitlines()) == 1


def test_compare_plans_moe_and_distilled_rows_at_equal_compute(tmp_path: Path, tiny_run: Path) -> None:
    """aimv2-moe and the distilled rows plan at the budget; the distilled rows' FLOPs per sample include the
    teacher's forward, so they train fewer samples than without it; no teacher: one line naming --teacher."""
    rows = ("aimv2", "aimv2-moe", "distill", "aimv2_distill")
    planned = {p.objective: p for p in plan(rows, None, ("model.depth=2", "model.dec_depth=1"), reference_steps=100,
                                             out=tmp_path, teacher=str(tiny_run))}  # fmt: skip
    assert planned["aimv2-moe"].cfg.model.moe_experts == 4 and planned["aimv2-moe"].cfg.model.objective == "aimv2"
    assert planned["distill"].cfg.model.distill_teacher == str(tiny_run)
    budget = planned["aimv2"].flops
    for p in planned.values():
        assert abs(p.flops - budget) / budget < 0.02, p.objective
    d = planned["aimv2_distill"]
    teacher = training_flops(d.cfg.model).teacher
    assert teacher > 0 and d.flops_per_sample == pytest.approx(training_flops(d.cfg.model).total)
    assert d.steps < planned["aimv2"].steps  # it pays for its teacher
    with pytest.raises(ConfigError, match="--teacher"):
        plan(("distill",), None, (), reference_steps=10, out=tmp_path)


def _distill_cfg(tmp_path: Path, spec: str, teacher: Path, name: str, *extra: str) -> object:
    return load_config(None, [
        f"run.out_dir={tmp_path}", f"run.name={name}", f"data.train_shards={spec}", "data.val_shards=null",
        "model.depth=2", "model.objective=distill", f"model.distill_teacher={teacher}", "data.batch_size=8",
        "data.num_workers=1", "trainer.max_steps=12", "trainer.ckpt_every=6", "trainer.log_every=1",
        "trainer.deterministic=true", "optim.warmup_steps=1", "optim.lr=1e-3", *extra,
    ])  # fmt: skip


@pytest.mark.slow  # one 12-step Lightning run of a 2-block student: ~15 s on an idle 2-core machine
def test_student_learns_from_a_trained_teacher(
    tmp_path: Path, pretrain_spec: str, val_spec: str, tiny_run: Path
) -> None:
    """A student distilled from a trained teacher run (the session's tiny run: another depth, the same width):
    loss_distill logged and falling; on held-out images the student's projected features move toward the
    teacher's; its checkpoint holds no teacher tensor; its export is the student encoder alone."""
    run = train(_distill_cfg(tmp_path, pretrain_spec, tiny_run, "student"))  # type: ignore[arg-type]
    rows = metric_rows(run)
    first, last = float(rows[1]["loss_distill"]), float(rows[12]["loss_distill"])
    assert last < 0.8 * first, (first, last)

    ckpt = read_run(run)
    assert not any("teacher" in k for k in ckpt.state)
    model = build(ckpt.cfg.model)
    assert isinstance(model, Distill)
    fresh = build(ckpt.cfg.model)
    model.load_state_dict(ckpt.state)
    from aimpre.data import Augment, ImageTextStream, build_tokenizer, sources

    stream = ImageTextStream(sources(val_spec, "val", True, None), build_tokenizer("bytes"), text_len=96,
                             batch_size=16, aug=Augment(112, train=False), shuffle=0)  # fmt: skip
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (ckpt.cfg.data.mean, ckpt.cfg.data.std))
    x = (next(iter(stream))["image"].float() / 255 - mean) / std  # held-out images, normalised as in training
    with torch.no_grad():
        after, before = model(x, {}, None)["loss_distill"], fresh(x, {}, None)["loss_distill"]
    assert after < 0.8 * before, (before, after)

    out = export_encoder(run, "safetensors", tmp_path / "export")
    enc = load_encoder(out)
    assert set(enc.state_dict()) == set(model.encoder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(enc(x), model.encoder.eval()(x))


def test_the_teacher_sees_its_own_normalisation(tmp_path: Path) -> None:
    """A teacher whose export records CLIP's mean/std, a student trained with ImageNet's: the teacher's targets are
    its features on the image normalised its own way, not the student's (which a released AIMv2, exported with
    CLIP's statistics, would otherwise get)."""
    from aimpre.config import IMAGENET_MEAN, IMAGENET_STD

    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    cfg = model_config("tiny", width=96, heads=3, depth=2, mlp_hidden=128, img_size=84)
    torch.manual_seed(0)
    enc = AIMv2Encoder(cfg)
    enc.init_weights()
    info = {"preprocessing": {"mean": list(clip_mean), "std": list(clip_std), "img_size": 84}}
    teacher = write_export(enc, "safetensors", tmp_path / "teacher", info=info)
    model = build(_student(teacher, img_size=84))  # type: ignore[arg-type]
    model.distill.set_input_norm(IMAGENET_MEAN, IMAGENET_STD)
    pixels = torch.rand(2, 3, 84, 84)
    as_student = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    as_teacher = (pixels - torch.tensor(clip_mean).view(1, 3, 1, 1)) / torch.tensor(clip_std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model.distill.teacher(as_teacher)
        got = model.distill.targets(as_student)
        wrong = model.distill.teacher(as_student)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (wrong - want).abs().max() > 1e-2  # the two normalisations differ enough to matter


def test_teacher_runs_in_training_precision_and_is_resampled(tmp_path: Path) -> None:
    """Under the trainer's bf16 autocast the teacher's forward runs in bf16 and builds no graph; a whole-model bf16
    cast takes the teacher along; a teacher at 84 px (a 6 x 6 grid) gives targets on the 112 px student's 8 x 8
    grid: its features on the image resized to 84 px, resampled bilinearly on the patch grid."""
    import torch.nn.functional as F

    teacher = _teacher(tmp_path)  # 84 px, width 96
    model = build(_student(teacher))  # type: ignore[arg-type]
    t = model.distill.teacher
    seen: list[torch.dtype] = []  # the output dtype of every linear layer of the teacher
    for m in t.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    x = torch.randn(2, 3, 112, 112, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.distill.targets(x)
    assert seen and set(seen) == {torch.bfloat16} and not got.requires_grad and got.shape == (2, 64, 96)

    with torch.no_grad():
        small = F.interpolate(x, size=(84, 84), mode="bicubic", align_corners=False, antialias=True)
        own = t(small).transpose(1, 2).reshape(2, 96, 6, 6)  # [B, D, 6, 6]
        want = F.interpolate(own, size=(8, 8), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        torch.testing.assert_close(model.distill.targets(x), want)

    model.to(torch.bfloat16)
    seen.clear()
    model.distill.targets(x.detach().bfloat16())
    assert next(t.parameters()).dtype == torch.bfloat16 and set(seen) == {torch.bfloat16}
