"""``aimpre bench step``: the speed of one AIMv2 training step, four builds in one run.

Step builds, each a fresh model from the same seed, fed the same batch, with fused AdamW and bf16 autocast:

- plain: the model compiled whole with ``torch.compile``, FlexAttention for the encoder's prefix mask and SDPA
  (flash, ``is_causal``) for the decoder's causal mask, set per block (``attn_backend=auto`` would pick our Triton
  kernel on a GPU), and torch's own norms, SwiGLU and cross-entropy (``model.fused=torch``);
- ours bf16: ``attn_backend`` (default ``triton``) with per-block compile, through ``parallelize`` as
  ``aimpre train`` runs it, with the model's other defaults;
- ours fp8: the same plus ``trainer.precision=fp8``'s conversion of the blocks' linears to float8, through the same
  ``parallelize(fp8=...)`` call the trainer makes;
- ours bf16 MoE: the bf16 build with every encoder feed-forward a mixture of 4 SwiGLU experts, top-1 (AIMv2-MoE,
  ml-l3m ``configs/aimv2/002_aimv2_moe_hfdata.yaml``), each expert as wide as the dense one: the same active
  parameters and FLOPs per token plus the router, so its speed beside bf16 is the price of routing and grouped GEMMs.

For each: ms/step and images/s (CUDA events over ``steps`` steps after ``warmup``, which holds the compilation),
achieved TFLOP/s from ``aimpre.scaling.flops_per_sample``, MFU against the dense bf16 peak (for the fp8 build too:
the same yardstick, so MFU compares builds), peak memory (``torch.cuda.max_memory_allocated``, reset per build),
and the speed-up over plain; then the targets of issue 11: bf16 >= 1.15x plain, fp8 >= 1.3x plain, neither using
more memory than plain.

Each compiled build runs in a new Python process with empty Inductor and Triton cache folders (``_fresh_build``),
so none starts with the graphs, kernels, autotuning choices or dynamic-shape decisions of the one before it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aimpre.bench.timing import RowsSoFar, back_to_back_ms, cell, device_line, free_memory, versions
from aimpre.files import write_text
from aimpre.model import AIMv2, model_config
from aimpre.model.layers import Attention
from aimpre.model.moe import grouped_mm_available
from aimpre.scaling import flops_per_sample
from aimpre.train.callbacks import peak_flops
from aimpre.train.parallel import fp8_linears, fp8_problem, parallelize

BUILDS = ("plain", "bf16", "fp8", "moe")
MOE_BUILD = {"moe_experts": 4, "moe_top_k": 1}  # the moe build: ml-l3m's AIMv2-MoE routing
STEP_TARGETS = {"bf16": 1.15, "fp8": 1.3}  # images/s over plain's


# ---------------------------------------------------------------------------------------------- bench step


@dataclass
class StepRow:
    """One build's measurement; ``note`` says why numbers are missing, or what was converted."""

    build: str  # plain | bf16 | fp8
    label: str
    step_ms: float | None = None
    img_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None  # None off CUDA
    note: str = ""
    families: dict[str, float] = field(default_factory=dict)  # GPU ms per step by kernel family (CUDA only)
    start: dict[str, Any] = field(default_factory=dict)  # compiler_state() when the build began


# Kernel families of a step's GPU time by where the kernel comes from, by its name, first match wins. Inductor's
# generated kernels come first: they are named triton_{poi,red,per,tem,...}_fused_<ops> and the ops may read like
# another library's kernel (triton_red_fused__fused_rms_norm_0 is Inductor's RMSNorm, not liger's).
FAMILIES = (
    ("Inductor-generated (torch.compile; Flex's compiled kernel)",
     re.compile(r"^triton_(poi|red|per|tem|for|mm|bmm|spl)_")),
    ("ours (Triton attention)", re.compile(r"^_attn_(fwd|bwd)")),
    ("liger-kernel", re.compile(r"^_(fused_add_rms_norm|rms_norm|swiglu|layer_norm|geglu)_\w*kernel$|^liger_|"
                                r"^element_mul_kernel$")),
    ("NCCL", re.compile(r"nccl", re.I)),
    ("cuBLAS, cuDNN, flash (vendor libraries)",
     re.compile(r"nvjet|gemm|cutlass|xmma|cublas|cudnn|flash|fmha|wgmma|scaled_mm", re.I)),
    ("memcpy, memset", re.compile(r"^Mem(cpy|set)")),
    ("PyTorch native (aten)", re.compile(r"at::native::|at::cuda::|\bat::")),
)  # fmt: skip


def kernel_family(name: str) -> str:
    """The family of a CUDA kernel by its name (``FAMILIES``), else "other"."""
    return next((family for family, pattern in FAMILIES if pattern.search(name)), "other")


def gpu_families(step: Callable[[], None], steps: int = 3) -> dict[str, float]:
    """GPU ms per step by kernel family over ``steps`` profiled steps (torch.profiler, CUDA activity)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            family = kernel_family(e.name)
            out[family] = out.get(family, 0.0) + e.time_range.elapsed_us() / 1e3 / steps
    return out


def families_table(rows: list[StepRow]) -> str:
    """GPU ms per step by kernel family, one column per build that has a profile, families by the first build's
    time."""
    rows = [r for r in rows if r.families]
    if not rows:
        return "GPU time by kernel family: CUDA only"
    names = sorted({f for r in rows for f in r.families}, key=lambda f: -rows[0].families.get(f, 0.0))
    lines = ["| kernel family | " + " | ".join(f"{r.build} ms/step" for r in rows) + " |",
             "|---|" + "---:|" * len(rows)]  # fmt: skip
    for f in [*names, "total"]:
        cells = [sum(r.families.values()) if f == "total" else r.families.get(f, 0.0) for r in rows]
        lines.append(f"| {f} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def plain_attention(net: AIMv2, compile: bool) -> None:
    """The plain build's attention: PyTorch's own, Flex for the encoder's prefix mask and SDPA's flash for the
    decoder's causal one (on CPU without compile, the quick smoke run, SDPA for both: eager Flex has no CPU
    backward)."""
    for part, backend_name in ((net.encoder, "flex" if compile else "sdpa"), (net.decoder, "sdpa")):
        for attn in (m for m in part.modules() if isinstance(m, Attention)):
            attn.backend = backend_name


def _step_fn(model: nn.Module, opt: torch.optim.Optimizer, data: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    def step() -> None:
        with torch.autocast(data["images"].device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(data["images"], data["text"], data["mask"], data["prefix"])
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _time(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step: ``warmup`` untimed steps, then ``steps`` back to back."""
    for _ in range(warmup):
        step()
    return back_to_back_ms(step, steps, device) / 1e3


def _label(build: str, backend: str, compile: bool) -> str:
    how = "compiled blocks" if compile else "eager"
    return {
        "plain": "plain (torch.compile, Flex + SDPA)" if compile else "plain (eager, SDPA)",
        "bf16": f"ours bf16 ({backend}, {how})",
        "fp8": f"ours fp8 ({backend}, {how}, float8 linears)",
        "moe": f"ours bf16 MoE ({backend}, {how}, {MOE_BUILD['moe_experts']} experts top-{MOE_BUILD['moe_top_k']})",
    }[build]


@dataclass(frozen=True)
class StepSettings:
    """What one ``bench step`` build is run with (the same for every build of a run); crosses to the build's own
    process as JSON.

    Args:
        size: a model size.
        batch: images per step (one device).
        steps, warmup: timed and untimed steps (the warm-up holds compilation and autotuning).
        backend: our attention backend.
        quick: a CPU smoke run (no compile; float32, the fp8 build in bf16 autocast as the trainer runs it).
        recipe: the fp8 build's float8 recipe (``trainer.fp8_recipe``).
        model: ModelConfig overrides of the size (tests shrink the tiny model further).
    """

    size: str = "large"
    batch: int = 128
    steps: int = 10
    warmup: int = 3
    backend: str = "triton"
    quick: bool = False
    recipe: str = "tensorwise"
    model: dict[str, Any] | None = None


def compiler_state() -> dict[str, Any]:
    """What this process's compiler has seen so far: Dynamo's graph count and where Inductor and Triton keep their
    on-disk caches (a build that starts with graphs already compiled, or with a cache another build filled, is not
    measured from a clean start)."""
    from torch._dynamo.utils import counters
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return {
        "pid": os.getpid(),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "inductor_cache": cache_dir(),
        "triton_cache": os.environ.get("TRITON_CACHE_DIR", ""),
    }


def _measure_build(build: str, s: StepSettings) -> StepRow:
    """Builds, times and (on CUDA) profiles one build in this process; a failure becomes the row's note."""
    device = torch.device("cuda" if torch.cuda.is_available() and not s.quick else "cpu")
    compile = not s.quick
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as aimpre train
    row = StepRow(build, _label(build, s.backend, compile), start=compiler_state())
    free_memory(device)
    try:
        moe = MOE_BUILD if build == "moe" else {}
        cfg = model_config(
            s.size, **{"vocab_size": 258 if s.quick else 32000, **(s.model or {}), **moe, "attn_backend": s.backend}
        )
        if build == "plain":  # plain ops (model.fused=auto would take liger's loss on CUDA)
            cfg = replace(cfg, fused="torch")
        torch.manual_seed(0)
        with torch.device(device):
            net = AIMv2(cfg)
        if build == "plain":
            plain_attention(net, compile)
        run_model: nn.Module = net
        if build == "plain":
            run_model = torch.compile(net) if compile else net  # type: ignore[assignment]
        else:  # the trainer's own call (AIMv2Module.configure_model)
            parallelize(net, fp8=s.recipe if build == "fp8" else None, compile=compile)
        if build == "moe":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            how = "grouped GEMM" if grouped_mm_available(torch.empty(0, device=device, dtype=dtype)) else "loop"
            row.note = f"experts by {how} (torch._grouped_mm or a sorted-token loop); FLOPs of the routed tokens"
        if build == "fp8":
            converted, left = fp8_linears(net)
            row.note = f"{len(converted)} block linears in float8 ({s.recipe}), {len(left)} left in bf16"
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
        g = torch.Generator(device="cpu").manual_seed(0)
        batch = s.batch
        data = {
            "images": torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g).to(device),
            "text": torch.randint(2, cfg.vocab_size or 258, (batch, cfg.text_len), generator=g).to(device),
            "prefix": torch.randint(1, cfg.num_patches, (batch,), generator=g).to(device),
        }
        data["mask"] = torch.ones_like(data["text"], dtype=torch.bool)
        dtype = torch.bfloat16 if device.type == "cuda" or build == "fp8" else torch.float32
        step = _step_fn(run_model, opt, data, dtype)
        seconds = _time(step, device, s.warmup, s.steps)
        if device.type == "cuda":  # where the time goes: 3 more steps under the profiler
            row.families = gpu_families(step)
    except Exception as e:  # a bench reports a broken build and measures the others
        row.note = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"bench step: {row.label} failed: {e!r}", file=sys.stderr)
        return row
    finally:
        net = run_model = opt = step = None  # type: ignore[assignment]  # (step holds model and optimizer)
    row.step_ms = seconds * 1e3
    row.img_per_s = batch / seconds
    achieved = row.img_per_s * flops_per_sample(cfg)
    row.tflops = achieved / 1e12
    peak = peak_flops(device)  # bf16 for every build
    row.mfu = achieved / peak if peak else None
    if device.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    free_memory(device)
    return row


def _python() -> list[str]:
    # -P (set when this process runs under it): a checkout's own aimpre/ must not shadow a link view on PYTHONPATH
    return [sys.executable, *(["-P"] if getattr(sys.flags, "safe_path", False) else [])]


def _fresh_build(build: str, s: StepSettings) -> StepRow:
    """``_measure_build`` in a new Python process with empty Inductor and Triton cache folders of its own: no build
    starts with what an earlier one compiled, autotuned or decided about dynamic shapes (in memory or on disk)."""
    with tempfile.TemporaryDirectory(prefix=f"aimpre-bench-{build}-") as tmp:
        out = Path(tmp) / "row.json"
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor", "TRITON_CACHE_DIR": f"{tmp}/triton"}
        argv = [*_python(), "-m", "aimpre.bench.step", build, json.dumps(dataclasses.asdict(s)), str(out)]
        code = subprocess.run(argv, env=env).returncode  # its stderr is ours: a crash shows its traceback
        if code == 0 and out.exists():
            return StepRow(**json.loads(out.read_text()))
    return StepRow(build, _label(build, s.backend, not s.quick), note=f"failed: its process exited with code {code}")


def bench_step(
    s: StepSettings,
    builds: tuple[str, ...] = BUILDS,
    on_row: Callable[[list[StepRow]], None] | None = None,
    fresh: bool | None = None,
) -> list[StepRow]:
    """Times each build on one device, each in its own process (``fresh``); a build that cannot run (fp8 without
    torchao or float8 tensor cores) or fails gets a row with a note instead of numbers.

    Args:
        s: what every build runs with (``StepSettings``).
        builds: which of ``BUILDS`` to run, in that order.
        on_row: called with the rows so far as soon as each build is measured (or has failed), so a bench killed by
            a timeout has reported what it measured.
        fresh: each build in a new process with empty compiler caches (``_fresh_build``); False runs them all in
            this one, sharing its compiler state; None (default): fresh unless ``quick``, which compiles nothing.
    """
    fresh = not s.quick if fresh is None else fresh
    device = torch.device("cuda" if torch.cuda.is_available() and not s.quick else "cpu")
    rows = []
    for build in (b for b in BUILDS if b in builds):
        problem = fp8_problem(device) if build == "fp8" else None
        if problem:
            row = StepRow(build, _label(build, s.backend, not s.quick), note=problem.removeprefix(
                "config key 'trainer.precision': "))  # fmt: skip
        else:
            row = _fresh_build(build, s) if fresh else _measure_build(build, s)
        rows.append(row)
        if on_row:
            on_row(rows)
    return rows


def _measured(row: StepRow | None) -> bool:
    return row is not None and row.img_per_s is not None


def step_targets(rows: list[StepRow]) -> list[str]:
    """The verdict lines: speed-ups over plain against ``STEP_TARGETS`` and peak memory against plain's."""
    by = {r.build: r for r in rows}
    plain = by.get("plain")
    out = []
    for build, need in STEP_TARGETS.items():
        if build not in by:
            continue
        r, what = by[build], f"ours {build} >= {need:.2f}x plain"
        if not (_measured(r) and _measured(plain)):
            out.append(f"- {what}: not measured ({'plain' if not _measured(plain) else build} has no time)")
            continue
        assert r.img_per_s is not None and plain is not None and plain.img_per_s is not None
        x = r.img_per_s / plain.img_per_s
        verdict = "met" if x >= need else "NOT met"
        out.append(f"- {what}: {x:.2f}x ({r.img_per_s:.1f} vs {plain.img_per_s:.1f} img/s): {verdict}")
    for build in STEP_TARGETS:
        if build not in by:
            continue
        r, what = by[build], f"peak memory of ours {build} <= plain's"
        if r.peak_gib is None or plain is None or plain.peak_gib is None:
            out.append(f"- {what}: not measured")
            continue
        verdict = "met" if r.peak_gib <= plain.peak_gib else "NOT met"
        out.append(f"- {what}: {r.peak_gib:.1f} GiB vs {plain.peak_gib:.1f} GiB: {verdict}")
    return out


def step_table(rows: list[StepRow]) -> str:
    by = {r.build: r for r in rows}
    plain = by.get("plain")
    lines = [
        "| build | ms/step | img/s | TFLOP/s | MFU (bf16 peak) | peak memory GiB | vs plain | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        vs = "-"
        if _measured(r) and _measured(plain):
            assert r.img_per_s is not None and plain is not None and plain.img_per_s is not None
            vs = f"{r.img_per_s / plain.img_per_s:.2f}x"
        lines.append(f"| {r.label} | {cell(r.step_ms, '.1f')} | {cell(r.img_per_s, '.1f')} | "
                     f"{cell(r.tflops, '.1f')} | {cell(r.mfu, '.1%')} | {cell(r.peak_gib, '.1f')} | {vs} | "
                     f"{r.note.replace('|', '/')} |")  # fmt: skip
    return "\n".join(lines)


def run_step(s: StepSettings, builds: tuple[str, ...] = BUILDS, out: str | None = None) -> str:
    """Measures, prints and returns the markdown report; ``out`` also writes it (atomically). Without a GPU (or
    with ``quick``) it is a smoke run of the tiny model, batch 4, on CPU, with the sdpa backend where ``triton``
    was asked (the Triton kernel needs CUDA outside the test interpreter).

    Args:
        s: what every build runs with (``StepSettings``).
        builds: which of ``BUILDS`` to run, in that order.
        out: a markdown file for the report, rewritten as each build is measured (the table so far), with its rows
            also in ``out`` with the suffix ``.jsonl``, one JSON object a row.
    """
    cuda = torch.cuda.is_available() and not s.quick
    if not cuda:
        s = replace(s, size="tiny", batch=4, quick=True, backend="sdpa" if s.backend == "triton" else s.backend)
    size, batch, steps, warmup = s.size, s.batch, s.steps, s.warmup
    device = torch.device("cuda" if cuda else "cpu")

    so_far = RowsSoFar(out, "training step benchmark")
    rows = bench_step(s, builds, lambda rows: so_far.add(rows[-1:], step_table(rows)))
    cfg = model_config(size, **(s.model or {}))
    peak = peak_flops(device)
    precision = "bf16 autocast" if cuda else "float32 (the fp8 build: bf16 autocast), no compile"
    head = [
        f"# training step benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "",
        device_line(device, "a smoke run of the tiny model: these times say nothing about GPU speed"),
        f"{versions('triton', 'torchao')}; AIMv2-{size}, {cfg.img_size} px, batch {batch}, {precision}, AdamW"
        f"{' (fused)' if cuda else ''}; {steps} timed steps after {warmup} warm-up (compilation happens in the "
        f"warm-up); MFU against the dense bf16 peak"
        f"{f' ({peak / 1e12:.0f} TFLOP/s)' if peak else ''} for every build, fp8 included.",
    ]
    targets = step_targets(rows) if cuda else ["- judged on a GPU only: this is a CPU smoke run"]
    report = "\n".join([*head, "", step_table(rows), "", "targets (issue 11, same run):", *targets, "",
                        "GPU time per step by kernel family (torch.profiler over 3 more steps; kernels named by "
                        "aimpre.bench.step.FAMILIES):", "", families_table(rows), ""])  # fmt: skip
    print(report)
    if out:
        write_text(out, report)
    return report


if __name__ == "__main__":  # one build of bench step in its own process (_fresh_build): BUILD SETTINGS_JSON OUT
    _row = _measure_build(sys.argv[1], StepSettings(**json.loads(sys.argv[2])))
    write_text(sys.argv[3], json.dumps(dataclasses.asdict(_row)))
