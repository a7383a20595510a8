"""``attention`` and ``attention_qkv``: the dispatch to a backend (``aimpre.kernels`` re-exports them)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

from aimpre.kernels import backends
from aimpre.kernels.masks import MASKS, Mask, check_mask, dense_mask

Backend = Callable[[Tensor, Tensor, Tensor, str, "Tensor | None"], Tensor]

BACKENDS: dict[str, Backend] = {
    "reference": backends.reference,
    "sdpa": backends.sdpa,
    "flex": backends.flex,
    "triton": backends.triton,
    "xformers": backends.xformers,
}

# Looked up once, without importing triton (CPU-only torch builds have none; the triton backend then says so).
HAS_TRITON = importlib.util.find_spec("triton") is not None


def available_backends() -> list[str]:
    return ["auto", *BACKENDS]


def _auto(q: Tensor, mask: str) -> str:
    # Expected, not yet measured (no GPU was lent to the session that wrote this; `aimpre bench attention` on one
    # decides): for prefix and causal masks our kernel skips the fully masked blocks, for the full mask SDPA's
    # flash kernel has nothing to skip and is the tuned one. fp32 goes to SDPA: our fp32 path is exact, not fast.
    if (
        q.is_cuda
        and mask != "full"
        and HAS_TRITON
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] in backends.TRITON_HEAD_DIMS
    ):
        return "triton"
    # Without Triton: SDPA falls back to a dense-mask kernel for the prefix mask, while FlexAttention (compiled,
    # so only under torch.compile) skips the fully masked blocks.
    if q.is_cuda and mask == "prefix" and torch.compiler.is_compiling():
        return "flex"
    return "sdpa"


def prepare_mask(
    kind: str, prefix_len: Tensor | None, B: int, T: int, device: torch.device, backend_names: set[str]
) -> Mask:
    """The mask of one forward, built once for every block (torchtitan, apple/ml-l3m) before the blocks run.

    Builds what the blocks' backends would otherwise build per call: Flex's block mask where a block runs "flex"
    (or "auto", which picks Flex under compile on CUDA without Triton), SDPA's boolean prefix matrix where a block
    runs "sdpa" (or "auto" off CUDA). Our Triton kernel and the reference need nothing built.

    Args:
        kind: "full", "causal" or "prefix".
        prefix_len: int tensor [B] for "prefix".
        B, T: batch and sequence length.
        device: where the blocks run.
        backend_names: the ``backend`` of every block's attention.
    """
    check_mask(kind, prefix_len, B)
    cuda = device.type == "cuda"
    auto = "auto" in backend_names
    flex = "flex" in backend_names or (auto and cuda and kind == "prefix" and not HAS_TRITON)
    sdpa = "sdpa" in backend_names or (auto and not cuda)
    return Mask(
        kind,
        prefix_len,
        block_mask=backends.block_mask(kind, prefix_len, B, T, device) if flex else None,
        dense=dense_mask(kind, prefix_len, T, device) if sdpa and kind == "prefix" else None,
    )


def _unpack(mask: str | Mask, prefix_len: Tensor | None) -> tuple[str, Tensor | None, Mask | None]:
    if isinstance(mask, Mask):
        return mask.kind, mask.prefix_len, mask
    return mask, prefix_len, None


def _call(
    name: str, q: Tensor, k: Tensor, v: Tensor, kind: str, prefix_len: Tensor | None, built: Mask | None
) -> Tensor:
    if built is not None and name in PREBUILT:  # the backends that take a mask built beforehand
        return PREBUILT[name](q, k, v, kind, prefix_len, built)
    return BACKENDS[name](q, k, v, kind, prefix_len)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: str | Mask = "full",
    prefix_len: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention with an AIMv2 mask.

    Args:
        q, k, v: [B, H, T, D].
        mask: "full", "causal" or "prefix" (bidirectional inside the first ``prefix_len[b]`` positions,
            causal after), or a ``Mask`` from ``prepare_mask`` (which carries its prefix lengths).
        prefix_len: int tensor [B], required for ``mask="prefix"``.
        backend: "auto" or a key of ``BACKENDS``.

    Returns:
        [B, H, T, D] in the dtype of ``q``.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, H, T, D] shape, got {q.shape}, {k.shape}, {v.shape}")
    kind, prefix_len, built = _unpack(mask, prefix_len)
    check_mask(kind, prefix_len, q.shape[0])
    name = _auto(q, kind) if backend == "auto" else backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; available: {available_backends()}")
    return _call(name, q, k, v, kind, prefix_len, built)


# Backends that take a mask built once per forward (``prepare_mask``) as a sixth argument.
PREBUILT: dict[str, Callable[..., Tensor]] = {"flex": backends.flex, "sdpa": backends.sdpa}

# Backends that read the packed projection themselves; the others get q, k, v views of it.
PACKED: dict[str, Callable[[Tensor, str, Tensor | None], Tensor]] = {"triton": backends.triton_qkv}


def attention_qkv(
    qkv: Tensor,
    *,
    mask: str | Mask = "full",
    prefix_len: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """``attention`` on the fused q/k/v projection, in the layout a transformer block has it.

    The Triton backend reads q, k and v by strides from ``qkv``, writes its output as [B, T, H, D] and its
    backward writes one [B, T, 3, H, D] gradient: no permute, clone or stack on either side. Other backends get
    [B, H, T, D] views and their output transposed back (the copies they need stay theirs).

    Args:
        qkv: [B, T, 3, H, D], e.g. ``linear(x).view(B, T, 3, H, D)`` (timm's layout: q, k, v, then heads).
        mask, prefix_len, backend: as for ``attention``.

    Returns:
        [B, T, H, D] in the dtype of ``qkv`` (contiguous from the Triton backend, so ``.reshape(B, T, H * D)`` is
        a view).
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be [B, T, 3, H, D], got {tuple(qkv.shape)}")
    kind, plen, _ = _unpack(mask, prefix_len)
    check_mask(kind, plen, qkv.shape[0])
    name = _auto(qkv, kind) if backend == "auto" else backend
    if name in PACKED:
        return PACKED[name](qkv, kind, plen)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, T, 3, H, D] -> 3 x [B, H, T, D] views
    y = attention(q, k, v, mask=mask, prefix_len=prefix_len, backend=name)  # [B, H, T, D]
    return y.transpose(1, 2)  # [B, T, H, D]


__all__ = [
    "BACKENDS",
    "MASKS",
    "Mask",
    "attention",
    "attention_qkv",
    "available_backends",
    "dense_mask",
    "prepare_mask",
]
