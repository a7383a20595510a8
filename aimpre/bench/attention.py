"""``aimpre bench attention``: our Triton kernel against its peers on the AIMv2 attention shapes, in one run.

Peers: FlexAttention with the same mask (on CUDA compiled afresh for every shape, see ``_flex``), SDPA with an
explicit boolean mask, SDPA without a mask or with ``is_causal`` (its flash kernel: the speed to match, though
unmasked it computes a different attention for the prefix shapes), and xformers when it imports and runs.

Each row times forward + backward three ways, because the host path around a kernel can cost more than the kernel
(issue 11 measured ~1 ms of Python per call of ours against ~0.5 ms of GPU work):

- GPU time: the summed duration of every kernel one fwd+bwd launches, from ``torch.profiler`` (CUDA activity),
  averaged over several calls: what the kernels cost, whatever the host does;
- back to back: N calls queued with no synchronisation between them, CUDA events around all of them, / N: what
  a training step sees when the host keeps ahead of the GPU;
- single call: synchronise, host clock around one call and a synchronise, median of N: latency with an idle GPU.

Plus the training forward alone (inputs that require grad, back to back; without grad on CPU), the forward error
against an fp32 eager reference and TFLOP/s on GPU time. Mask construction (boolean matrix, Flex block mask) is
done once, outside the timing, as a training step builds it once and shares it across blocks. The targets are
judged on GPU time and on back-to-back wall.

TFLOP/s counts only the (query, key) pairs the row's mask allows, 4 * D FLOPs per pair forward and 3x that for
forward + backward: the convention of ``aimpre.scaling.flops`` (FlashAttention's papers count 3.5x).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from aimpre.bench.timing import (
    RowsSoFar,
    back_to_back_ms,
    cell,
    device_line,
    gpu_time_ms,
    short_error,
    single_call_ms,
    versions,
)
from aimpre.files import write_text
from aimpre.kernels import attention, attention_qkv, backends, dense_mask


@dataclass(frozen=True)
class Case:
    """One attention shape: q, k, v are [B, H, T, D]; ``role`` names the target it is judged for, if any."""

    name: str
    B: int
    H: int
    T: int
    D: int
    mask: str
    role: str = ""


# AIMv2 at 224 px: 256 patches, 8 heads of 128 (L), 12 x 128 (H; 1B is 16 x 128); a 16 x 64 encoder for the other
# head dim; the decoder over 256 + 77 tokens; 448 px = 1024 patches, with the batch cut to keep 32k tokens.
CASES = (
    Case("encoder L", 128, 8, 256, 128, "prefix", role="encoder L"),
    Case("encoder H", 128, 12, 256, 128, "prefix"),
    Case("encoder 16x64", 128, 16, 256, 64, "prefix"),
    Case("decoder", 128, 8, 333, 128, "causal", role="decoder"),
    Case("encoder L 448px", 32, 8, 1024, 128, "prefix"),
)
# The quick (CPU) shapes stand in for the judged ones, so the verdicts are computed there too (meaningless on CPU).
QUICK_CASES = (
    Case("encoder (tiny)", 2, 1, 40, 64, "prefix", role="encoder L"),
    Case("decoder (tiny)", 2, 1, 45, 64, "causal", role="decoder"),
)
WARMUP = 3  # fwd+bwd calls before timing; the first compiles Flex and autotunes ours
PROFILE_CALLS = 5  # fwd+bwd calls under the profiler, averaged into the GPU time


@dataclass
class Row:
    case: Case
    impl: str
    fwd_ms: float | None = None  # training forward (inputs require grad), back to back
    gpu_ms: float | None = None  # fwd+bwd: summed kernel time (profiler), per call
    b2b_ms: float | None = None  # fwd+bwd: wall per call, calls queued back to back
    single_ms: float | None = None  # fwd+bwd: wall of one synchronised call, median
    pairs: int = 0  # allowed (query, key) pairs summed over batch and heads
    err: float | None = None  # max |out - fp32 reference with the row's own mask|
    note: str = ""

    def tflops(self) -> float | None:
        """Forward + backward TFLOP/s on GPU time."""
        return None if self.gpu_ms is None else 3 * 4 * self.case.D * self.pairs / (self.gpu_ms * 1e-3) / 1e12


Impl = Callable[[Tensor, Tensor, Tensor], Tensor]
PACKED = "triton packed qkv (ours, the model's call)"


def _flex(case: Case, P: Tensor, device: torch.device) -> tuple[Impl, str]:
    """FlexAttention for ``case``: compiled afresh on CUDA, eager on CPU; and its row label.

    Dynamo keeps at most ``recompile_limit`` compiled versions per code object and runs the function eagerly past
    it (issue 11: the 448 px row ran 33.9 ms that way once grad mode had changed between shapes). Resetting Dynamo
    and compiling a new function per shape keeps every shape on its own first compile; ``fullgraph=True`` turns
    a graph break or a hit limit into an error the row reports instead of a silent eager run. The bench uses its
    own compiled function, not ``backends``' shared one (which the reset leaves empty, to refill on its next call).
    """
    from torch.nn.attention.flex_attention import flex_attention

    p = P if case.mask == "prefix" else None
    block_mask = backends.block_mask(case.mask, p, case.B, case.T, device)
    if device.type != "cuda":
        return lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask), "flex (eager)"
    torch.compiler.reset()
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask), "flex (compiled)"


def _impls(case: Case, P: Tensor, device: torch.device) -> list[tuple[str, str, bool, Callable[..., Tensor]]]:
    """(label, the mask it computes, packed, function) for every implementation measured on ``case``: a function
    of q, k, v [B, H, T, D], or for packed rows of the fused projection's qkv [B, T, 3, H, D] (``attention_qkv``,
    the model's call), returning [B, H, T, D]."""
    m, p = case.mask, P if case.mask == "prefix" else None
    dense = dense_mask(m, p, case.T, device)
    flash_mask = "causal" if m == "causal" else "full"
    flex_fn, flex_label = _flex(case, P, device)
    return [
        ("triton (ours)", m, False, lambda q, k, v: attention(q, k, v, mask=m, prefix_len=p, backend="triton")),
        (PACKED, m, True,
         lambda qkv: attention_qkv(qkv, mask=m, prefix_len=p, backend="triton").transpose(1, 2)),
        (flex_label, m, False, flex_fn),
        ("sdpa + bool mask", m, False, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)),
        (f"sdpa {'is_causal' if m == 'causal' else 'no mask'} (flash)", flash_mask, False,
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=m == "causal")),
        ("xformers", m, False, lambda q, k, v: backends.xformers(q, k, v, m, p)),
    ]  # fmt: skip


def _pairs(mask: str, P: Tensor, case: Case, device: torch.device) -> int:
    allowed = dense_mask(mask, P if mask == "prefix" else None, case.T, device)  # [B or 1, 1, T, T] or None
    per_sample = case.T * case.T if allowed is None else int(allowed.sum()) / allowed.shape[0]
    return int(per_sample * case.B * case.H)


def _graphs() -> int:
    """Graphs Dynamo has compiled in this process (a counter that only grows)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _time_row(row: Row, fn: Callable[..., Tensor], packed: bool, mask: str, P: Tensor, q: Tensor, k: Tensor,
              v: Tensor, dout: Tensor, warmup: int, reps: int, device: torch.device) -> None:  # fmt: skip
    """Fills ``row``'s error and timings: ``fn`` computes ``mask`` (with prefix lengths ``P`` for "prefix") from
    q, k, v or, ``packed``, from them packed as the model's fused projection lays them out: [B, T, 3, H, D]."""
    cuda = device.type == "cuda"
    inputs = (torch.stack((q, k, v), 2).permute(0, 3, 2, 1, 4).contiguous(),) if packed else (q, k, v)
    leaves = tuple(x.detach().requires_grad_() for x in inputs)
    step = lambda: torch.autograd.grad(fn(*leaves), leaves, dout)  # grads returned, never accumulated
    graphs = _graphs()
    # The forward as training runs it (inputs that require grad) on CUDA; without grad on CPU, where eager Flex
    # refuses inputs that require grad. The first call compiles Flex and autotunes ours.
    fwd = (lambda: fn(*leaves)) if cuda else (lambda: fn(*inputs))
    with torch.set_grad_enabled(cuda):
        out = fwd().detach().float()
        with torch.no_grad():
            ref = backends.reference(q, k, v, mask, P if mask == "prefix" else None).float()
            row.err = (out - ref).abs().max().item()
        del out, ref
        row.fwd_ms = back_to_back_ms(fwd, reps, device)
    for _ in range(warmup):
        step()
    row.b2b_ms = back_to_back_ms(step, reps, device)
    row.single_ms = single_call_ms(step, reps, device)
    if cuda:
        row.gpu_ms = gpu_time_ms(step, PROFILE_CALLS)
    if row.impl == "flex (compiled)" and _graphs() == graphs:
        row.note = "ran eagerly: Dynamo compiled no graph for this shape"


def measure(case: Case, dtype: torch.dtype, device: torch.device, warmup: int, reps: int,
            on_row: Callable[[Row], None] | None = None) -> list[Row]:  # fmt: skip
    """Times every implementation on one shape; a failing one gets a row that says why. ``on_row`` is called with
    each row as soon as it is measured."""
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(case.B, case.H, case.T, case.D, device=device, dtype=dtype) for _ in range(4))
    P = torch.randint(1, case.T, (case.B,), device=device)  # AIMv2's prefix M ~ U{1..T-1}
    rows = []
    for label, mask, packed, fn in _impls(case, P, device):
        row = Row(case, label, pairs=_pairs(mask, P, case, device))
        try:
            _time_row(row, fn, packed, mask, P, q, k, v, dout, warmup, reps, device)
        except torch.cuda.OutOfMemoryError:
            row.note = "out of memory"
            torch.cuda.empty_cache()
        except Exception as e:  # a peer that cannot run here (xformers missing, Flex not compiling, ...) says why
            row.note = (
                "compile failed (would have run eagerly): " if label == "flex (compiled)" else ""
            ) + short_error(e)
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def table(rows: list[Row]) -> str:
    """The rows as one markdown table."""
    lines = [
        "| shape (B, H, T, D) | mask | implementation | fwd ms | fwd+bwd GPU ms | fwd+bwd wall back to back ms "
        "| fwd+bwd wall single call ms | fwd+bwd TFLOP/s (GPU time) | max abs err | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        c = r.case
        lines.append(
            f"| {c.name} ({c.B}, {c.H}, {c.T}, {c.D}) | {c.mask} | {r.impl} | {cell(r.fwd_ms, '.3f')} "
            f"| {cell(r.gpu_ms, '.3f')} | {cell(r.b2b_ms, '.3f')} | {cell(r.single_ms, '.3f')} "
            f"| {cell(r.tflops(), '.3g')} | {cell(r.err, '.1e')} | {r.note} |"
        )
    return "\n".join(lines)


LAUNCH_MS = 0.1  # issue 11: ours' back-to-back wall within 0.1 ms of its GPU time


def targets(rows: list[Row]) -> list[str]:
    """Issue 11's targets, judged on GPU time and on back-to-back wall, one line each, ending in met / NOT met."""

    def find(role: str, impl: str) -> Row | None:
        return next((r for r in rows if r.case.role == role and r.impl.startswith(impl)), None)

    out = []
    for role, peer, need, what in (
        ("encoder L", "flex", 1.3, "at least 1.3x faster than FlexAttention"),
        ("encoder L", "sdpa no mask", 1.0, "no slower than unmasked SDPA flash"),
        ("decoder", "sdpa is_causal", 1 / 1.05, "within 5% of SDPA is_causal"),
    ):
        ours, theirs = find(role, "triton"), find(role, peer)
        name = ours.case.name if ours else role
        for attr, how in (("gpu_ms", "GPU time"), ("b2b_ms", "back-to-back wall")):
            a, b = (getattr(r, attr) if r else None for r in (ours, theirs))
            if a is None or b is None:
                out.append(f"- {name} fwd+bwd {how}, {what}: not measured")
                continue
            verdict = "met" if b / a >= need else "NOT met"
            out.append(f"- {name} fwd+bwd {how}, {what}: ours {a:.3f} ms vs {b:.3f} ms = {b / a:.3g}x "
                       f"(needs >= {need:.2f}x): {verdict}")  # fmt: skip
    for role in ("encoder L", "decoder"):  # the launch path as the model calls it
        ours = find(role, PACKED)
        what = f"ours' back-to-back wall within {LAUNCH_MS} ms of its GPU time"
        if ours is None or ours.gpu_ms is None or ours.b2b_ms is None:
            out.append(f"- {ours.case.name if ours else role} launch, {what}: not measured")
            continue
        gap = ours.b2b_ms - ours.gpu_ms
        verdict = "met" if gap <= LAUNCH_MS else "NOT met"
        out.append(f"- {ours.case.name} launch, {what}: {ours.b2b_ms:.3f} - {ours.gpu_ms:.3f} = {gap:+.3f} ms: "
                   f"{verdict}")  # fmt: skip
    return out


def tiles_table() -> str:
    """The tiles our kernels ran with in this process (autotuned or fixed), one row per kernel and shape key."""
    try:
        from aimpre.kernels.triton_attention import chosen_tiles
    except ImportError:  # no triton: nothing ran
        return "(no Triton)"
    rows = chosen_tiles()
    lines = ["| kernel | how | mask | dtype | T | H | D | layout | BLOCK_M | BLOCK_N | warps | stages |",
             "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    keys = ("kernel", "how", "mask", "dtype", "T", "H", "D", "layout", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def run_attention(quick: bool = False, dtype: str = "bf16", reps: int = 20, out: str | None = None) -> str:
    """Measures, prints and returns the report (device, versions, table, targets); ``out`` also writes it.

    Args:
        quick: tiny shapes, one call per timing (a smoke test; on CPU the Triton kernel runs in the interpreter).
        dtype: "bf16" or "fp16".
        reps: calls per wall-time measurement (back to back: their mean; single call: their median).
        out: a markdown file to write the report to (atomically); rewritten with the rows so far as each is
            measured, each row also appended to ``out`` with the suffix ``.jsonl`` (``RowsSoFar``).
    """
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        # Must precede the first import of the kernels: Triton reads it when a kernel is defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    cases = QUICK_CASES if quick or not cuda else CASES
    # quick: one timed call of each kind, no warm-up on CPU (the interpreter has nothing to warm; ~0.3 s a call)
    warmup, reps = (int(cuda), 1) if quick or not cuda else (WARMUP, reps)
    # FlexAttention warns on every eager call (CPU): the header already says these are not GPU times.
    warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
    rows: list[Row] = []
    so_far = RowsSoFar(out, "attention benchmark")

    def add(row: Row) -> None:
        rows.append(row)
        so_far.add([row], table(rows))

    t0 = time.perf_counter()
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.name}: B={case.B} H={case.H} T={case.T} D={case.D} {case.mask} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
        measure(case, torch_dtype, device, warmup, reps, add)
    seconds = time.perf_counter() - t0
    head = _header(device, torch_dtype, warmup, reps, seconds)
    tiles = ["Tiles our kernels ran with (the autotuner's pick per shape key, or the fixed tiles):", "", tiles_table()]
    report = "\n".join([*head, "", table(rows), "", "Targets (issue 11):", "", *targets(rows), "", *tiles, ""])
    print(report)
    if out:
        write_text(out, report)
    return report


def _header(device: torch.device, dtype: torch.dtype, warmup: int, reps: int, seconds: float) -> list[str]:
    if device.type == "cuda":
        timing = (
            f"GPU ms: torch.profiler (CUDA activity), the summed duration of every kernel one fwd+bwd launches, "
            f"mean of {PROFILE_CALLS} calls; back to back: {reps} calls queued with no synchronisation, CUDA events "
            f"around all, / {reps}; single call: synchronise, host clock around one call + synchronise, median of "
            f"{reps}; fwd ms: the training forward (inputs require grad), back to back. All after a first call that "
            f"compiles FlexAttention and autotunes ours (and {warmup} warm-up fwd+bwd calls for the fwd+bwd times)."
        )
    else:
        timing = (f"no GPU time on CPU (-); wall times by the host clock: back to back over {reps} call(s), "
                  f"single call median of {reps}, after {warmup} warm-up call(s); fwd ms without grad")  # fmt: skip
    return [
        f"attention benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {seconds:.0f} s",
        device_line(
            device,
            "the Triton kernel runs in the interpreter and FlexAttention eagerly, so these times "
            "say nothing about GPU speed",
        ),
        f"{versions('triton')}, inputs {str(dtype).removeprefix('torch.')}",
        timing,
        "FlexAttention: torch.compile(flex_attention, dynamic=False, fullgraph=True) afresh for every shape after "
        "torch.compiler.reset() on CUDA (a row's note says if it failed to compile or ran eagerly); eager on CPU.",
        "TFLOP/s count only the (query, key) pairs the row's mask allows, 4*D FLOPs per pair forward, 3x for "
        "forward+backward (aimpre.scaling.flops convention), on GPU time; max abs err: forward output vs an fp32 "
        "eager reference with the row's own mask. The unmasked flash row computes full attention on the prefix "
        "shapes.",
    ]
