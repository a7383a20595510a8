"""Compiles the attention kernels for an H100 (sm_90) without a GPU, through the real Triton compiler and ptxas.

Run by tests/test_triton_attention.py in a fresh process: the interpreter mode the other tests use is process-wide
in Triton (its own standard library is decorated by it). Prints one line per kernel: name and shared memory bytes.
Usage: python tests/compile_sm90.py DTYPE HEAD_DIM (all autotuner candidates with --all, else the first).
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from aimpre.kernels import triton_attention as ta


def main(dtype: str, head_dim: int, every_config: bool) -> None:
    kinds = {"LSE": "*fp32", "DELTA": "*fp32", "PREFIX": "*i32", "VISITS": "*i32", "sm_scale": "fp32"}
    kinds |= {t: f"*{dtype}" for t in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV")}  # other arguments: i32
    kernels = (("fwd", ta._attn_fwd, ta._FWD_CONFIGS), ("dkdv", ta._attn_bwd_dkdv, ta._DKDV_CONFIGS),
               ("dq", ta._attn_bwd_dq, ta._DQ_CONFIGS))  # fmt: skip
    for name, kernel, configs in kernels:
        for cfg in configs if every_config else configs[:1]:
            consts = dict(HAS_PREFIX=True, COUNT=False, IEEE=dtype == "fp32", HEAD_DIM=head_dim, **cfg.kwargs)
            signature = {a: "constexpr" if a in consts else kinds.get(a, "i32") for a in kernel.arg_names}
            compiled = triton.compile(
                ASTSource(kernel, signature, consts),
                target=GPUTarget("cuda", 90, 32),
                options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
            )
            print(name, cfg.kwargs, cfg.num_warps, cfg.num_stages, compiled.metadata.shared, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), "--all" in sys.argv)
