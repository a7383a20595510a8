"""Attention kernels behind one function, ``attention(q, k, v, *, mask, prefix_len, backend)``.

Model code calls only this function, or its packed twin ``attention_qkv(qkv, ...)`` that takes the fused q/k/v
projection as it comes out of the linear layer, and never branches on the backend. Backends:
``reference`` (eager math, the test oracle), ``sdpa`` (torch SDPA, explicit mask for prefix), ``flex``
(torch FlexAttention), ``triton`` (our flash attention, ``triton_attention.py``; CUDA, or CPU under
``TRITON_INTERPRET=1``) and ``xformers`` (when installed; CUDA). ``auto`` picks one for the device.
"""

from __future__ import annotations

if __name__ == "kernels":
    # Python found this directory as the top-level `kernels` because the checkout root is on sys.path (the working
    # directory of `python -c`, a notebook or a script there), ahead of Hugging Face's `kernels` distribution,
    # which transformers >= 5 imports. This package is only ever `aimpre.kernels` (package-dir), so hand the name
    # over: import `kernels` again with the checkout off the path; the import system then returns what
    # sys.modules holds, the installed distribution. Nothing of ours runs under that name (the package's code is
    # in dispatch.py, imported below only as aimpre.kernels), so this works even where aimpre is not importable.
    import os
    import sys

    _checkout = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
    _path = sys.path[:]
    del sys.modules["kernels"]
    sys.path[:] = [p for p in _path if not isinstance(p, str) or os.path.realpath(p or os.curdir) != _checkout]
    try:
        import kernels  # noqa: F401 (the installed distribution, which the outer import then returns)
    except ModuleNotFoundError as e:
        if e.name != "kernels":
            raise
        raise ModuleNotFoundError(
            f"{_checkout}/kernels is aimpre's kernel package, imported as `aimpre.kernels`; it was found as the "
            f"top-level `kernels` because {_checkout} is on sys.path (the working directory), and no other "
            "`kernels` is installed (Hugging Face's kernel hub, a dependency of transformers >= 5)",
            name="kernels",
        ) from None
    finally:
        sys.path[:] = _path
else:
    from aimpre.kernels.dispatch import (
        BACKENDS,
        HAS_TRITON,
        PACKED,
        Backend,
        Mask,
        attention,
        attention_qkv,
        available_backends,
        prepare_mask,
    )
    from aimpre.kernels.masks import MASKS, dense_mask

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "MASKS",
    "PACKED",
    "Backend",
    "Mask",
    "attention",
    "attention_qkv",
    "available_backends",
    "dense_mask",
    "prepare_mask",
]
