"""model.fused: the torch and liger-kernel paths of RMSNorm, residual-add + RMSNorm, SwiGLU and the text head +
cross-entropy give the same losses and gradients; the switch, its errors, and ``aimpre bench ops``.

Without a GPU only liger's fused linear cross-entropy runs (in Triton's interpreter, which tests/conftest.py turns
on); liger's RMSNorm and SwiGLU fail in the interpreter, so their tests run only on CUDA (``make gpu-check``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aimpre.config import ConfigError, load_config
from aimpre.kernels import fused
from aimpre.model import AIMv2, model_config
from aimpre.model.layers import Block

pytestmark = pytest.mark.skipif(not fused.liger_installed(), reason="liger-kernel is not installed")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA_ONLY = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="liger's RMSNorm and SwiGLU need CUDA (they fail in Triton's interpreter)"
)


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Max abs error at most ``tol`` times the reference's largest magnitude."""
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * want.double().abs().max().item() + 1e-12, f"max abs err {err:.3g}"


@pytest.mark.gpu
@pytest.mark.gpu_rest
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_liger_linear_cross_entropy_equals_float64(bf16: bool) -> None:
    """Loss and gradients of the chunked head + cross-entropy against float64 eager math; pads do not count."""
    g = torch.Generator().manual_seed(0)
    B, L, D, V = 3, 7, 32, 97
    x = torch.randn(B, L, D, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(V, D, generator=g) * D**-0.5).to(DEVICE).requires_grad_()
    target = torch.randint(0, V, (B, L), generator=g).to(DEVICE)
    mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    mask[0, 4:] = mask[2, 1:] = False  # pads after the caption; their ids stay real ids, only the mask drops them

    logp = torch.log_softmax(x.double() @ w.double().T, dim=-1)
    nll = -logp.gather(-1, target[..., None])[..., 0]
    ref = nll[mask].mean()
    want = _grads(ref, [x, w])
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
        loss = fused.linear_cross_entropy(x, w, target, mask, "liger")
    assert loss.dtype == torch.float32
    tol = 2e-2 if bf16 else 1e-5
    _close(loss.detach(), ref.detach(), tol)
    for got, ref_grad in zip(_grads(loss, [x, w]), want, strict=True):
        _close(got, ref_grad, 4 * tol)


def _tiny(mode: str) -> AIMv2:
    torch.manual_seed(0)
    cfg = model_config("tiny", vocab_size=50, img_size=56, depth=2, dec_depth=2, text_len=8, fused=mode)
    return AIMv2(cfg).to(DEVICE).train()


def _batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 56, 56, generator=g)
    text = torch.randint(2, 50, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    return tuple(t.to(DEVICE) for t in (images, text, mask, torch.tensor([3, 9])))


def _losses_and_grads(model: AIMv2, bf16: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(*_batch())
    out["loss"].backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.gpu
@pytest.mark.gpu_rest
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_model_liger_equals_torch(bf16: bool) -> None:
    """A whole AIMv2 under model.fused=liger and =torch (same weights): same losses, same gradients everywhere.
    On CPU the liger model differs in its text head + cross-entropy only; on CUDA in every norm and SwiGLU too."""
    ref_model, liger_model = _tiny("torch"), _tiny("liger")
    liger_model.load_state_dict(ref_model.state_dict())
    want, want_grads = _losses_and_grads(ref_model, bf16)
    got, got_grads = _losses_and_grads(liger_model, bf16)
    tol = 2e-2 if bf16 else 1e-5
    for k in want:
        assert got[k].dtype == want[k].dtype
        _close(got[k].detach(), want[k].detach(), tol)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        _close(got_grads[name], grad, 4 * tol)


def test_auto_is_torch_on_cpu() -> None:
    """model.fused=auto picks torch for every op on CPU tensors; liger on CPU runs only the cross-entropy."""
    x = torch.zeros(2)
    assert not any(fused.use_liger("auto", op, x) for op in ("norm", "swiglu", "ce"))
    assert fused.use_liger("liger", "ce", x) == (os.environ.get("TRITON_INTERPRET") == "1")
    assert not fused.use_liger("liger", "norm", x) and not fused.use_liger("liger", "swiglu", x)
    if torch.cuda.is_available():  # auto on CUDA: liger's cross-entropy only, until bench ops says more
        assert [fused.use_liger("auto", op, x.cuda()) for op in ("norm", "swiglu", "ce")] == [False, False, True]
    a, b = _tiny("torch").cpu(), _tiny("auto").cpu()
    batch = tuple(t.cpu() for t in _batch())
    torch.testing.assert_close(a(*batch)["loss"], b(*batch)["loss"], rtol=0, atol=0)


def test_config_key_is_validated() -> None:
    assert load_config(None, []).model.fused == "auto"
    assert load_config(None, ["model.fused=liger"]).model.fused == "liger"
    with pytest.raises(ConfigError, match=r"'model.fused'.*'fast' is not one of auto, torch, liger"):
        load_config(None, ["model.fused=fast"])
    with pytest.raises(ValueError, match=r"model\.fused='fast'"):
        Block(8, 2, 16, 1e-5, fused="fast")


def test_missing_liger_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """With liger-kernel unimportable, liger is an error naming the key and the install line; auto still runs."""
    for name in {"liger_kernel", *(m for m in sys.modules if m.startswith("liger_kernel."))}:
        monkeypatch.setitem(sys.modules, name, None)  # `import liger_kernel...` now raises ImportError
    with pytest.raises(ConfigError, match=r"'model.fused'.*pip install 'aimpre\[fused\]'"):
        load_config(None, ["model.fused=liger"])
    with pytest.raises(ImportError, match=r"model.fused=liger needs liger-kernel.*pip install 'aimpre\[fused\]'"):
        _tiny("liger")
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(5, 8)
    loss = fused.linear_cross_entropy(x, w, torch.arange(4), torch.ones(4, dtype=torch.bool), "auto")
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.T, torch.arange(4)))


def test_bench_ops_quick_prints_its_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aimpre.cli import main

    out = tmp_path / "ops.md"
    assert main(["bench", "ops", "--quick", "--ops", "add_rmsnorm", "linear_ce", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text.removesuffix("\n")
    header = "| op | where | shape | implementation | fwd+bwd ms | vs eager | peak MiB | max abs diff | note |"
    assert header in text
    if not torch.cuda.is_available():
        assert "these times say nothing about GPU speed" in text
    rows = [line for line in text.splitlines() if line.startswith(("| add_rmsnorm", "| linear_ce"))]
    assert len(rows) == 8  # 2 ops x (eager, compiled, liger, liger compiled)
    jsonl = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]  # written as measured
    assert [(r["case"]["op"], r["impl"]) for r in jsonl] == [(c.split("|")[1].strip(), c.split("|")[4].strip())
                                                            for c in rows]  # fmt: skip
    eager_ce = next(r for r in rows if r.startswith("| linear_ce") and "| eager torch |" in r)
    liger_ce = next(r for r in rows if r.startswith("| linear_ce") and "| liger |" in r)
    assert float(eager_ce.split("|")[5]) > 0 and float(liger_ce.split("|")[5]) > 0  # both timed
    assert float(liger_ce.split("|")[8]) < 1e-4  # liger's loss equals eager torch's
    assert "- linear_ce (text head" in text and "faster than eager torch" in text


@pytest.mark.gpu
@pytest.mark.gpu_rest
@CUDA_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_norm_and_swiglu_equal_float64(dtype: torch.dtype) -> None:
    """liger's RMSNorm, residual-add + RMSNorm and SiLU-mul against float64 eager math, outputs and gradients."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x, d, a, b = (torch.randn(300, 96, generator=g, device="cuda", dtype=dtype).requires_grad_() for _ in range(4))
    w = (1 + 0.1 * torch.randn(96, generator=g, device="cuda")).requires_grad_()
    dy = torch.randn(300, 96, generator=g, device="cuda", dtype=dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5

    def norm64(s: torch.Tensor) -> torch.Tensor:
        s = s.double()
        return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()

    for got_fn, ref_fn, inputs in (
        (lambda: fused.rms_norm(x, w, 1e-5, "liger"), lambda: norm64(x), [x, w]),
        (lambda: fused.add_rms_norm(x, d, w, 1e-5, "liger")[0], lambda: norm64(x.double() + d.double()), [x, d, w]),
        (lambda: fused.add_rms_norm(x, d, w, 1e-5, "liger")[1], lambda: x.double() + d.double(), [x, d]),
        # clones: liger's SwiGLU backward writes the input gradients over the inputs it saved
        (lambda: fused.silu_mul(a.clone(), b.clone(), "liger"), lambda: F.silu(a.double()) * b.double(), [a, b]),
    ):
        got, ref = got_fn(), ref_fn()
        _close(got, ref, tol)
        # dy.clone(): liger's RMSNorm writes its input gradient over the output gradient it is given
        got_grads = torch.autograd.grad(got, inputs, dy.clone())
        for gg, rg in zip(got_grads, torch.autograd.grad(ref, inputs, dy.double()), strict=True):
            _close(gg, rg, 4 * tol)


@pytest.mark.gpu
@pytest.mark.gpu_rest
@CUDA_ONLY
@pytest.mark.parametrize("recompute", [False, True])
def test_compiled_liger_block_equals_eager_torch(recompute: bool) -> None:
    """A Block under model.fused=liger, compiled as ``aimpre train`` compiles it, against the eager torch block,
    with and without activation recomputation, under bf16 autocast."""
    torch.manual_seed(0)
    ref = Block(128, 2, 256, 1e-5, "sdpa", fused="torch").cuda()
    blk = Block(128, 2, 256, 1e-5, "sdpa", fused="liger").cuda()
    blk.load_state_dict(ref.state_dict())
    blk.recompute = recompute
    blk.compile()
    x = torch.randn(4, 40, 128, device="cuda")
    out = {}
    for name, m in (("torch", ref), ("liger", blk)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(xi, "causal")
        y.float().pow(2).mean().backward()
        out[name] = (y.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()})
    (y0, gx0, gp0), (y1, gx1, gp1) = out["torch"], out["liger"]
    assert y1.dtype == y0.dtype
    _close(y1, y0, 2e-2)
    _close(gx1, gx0, 5e-2)
    for n, grad in gp0.items():
        _close(gp1[n], grad, 5e-2)
