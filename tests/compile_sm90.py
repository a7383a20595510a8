"""Compiles the attention kernels for an H100 (sm_90) without a GPU, through the real Triton compiler and ptxas.

Run by tests/test_triton_attention.py in a fresh process: the interpreter mode the other tests use is process-wide
in Triton (its own standard library is decorated by it). Prints one line per kernel: name, config and shared memory
bytes. With ``--trace`` it then traces attention forward and backward under ``torch.compile`` the way a GPU run
would (Triton's analysis of what each kernel writes generates sm_90 IR; nothing runs) and prints one line per
graph: the user Triton kernels in it with the arguments they write, then the other ops.
Usage: python tests/compile_sm90.py DTYPE HEAD_DIM [--all] [--trace] (all autotuner candidates with --all, else
the first: the fixed tiles).
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from aimpre.kernels import triton_attention as ta

TARGET = GPUTarget("cuda", 90, 32)


def compile_all(dtype: str, head_dim: int, every_config: bool) -> None:
    kinds = {"LSE": "*fp32", "DELTA": "*fp32", "PREFIX": "*i64", "VISITS": "*i32", "sm_scale": "fp32"}
    kinds |= {t: f"*{dtype}" for t in ("Q", "K", "V", "OUT", "DO", "G")}  # other arguments: i32
    kernels = (("fwd", ta._attn_fwd, ta._FWD_CONFIGS), ("dkdv", ta._attn_bwd_dkdv, ta._DKDV_CONFIGS),
               ("dq", ta._attn_bwd_dq, ta._DQ_CONFIGS))  # fmt: skip
    for name, kernel, configs in kernels:
        for cfg in configs if every_config else configs[:1]:
            consts = dict(HAS_PREFIX=True, COUNT=False, IEEE=dtype == "fp32", HEAD_DIM=head_dim, **cfg.kwargs)
            signature = {a: "constexpr" if a in consts else kinds.get(a, "i32") for a in kernel.arg_names}
            compiled = triton.compile(
                ASTSource(kernel, signature, consts),
                target=TARGET,
                options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
            )
            print(name, cfg.kwargs, cfg.num_warps, cfg.num_stages, compiled.metadata.shared, flush=True)


class _TargetOnly:
    """Stands in for Triton's (absent) CUDA driver: torch asks it only which target to generate IR for."""

    def get_current_target(self) -> GPUTarget:
        return TARGET


def trace(head_dim: int) -> None:
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    from aimpre.kernels import attention, attention_qkv

    triton.runtime.driver.set_active(_TargetOnly())
    ta._check_common = lambda *args: None  # CPU tensors stand for CUDA ones: they are only traced
    graphs: list[tuple[str, torch.fx.GraphModule]] = []

    def record(kind: str):  # a compiler that keeps the graph and returns outputs of the right shapes, unrun
        def compiler(gm: torch.fx.GraphModule, _inputs: list) -> object:
            graphs.append((kind, gm))
            outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
            vals = [o.meta["val"] if isinstance(o, torch.fx.Node) else None for o in outs]

            def run(*_args: object) -> list:
                return [None if v is None else torch.empty_strided(v.shape, v.stride(), dtype=v.dtype) for v in vals]

            return run

        return compiler

    backend = aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw"))
    B, T, H, D = 2, 21, 2, head_dim
    P = torch.tensor([3, 20])
    cases = [  # (name, AIMPRE_TRITON_AUTOTUNE, function, inputs)
        ("qkv", "1", lambda x: attention_qkv(x, mask="prefix", prefix_len=P, backend="triton"), [(B, T, 3, H, D)]),
        ("bhtd", "0", lambda q, k, v: attention(q, k, v, mask="causal", backend="triton"), [(B, H, T, D)] * 3),
    ]
    for name, autotune, fn, shapes in cases:
        os.environ[ta.AUTOTUNE_ENV] = autotune
        graphs.clear()
        torch._dynamo.reset()
        inputs = [torch.randn(s, requires_grad=True) for s in shapes]
        torch.compile(fn, backend=backend, fullgraph=True)(*inputs).sum().backward()
        for kind, gm in graphs:
            kernels, ops = [], []
            for n in gm.graph.nodes:
                if n.op != "call_function":
                    continue
                if "triton_kernel_wrapper" in str(n.target):
                    kernel = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
                    fn_name = (kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel).__name__
                    kernels.append(f"{fn_name}:{'+'.join(sorted(n.kwargs.get('tensors_to_clone', [])))}")
                elif isinstance(n.target, torch._ops.OpOverload):
                    ops.append(n.target.__name__)
            print("graph", name, kind, " ".join(kernels), "|", " ".join(ops), flush=True)


if __name__ == "__main__":
    compile_all(sys.argv[1], int(sys.argv[2]), "--all" in sys.argv)
    if "--trace" in sys.argv:
        trace(int(sys.argv[2]))
