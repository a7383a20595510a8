"""`aimpre bench step`: the CPU smoke run of its builds end to end, its verdicts on constructed rows, and an
fp8 row that says why it has no numbers instead of failing the bench."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from aimpre.bench.step import BUILDS, StepRow, StepSettings, families_table, kernel_family, run_step, step_targets
from aimpre.cli import BENCH_BUILDS, FP8_RECIPES, build_parser
from aimpre.config import FP8_RECIPES as CONFIG_RECIPES

SMALL = {"img_size": 28, "depth": 1, "dec_depth": 1, "text_len": 8}  # the tiny model, shrunk for the smoke run


def _rows(report: str) -> dict[str, list[str]]:
    """Table rows by build label: the cells of each."""
    lines = [line for line in report.splitlines() if line.startswith(("| plain", "| ours"))]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_bench_step_quick_measures_plain_bf16_and_fp8(tmp_path: Path) -> None:
    out = tmp_path / "step.md"
    report = run_step(StepSettings(steps=1, warmup=1, quick=True, model=SMALL), out=str(out))
    assert out.read_text() == report
    assert "NO GPU" in report and "say nothing about GPU speed" in report
    rows = _rows(report)
    fp8 = "ours fp8 (sdpa, eager, float8 linears)"
    moe = "ours bf16 MoE (sdpa, eager, 4 experts top-1)"
    assert list(rows) == ["plain (eager, SDPA)", "ours bf16 (sdpa, eager)", fp8, moe]
    for cells in rows.values():
        assert float(cells[0]) > 0 and float(cells[1]) > 0  # ms/step, img/s
    assert rows[fp8][-1] == "10 block linears in float8 (tensorwise), 0 left in bf16"
    assert "judged on a GPU only" in report


def test_bench_step_quick_runs_the_moe_build() -> None:
    """The MoE build (issue 21): the bf16 build with 4 experts top-1 in every encoder block, timed beside it; its
    TFLOP/s count the routed tokens' FLOPs, the dense build's FLOPs plus the router's."""
    from aimpre.model.moe import grouped_mm_available

    rows = _rows(run_step(StepSettings(steps=1, warmup=0, quick=True, model=SMALL), builds=("bf16", "moe")))
    moe = rows["ours bf16 MoE (sdpa, eager, 4 experts top-1)"]
    assert float(moe[0]) > 0 and float(moe[1]) > 0  # ms/step, img/s
    how = "grouped GEMM" if grouped_mm_available(torch.zeros(1)) else "loop"
    assert moe[-1].startswith(f"experts by {how}")


def test_bench_step_fp8_row_says_torchao_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "torchao", None)
    rows = _rows(run_step(StepSettings(steps=1, warmup=0, quick=True, model=SMALL), builds=("bf16", "fp8")))
    assert float(rows["ours bf16 (sdpa, eager)"][1]) > 0
    fp8 = rows["ours fp8 (sdpa, eager, float8 linears)"]
    assert fp8[:5] == ["-"] * 5 and fp8[-1] == "fp8 needs torchao, which is not installed: pip install 'aimpre[fp8]'"


def test_step_targets_judge_speed_ups_and_memory() -> None:
    rows = [
        StepRow("plain", "plain", img_per_s=500.0, peak_gib=56.7),
        StepRow("bf16", "ours bf16", img_per_s=574.0, peak_gib=50.0),  # 1.148x: just short of 1.15x
        StepRow("fp8", "ours fp8", img_per_s=650.0, peak_gib=57.0),  # 1.30x, but more memory
    ]
    assert step_targets(rows) == [
        "- ours bf16 >= 1.15x plain: 1.15x (574.0 vs 500.0 img/s): NOT met",
        "- ours fp8 >= 1.30x plain: 1.30x (650.0 vs 500.0 img/s): met",
        "- peak memory of ours bf16 <= plain's: 50.0 GiB vs 56.7 GiB: met",
        "- peak memory of ours fp8 <= plain's: 57.0 GiB vs 56.7 GiB: NOT met",
    ]
    rows[2] = StepRow("fp8", "ours fp8", note="torchao not installed")
    assert step_targets(rows)[1] == "- ours fp8 >= 1.30x plain: not measured (fp8 has no time)"
    assert step_targets(rows[1:2]) == ["- ours bf16 >= 1.15x plain: not measured (plain has no time)",
                                       "- peak memory of ours bf16 <= plain's: not measured"]  # fmt: skip


def test_cli_builds_and_recipes() -> None:
    assert BENCH_BUILDS == BUILDS and FP8_RECIPES == CONFIG_RECIPES  # the CLI's copies, kept free of torch imports
    args = build_parser().parse_args(["bench", "step", "--builds", "plain,fp8", "--recipe", "rowwise"])
    assert args.builds == ["plain", "fp8"] and args.recipe == "rowwise"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "step", "--builds", "plain,fp16"])


def test_kernels_are_sorted_into_families() -> None:
    # Names as the CUDA profiler reports them, and where each comes from (issue 22: Inductor's fused RMSNorm was
    # booked as liger-kernel's).
    inductor, ours, liger = (
        "Inductor-generated (torch.compile; Flex's compiled kernel)",
        "ours (Triton attention)",
        "liger-kernel",
    )
    vendor, aten = "cuBLAS, cuDNN, flash (vendor libraries)", "PyTorch native (aten)"
    named = {
        # our Triton kernels (kernels/triton_attention.py: the @triton.jit function names)
        "_attn_fwd": ours,
        "_attn_bwd_dkdv": ours,
        "_attn_bwd_dq": ours,
        # Inductor's generated kernels (triton_{poi,red,per,tem}_fused_<ops>_<n>, torch/_inductor/codegen naming),
        # RMSNorm fused by Inductor among them, and the compiled Flex template
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": inductor,
        "triton_per_fused__fused_rms_norm_backward_3": inductor,
        "triton_poi_fused_mul_silu_1": inductor,
        "triton_tem_fused_flex_attention_0": inductor,
        # liger-kernel's Triton kernels (liger_kernel/ops/rms_norm.py, fused_add_rms_norm.py, swiglu.py,
        # cross_entropy.py, utils.py)
        "_rms_norm_forward_kernel": liger,
        "_rms_norm_backward_kernel": liger,
        "_fused_add_rms_norm_forward_kernel": liger,
        "_swiglu_backward_kernel": liger,
        "liger_cross_entropy_kernel": liger,
        "element_mul_kernel": liger,
        # cuBLAS (nvjet, sm90_xmma), CUTLASS, cuDNN's SDPA, FlashAttention in aten (pytorch_flash), mem-efficient
        "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN": vendor,
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": vendor,
        "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn": vendor,
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0": vendor,
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>": vendor,
        "fmha_cutlassF_bf16_aligned_64x128_rf_sm80": vendor,
        # NCCL's collectives (DDP's gradient all-reduce, FSDP's all-gather)
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "NCCL",
        "ncclKernel_AllGather_RING_LL_Sum_int8_t": "NCCL",
        # PyTorch's own CUDA kernels: fused AdamW, element-wise, copies
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": aten,
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": aten,
        "Memcpy DtoD (Device -> Device)": "memcpy, memset",
        "Memset (Device)": "memcpy, memset",
        "some_custom_kernel": "other",
    }
    assert {name: kernel_family(name) for name in named} == named
    rows = [
        StepRow("plain", "p", families={"GEMM": 150.0, "other": 5.0}),
        StepRow("bf16", "b", families={"GEMM": 140.0}),
    ]
    table = families_table(rows)
    assert (
        "| GEMM | 150.0 | 140.0 |" in table
        and "| other | 5.0 | 0.0 |" in table
        and "| total | 155.0 | 140.0 |" in table
    )
