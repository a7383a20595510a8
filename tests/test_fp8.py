"""trainer.precision=fp8: torchao's float8 linears in the transformer blocks, run for real on CPU (torchao's float8
GEMMs have a CPU path), checked against a float64 reference of float8 operands; a real Lightning run that trains,
checkpoints, resumes and exports exactly as a bf16 run; and the one-line errors where float8 cannot run."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors import safe_open
from torch import nn

from aimpre.config import ConfigError, load_config
from aimpre.export import export_encoder, load_encoder
from aimpre.model import AIMv2, model_config
from aimpre.model.layers import Block
from aimpre.train import train
from aimpre.train.checkpoint import load_checkpoint, model_state
from aimpre.train.parallel import convert_fp8, fp8_linears, fp8_problem, parallelize

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_rest]  # a GPU code path; CI runs it on CPU


def _model(**kw: int) -> AIMv2:
    torch.manual_seed(0)
    return AIMv2(model_config("tiny", vocab_size=64, img_size=28, depth=1, dec_depth=1, text_len=8, **kw))


def _float8(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` through ``dtype`` with one dynamic scale (max |t| -> the format's largest value), in float64."""
    top = torch.finfo(dtype).max
    scale = top / t.abs().max().float()
    return (t.float() * scale).clamp(-top, top).to(dtype).double() / scale.double()


def test_block_linears_are_converted_and_unaligned_ones_skipped() -> None:
    model = _model(mlp_hidden=200)  # the encoder's SwiGLU 192 -> 200 -> 192: not multiples of 16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted, skipped = convert_fp8(model)
    enc, dec = "encoder.blocks.0.", "decoder.blocks.0."
    assert converted == [enc + "attn.qkv", enc + "attn.proj"] + [dec + n for n in
                         ("attn.qkv", "attn.proj", "mlp.fc1_g", "mlp.fc1_x", "mlp.fc2")]  # fmt: skip
    assert skipped == [enc + "mlp.fc1_g", enc + "mlp.fc1_x", enc + "mlp.fc2"]
    assert fp8_linears(model) == (converted, skipped)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {n for n, k in kinds.items() if k == "Float8Linear"} == set(converted)
    assert len(kinds) > len(converted) + len(skipped)  # heads and the decoder's image projection stay plain
    after = model.state_dict()  # the same names, plain tensors, unchanged values: checkpoints look the same
    assert list(after) == list(before) and all(type(v) is torch.Tensor for v in after.values())
    assert all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ConfigError, match=r"trainer\.fp8_recipe"):
        convert_fp8(_model(), "delayed")


def test_float8_linear_gemms_match_a_float64_reference_of_float8_operands() -> None:
    """Output, input gradient and weight gradient are GEMMs of e4m3 (input, weight) and e5m2 (output gradient)
    operands, each dynamically scaled per tensor: equal to float64 products of the float8-rounded operands, and
    visibly not the unrounded product."""
    block = Block(64, 2, 128, 1e-5)
    convert_fp8(nn.Sequential(block))
    lin = block.mlp.fc1_g
    assert type(lin).__name__ == "Float8Linear"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=g, requires_grad=True)
    grad_out = torch.randn(32, 128, generator=g)
    y = lin(x)
    y.backward(grad_out)
    w, x64 = lin.weight.detach(), x.detach()
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    checks = [
        (y, _float8(x64, e4) @ _float8(w, e4).T, x64.double() @ w.double().T),
        (x.grad, _float8(grad_out, e5) @ _float8(w, e4), grad_out.double() @ w.double()),
        (lin.weight.grad, _float8(grad_out, e5).T @ _float8(x64, e4), grad_out.double().T @ x64.double()),
    ]
    for got, float8_ref, exact in checks:
        assert got is not None
        scale = exact.abs().max().item()
        assert (got.double() - float8_ref).abs().max().item() < 1e-5 * scale
        assert (got.double() - exact).abs().max().item() > 1e-2 * scale


def test_parallelize_converts_before_recompute_runs_and_keeps_names() -> None:
    """recompute -> fp8 (no compile here: inductor on CPU takes half a minute): the same parameter names, a loss
    and gradients close to bf16 autocast's, and not identical to them."""

    def loss_and_grads(model: AIMv2) -> tuple[float, dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(1)
        images, text = torch.randn(2, 3, 28, 28, generator=g), torch.randint(2, 64, (2, 8), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, text, torch.ones_like(text, dtype=torch.bool), torch.tensor([1, 3]))
        out["loss"].backward()
        return float(out["loss"]), {n: p.grad.double().flatten() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads(_model())
    model = parallelize(_model(), recompute=True, fp8="tensorwise")
    assert len(fp8_linears(model)[0]) == 10 and all(b.recompute for b in model.encoder.blocks)
    loss8, grads8 = loss_and_grads(model)
    assert list(grads8) == list(grads)
    assert loss8 != loss and abs(loss8 - loss) < 0.02 * loss
    for n, g in grads.items():
        assert torch.nn.functional.cosine_similarity(grads8[n], g, dim=0) > 0.95, n


def test_fp8_refused_without_torchao_or_float8_tensor_cores(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert fp8_problem(torch.device("cpu")) is None
    assert load_config(None, ["trainer.precision=fp8"]).trainer.fp8_recipe == "tensorwise"
    with pytest.raises(ConfigError, match=r"'trainer\.fp8_recipe'"):
        load_config(None, ["trainer.precision=fp8", "trainer.fp8_recipe=delayed"])
    # an A100 (8.0): no float8 tensor cores
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    problem = fp8_problem(torch.device("cuda"))
    assert problem is not None and "'trainer.precision'" in problem and "A100-SXM4-80GB has 8.0" in problem
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_problem(torch.device("cuda")) is None
    monkeypatch.undo()
    # torchao not installed: one line naming the key and the extra, before a run directory exists
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "torchao", None)
    problem = fp8_problem(torch.device("cpu"))
    assert problem == "config key 'trainer.precision': fp8 needs torchao, which is not installed: " + (
        "pip install 'aimpre[fp8]'"
    )
    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.name=r", "trainer.precision=fp8"])
    with pytest.raises(ConfigError, match=r"trainer.precision.*aimpre\[fp8\]"):
        train(cfg)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match=r"aimpre\[fp8\]"):
        convert_fp8(_model())


class _Linears(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.found = fp8_linears(module.model)  # type: ignore[arg-type]


class _StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}


def test_fp8_lightning_run_trains_resumes_and_exports_like_bf16(tmp_path: Path, pretrain_spec: str) -> None:
    def cfg(name: str, precision: str, steps: int = 6) -> object:
        return load_config(None, [
            f"run.out_dir={tmp_path}", f"run.name={name}", f"data.train_shards={pretrain_spec}", "data.val_shards=null",
            "data.batch_size=4", "data.num_workers=0", "model.depth=2", "model.dec_depth=1", "model.img_size=56",
            "model.text_len=32", "optim.warmup_steps=2",
            f"trainer.max_steps={steps}", "trainer.ckpt_every=3", "trainer.log_every=1", "trainer.deterministic=true",
            f"trainer.precision={precision}", "trainer.accelerator=cpu",
        ])  # fmt: skip

    seen = _Linears()
    full = train(cfg("fp8", "fp8"), callbacks=(seen,))  # type: ignore[arg-type]
    assert len(seen.found[0]) == 3 * 5 and seen.found[1] == []  # tiny's widths are multiples of 16: all convert
    losses = _losses(full)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert losses[6] < 0.9 * losses[1]
    # stopped at step 3 and resumed from its fp8 checkpoint: the same steps 4..6 as the uninterrupted run
    part = train(cfg("part", "fp8"), callbacks=(_StopAt(3),))  # type: ignore[arg-type]
    assert max(_losses(part)) == 3
    train(cfg("part", "fp8"), resume=True)  # type: ignore[arg-type]
    resumed = _losses(part)
    assert [resumed[s] for s in (4, 5, 6)] == [losses[s] for s in (4, 5, 6)]
    # checkpoint and export: the names and plain float32 tensors of a bf16 run's
    bf16 = train(cfg("bf16", "bf16-mixed", steps=1))  # type: ignore[arg-type]
    state8 = model_state(load_checkpoint(full / "checkpoints" / "last.ckpt"))
    state16 = model_state(load_checkpoint(bf16 / "checkpoints" / "last.ckpt"))
    assert list(state8) == list(state16)
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in state8.values())
    names = []
    for run in (full, bf16):
        out = export_encoder(run, "safetensors", tmp_path / f"{run.name}-export")
        with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
            names.append(sorted(f.keys()))
    assert names[0] == names[1]
    encoder = load_encoder(tmp_path / "fp8-export").eval()
    weight = encoder.state_dict()["blocks.1.attn.qkv.weight"]
    assert torch.equal(weight, state8["encoder.blocks.1.attn.qkv.weight"])
    with torch.no_grad():
        assert torch.isfinite(encoder(torch.randn(2, 3, 56, 56))).all()
