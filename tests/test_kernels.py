from __future__ import annotations

import pytest
import torch

from aimpre.kernels import BACKENDS, HAS_TRITON, attention, attention_qkv, dense_mask


def _allowed(mask: str, prefix: int, i: int, j: int) -> bool:
    return mask == "full" or j <= i or (mask == "prefix" and j < prefix)


@pytest.mark.parametrize("mask", ["full", "causal", "prefix"])
def test_dense_mask_by_definition(mask: str) -> None:
    prefix = torch.tensor([1, 4, 6])
    m = dense_mask(mask, prefix if mask == "prefix" else None, 7, torch.device("cpu"))
    for b in range(3):
        for i in range(7):
            for j in range(7):
                got = True if m is None else bool(m[b if m.shape[0] > 1 else 0, 0, i, j])
                assert got == _allowed(mask, int(prefix[b]), i, j), (b, i, j)


@pytest.mark.parametrize("backend", sorted(set(BACKENDS) - {"reference"}))
@pytest.mark.parametrize("mask", ["full", "causal", "prefix"])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_backends_match_the_float64_reference(backend: str, mask: str, T: int) -> None:
    if backend == "xformers":
        pytest.skip("xformers runs on CUDA tensors only")
    if backend == "triton" and (not HAS_TRITON or torch.cuda.is_available()):
        pytest.skip("CPU tensors take the Triton interpreter, used only without a GPU (test_triton_attention.py)")
    torch.manual_seed(T)
    q, k, v = (torch.randn(3, 2, T, 16, dtype=torch.float64) for _ in range(3))
    prefix = torch.tensor([1, T, max(1, T // 2)])
    kw = {"mask": mask, "prefix_len": prefix if mask == "prefix" else None}
    ref = attention(q, k, v, backend="reference", **kw)
    out = attention(q.float(), k.float(), v.float(), backend=backend, **kw)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])  # flex: no backward on CPU
@pytest.mark.parametrize("mask", ["full", "causal", "prefix"])
def test_packed_qkv_matches_the_float64_reference(backend: str, mask: str) -> None:
    """attention_qkv on [B, T, 3, H, D] gives attention's output as [B, T, H, D] and the gradient of the packed
    input, whichever backend (Triton reads the packed tensor itself, the others get views of it)."""
    if backend == "triton" and (not HAS_TRITON or torch.cuda.is_available()):
        pytest.skip("CPU tensors take the Triton interpreter, used only without a GPU (test_triton_attention.py)")
    torch.manual_seed(0)
    B, T, H, D = 3, 33, 2, 16
    qkv, grad_out = torch.randn(B, T, 3, H, D, dtype=torch.float64), torch.randn(B, T, H, D, dtype=torch.float64)
    prefix = torch.tensor([1, T, T // 2]) if mask == "prefix" else None
    runs = []
    for name, dtype in (("reference", torch.float64), (backend, torch.float32)):
        x = qkv.to(dtype, copy=True).requires_grad_()
        out = attention_qkv(x, mask=mask, prefix_len=prefix, backend=name)
        out.backward(grad_out.to(dtype))
        runs.append((out.double(), x.grad.double()))
    (ref, ref_grad), (out, grad) = runs
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # the unpacked oracle: [B, H, T, D] views
    unpacked = attention(q, k, v, mask=mask, prefix_len=prefix, backend="reference")
    torch.testing.assert_close(ref, unpacked.transpose(1, 2))
    assert out.shape == (B, T, H, D) and grad.shape == qkv.shape
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad, ref_grad, atol=2e-5, rtol=2e-5)


def test_reference_is_softmax_attention_by_hand() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 3, 2, dtype=torch.float64) for _ in range(3))
    out = attention(q, k, v, mask="prefix", prefix_len=torch.tensor([2]), backend="reference")
    for i, keys in enumerate([[0, 1], [0, 1], [0, 1, 2]]):
        s = torch.stack([(q[0, 0, i] * k[0, 0, j]).sum() / 2**0.5 for j in keys])
        expected = (s.softmax(0)[:, None] * v[0, 0, keys]).sum(0)
        torch.testing.assert_close(out[0, 0, i], expected)


def test_bad_calls_say_what_is_wrong() -> None:
    q = torch.randn(2, 1, 4, 8)
    with pytest.raises(ValueError, match="needs prefix_len"):
        attention(q, q, q, mask="prefix")
    with pytest.raises(ValueError, match=r"of shape \[2\]"):
        attention(q, q, q, mask="prefix", prefix_len=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="unknown attention mask"):
        attention(q, q, q, mask="diagonal")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, q, q, backend="cudnn-magic")
    with pytest.raises(ValueError, match="share one"):
        attention(q, q[:, :, :3], q)
    qkv = torch.randn(2, 4, 3, 1, 8)
    with pytest.raises(ValueError, match=r"qkv must be \[B, T, 3, H, D\]"):
        attention_qkv(q)
    with pytest.raises(ValueError, match="needs prefix_len"):
        attention_qkv(qkv, mask="prefix")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention_qkv(qkv, backend="cudnn-magic")


def test_xformers_backend_says_why_it_cannot_run() -> None:
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises((RuntimeError, ValueError), match="xformers"):  # not installed, or CPU tensors
        attention(q, q, q, backend="xformers")
