"""Fused memory-bound ops behind one switch, ``model.fused``: plain torch or liger-kernel's Triton kernels.

Three ops, each with a torch path (the reference and the CPU fallback, exactly the model's code before this
switch existed) and a liger-kernel path (linkedin/Liger-Kernel >= 0.6.2; argument lists read in 0.6.2 and 0.8.5,
tested with 0.8.5):

- ``rms_norm`` and ``add_rms_norm`` (residual add + RMSNorm in one pass, returning both): ``LigerRMSNormFunction``
  and ``LigerFusedAddRMSNormFunction`` with offset 0 and ``casting_mode="llama"`` (the inverse RMS in fp32, then
  ``(x * rstd).to(x.dtype) * w``: the same as ``F.rms_norm`` for our fp32 residual stream);
- ``silu_mul``: SwiGLU's ``silu(a) * b`` (``LigerSiLUMulFunction``: silu in fp32, rounded to ``b``'s dtype, as
  torch's);
- ``linear_cross_entropy``: the text head and its cross-entropy, chunked over tokens
  (``LigerFusedLinearCrossEntropyFunction``) so the [tokens, vocab] logits and their fp32 copy never exist; pads
  are ``ignore_index`` and the mean runs over real tokens, as ``masked_cross_entropy``.

Modes (``MODES``): ``torch``; ``liger`` (liger's kernel wherever it can run: CUDA tensors, and for the cross-entropy
also CPU tensors under ``TRITON_INTERPRET=1``, which the tests use; liger's RMSNorm and SwiGLU kernels do not run in
the interpreter); ``auto`` (see ``use_liger``).

In-place habits of liger worth knowing (all safe in our blocks, where each of these tensors has one consumer):
``LigerRMSNormFunction`` writes its input gradient over the incoming output gradient (``in_place=True``, which
saves a memset and a write per norm); ``LigerSiLUMulFunction``'s backward writes the gradients of ``a`` and ``b``
over the saved ``a`` and ``b`` (so a graph through it cannot be run backward twice).
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("auto", "torch", "liger")
INSTALL_HINT = "pip install 'aimpre[fused]'"
IGNORE_INDEX = -100  # the target id liger's cross-entropy skips (pads)


def liger_installed() -> bool:
    """Whether liger-kernel is importable, without importing it (~2 s with Triton)."""
    return importlib.util.find_spec("liger_kernel") is not None


def check_mode(mode: str) -> None:
    """Raises ValueError for an unknown mode and ImportError when ``liger`` is asked for but does not import.

    Args:
        mode: the value of ``model.fused``.
    """
    if mode not in MODES:
        raise ValueError(f"model.fused={mode!r} is not one of {', '.join(MODES)}")
    if mode == "liger":
        try:
            from liger_kernel.ops import fused_add_rms_norm, fused_linear_cross_entropy, rms_norm, swiglu  # noqa: F401
        except ImportError as e:
            raise ImportError(f"model.fused=liger needs liger-kernel >= 0.6.2 ({e}): {INSTALL_HINT}") from None


def use_liger(mode: str, op: str, x: Tensor) -> bool:
    """Whether ``op`` ("norm", "swiglu" or "ce") runs liger's kernel on ``x`` under ``model.fused=mode``.

    ``auto`` takes liger only for the fused linear cross-entropy on CUDA: that one pays whatever the kernel
    speeds, since the fp32 [B, 77, 32000] logits and their gradient (~2.5 GiB at batch 128) never exist. RMSNorm
    (+ residual) and SwiGLU stay on torch, which ``aimpre train`` compiles per block with Inductor, until
    ``aimpre bench ops`` on a GPU shows liger ahead of Inductor on them (no GPU was lent to the session that wrote
    this); its verdict lines say which to add here.
    """
    if mode == "torch":
        return False
    if mode == "auto":
        return op == "ce" and x.is_cuda and liger_installed()
    return x.is_cuda or (op == "ce" and os.environ.get("TRITON_INTERPRET") == "1")


def rms_norm(x: Tensor, weight: Tensor, eps: float, mode: str = "torch") -> Tensor:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x^2) + eps) * weight``."""
    if use_liger(mode, "norm", x):
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", True)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float, mode: str = "torch") -> tuple[Tensor, Tensor]:
    """The residual add and the next RMSNorm in one pass: returns ``(rms_norm(x + delta), x + delta)``.

    Args:
        x: the residual stream [..., D] (float32 under bf16 autocast: the sum is stored in the promoted dtype).
        delta: the branch output to add [..., D] (bf16 under autocast).
        weight, eps: the norm's.
        mode: ``model.fused``.
    """
    if use_liger(mode, "norm", x):
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        # liger stores the sum (and the normed output) in its first argument's dtype: promote as torch's add does.
        dtype = torch.promote_types(x.dtype, delta.dtype)
        y, s = LigerFusedAddRMSNormFunction.apply(x.to(dtype), delta, weight, eps, 0.0, "llama", False)
        return y, s
    s = x + delta
    return F.rms_norm(s, (s.shape[-1],), weight, eps), s


def silu_mul(a: Tensor, b: Tensor, mode: str = "torch") -> Tensor:
    """SwiGLU's gate: ``silu(a) * b``, a and b of one shape."""
    if use_liger(mode, "swiglu", a):
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply(a, b)
    return F.silu(a) * b


def _at_least_f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def masked_cross_entropy(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy of logits [..., V] against ids [...] in float32 (float64 stays), averaged where ``mask``."""
    ce = F.cross_entropy(_at_least_f32(logits).flatten(0, -2), target.flatten(), reduction="none")  # [N]
    m = mask.flatten().to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1)


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, mask: Tensor, mode: str = "torch") -> Tensor:
    """``masked_cross_entropy(x @ weight.T, target, mask)``; with liger, chunked so the logits never exist whole.

    Args:
        x: hidden states [..., D].
        weight: the bias-free head's weight [V, D].
        target: ids [...].
        mask: [...] True on the tokens that count (False: pads).
        mode: ``model.fused``.

    Returns:
        The float32 mean cross-entropy over the masked-in tokens (0 when there are none).
    """
    if use_liger(mode, "ce", x):
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        D = x.shape[-1]
        ids = target.masked_fill(~mask, IGNORE_INDEX).reshape(-1)  # [N]: pads are skipped and not counted
        # positional (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
        # reduction, softcap, return_z_loss, accum_dtype): the weight gradient accumulates over the token chunks
        # in fp32 even when the weight is bf16 (FSDP2 mixed precision); the loss always does.
        out = LigerFusedLinearCrossEntropyFunction.apply(
            x.reshape(-1, D), weight, ids, None, None, IGNORE_INDEX, 0.0, 0.0, "mean", None, False, torch.float32
        )
        return out[0] if isinstance(out, tuple) else out
    return masked_cross_entropy(F.linear(x, weight), target, mask)
