"""``aimpre bench ops``: the fused memory-bound ops of ``aimpre.kernels.fused``, torch against liger-kernel.

For each op at the AIMv2 shapes of a size, forward + backward time (CUDA events, median of ``reps`` runs after
warm-up, which includes compilation) and peak memory above the inputs, for: eager torch; torch.compile of the torch
op (Inductor: the real competitor, since ``aimpre train`` compiles each block); liger-kernel; liger inside
torch.compile (how a compiled block would run it). Inputs have the dtypes a bf16-autocast training step gives them:
the residual stream and the norm weights in fp32, the branch outputs (SwiGLU's inputs, the add's delta) in bf16, and
each norm's output cast to bf16 as the next linear reads it (Inductor fuses that cast into its norm kernel, liger
cannot). The verdict of a block op compares liger inside torch.compile with Inductor; that of the text head + cross-
entropy compares liger with eager torch (``aimpre train`` runs the loss outside the compiled blocks) and shows the
memory the fp32 logits take. 5% either way counts as a tie.
"""

from __future__ import annotations

import datetime
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from aimpre.bench.timing import RowsSoFar, cell, device_line, short_error, versions
from aimpre.files import write_text
from aimpre.kernels import fused

OPS = ("rmsnorm", "add_rmsnorm", "swiglu", "linear_ce")
IMPLS = ("eager torch", "torch.compile", "liger", "liger in torch.compile")
TIE = 0.05  # |ratio - 1| below this: no verdict for either side


@dataclass(frozen=True)
class Case:
    """One op at one shape: ``rows`` tokens of width ``dim``; ``inner`` is SwiGLU's hidden width or the vocab."""

    op: str
    where: str  # "encoder", "decoder" or "text head"
    rows: int
    dim: int
    inner: int = 0

    @property
    def shape(self) -> str:
        if self.op == "swiglu":
            return f"[{self.rows}, {self.inner}]"
        if self.op == "linear_ce":
            return f"[{self.rows}, {self.dim}] x [{self.inner}, {self.dim}]"
        return f"[{self.rows}, {self.dim}]"


@dataclass
class Row:
    case: Case
    impl: str
    ms: float | None = None
    peak_mib: float | None = None
    err: float | None = None  # max |output - eager torch's|
    note: str = ""


def cases(
    batch: int, width: int, hidden: int, tokens: int, dec_width: int, dec_hidden: int, dec_tokens: int, text: int,
    vocab: int, ops: tuple[str, ...] = OPS,
) -> list[Case]:  # fmt: skip
    """The cases of one model size. The decoder's are left out where its widths equal the encoder's: the same
    kernels over 1.3x the rows, and every case costs compilations.

    Args:
        batch: images per step.
        width, hidden, tokens: the encoder's width, SwiGLU hidden width and tokens per image (patches).
        dec_width, dec_hidden, dec_tokens: the decoder's (dec_tokens: its sequence length).
        text, vocab: caption tokens per image and the vocabulary (the text head).
        ops: which of ``OPS`` to measure.
    """
    out = []
    shapes = [("encoder", batch * tokens, width, hidden)]
    if (dec_width, dec_hidden) != (width, hidden):
        shapes.append(("decoder", batch * dec_tokens, dec_width, dec_hidden))
    for op in ops:
        if op == "linear_ce":
            out.append(Case(op, "text head", batch * text, dec_width, vocab))
        else:
            out += [Case(op, where, rows, dim, hid) for where, rows, dim, hid in shapes]
    return out


def _inputs(case: Case, device: torch.device, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """(the op's arguments, the gradients of its outputs); fresh per implementation, since liger's backward
    writes over some of them (SwiGLU's inputs, RMSNorm's output gradient)."""
    g = torch.Generator(device=device).manual_seed(seed)
    bf16 = torch.bfloat16
    R, D, H = case.rows, case.dim, case.inner

    def rand(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = True) -> Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_(grad)

    w = (1 + 0.1 * torch.randn(D, generator=g, device=device)).requires_grad_()
    if case.op == "rmsnorm":
        return [rand(R, D), w], [rand(R, D, dtype=bf16, grad=False)]
    if case.op == "add_rmsnorm":
        return [rand(R, D), rand(R, D, dtype=bf16), w], [rand(R, D, dtype=bf16, grad=False), rand(R, D, grad=False)]
    if case.op == "swiglu":
        return [rand(R, H, dtype=bf16), rand(R, H, dtype=bf16)], [rand(R, H, dtype=bf16, grad=False)]
    x, head = rand(R, D), (torch.randn(H, D, generator=g, device=device) * D**-0.5).requires_grad_()
    target = torch.randint(0, H, (R,), generator=g, device=device)
    mask = torch.rand(R, generator=g, device=device) < 0.8  # ~20% pads, as short captions give
    return [x, head, target, mask], []


def _fn(op: str, mode: str) -> Callable[..., tuple[Tensor, ...]]:
    """The op as the model calls it under ``model.fused=mode``; outputs as a tuple."""
    bf16 = torch.bfloat16
    if op == "rmsnorm":
        return lambda x, w: (fused.rms_norm(x, w, 1e-5, mode).to(bf16),)
    if op == "add_rmsnorm":

        def add_norm(x: Tensor, d: Tensor, w: Tensor) -> tuple[Tensor, ...]:
            y, s = fused.add_rms_norm(x, d, w, 1e-5, mode)
            return y.to(bf16), s

        return add_norm
    if op == "swiglu":
        return lambda a, b: (fused.silu_mul(a, b, mode),)
    return lambda x, w, t, m: (fused.linear_cross_entropy(x, w, t, m, mode),)


def _cannot(impl: str, op: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot run ``op`` here, or None."""
    if not impl.startswith("liger"):
        return None
    if not fused.liger_installed():
        return f"liger-kernel not installed ({fused.INSTALL_HINT})"
    if not fused.use_liger("liger", "ce" if op == "linear_ce" else "norm", torch.empty(0, device=device)):
        return "liger's kernel does not run on CPU (only its cross-entropy, in Triton's interpreter)"
    if device.type != "cuda" and impl.endswith("torch.compile"):
        return "Dynamo cannot trace a kernel in Triton's interpreter"
    return None


def _fwd_bwd(
    fn: Callable[..., tuple[Tensor, ...]], args: list[Tensor], grads: list[Tensor], device_type: str
) -> object:
    with torch.autocast(device_type, dtype=torch.bfloat16):
        outs = fn(*args)
    return torch.autograd.grad(outs, [a for a in args if a.requires_grad], grads or None)  # returned, not accumulated


def _time(step: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _peak_mib(step: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(case: Case, device: torch.device, warmup: int, reps: int, backend: str = "inductor") -> list[Row]:
    """Times every implementation of one case (fwd + bwd under bf16 autocast); a failing one gets a row saying why.

    Args:
        case: the op and shape.
        device: where to run.
        warmup, reps: untimed and timed runs.
        backend: torch.compile's backend ("inductor"; the CPU smoke test uses "aot_eager", which compiles in
            a second and still runs Dynamo and AOTAutograd).
    """
    torch._dynamo.reset()  # every case compiles afresh: no recompile limit carried over
    rows, ref = [], None
    for impl in IMPLS:
        row = Row(case, impl)
        rows.append(row)
        why = _cannot(impl, case.op, device)
        if why:
            row.note = why
            continue
        fn: Any = _fn(case.op, "liger" if impl.startswith("liger") else "torch")
        if impl.endswith("torch.compile"):
            fn = torch.compile(fn, backend=backend, dynamic=False)
        args, grads = _inputs(case, device, seed=0)
        step = partial(_fwd_bwd, fn, args, grads, device.type)
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = fn(*_inputs(case, device, seed=0)[0])[0].detach().float()  # fresh inputs: liger writes over
            if ref is None:
                ref = out
            row.err = (out - ref).abs().max().item()
            row.ms = _time(step, device, warmup, reps)
            row.peak_mib = _peak_mib(step, device)
        except torch.cuda.OutOfMemoryError:
            row.note = "out of memory"
        except Exception as e:  # an implementation that cannot run here is a row saying why
            row.note = short_error(e)
        del fn, args, grads, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: list[Row]) -> str:
    """The rows as one markdown table; "vs eager" is eager torch's time over the row's."""
    lines = [
        "| op | where | shape | implementation | fwd+bwd ms | vs eager | peak MiB | max abs diff | note |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    eager = {r.case: r.ms for r in rows if r.impl == "eager torch"}
    for r in rows:
        e = eager.get(r.case)
        speed = e / r.ms if e and r.ms else None
        lines.append(
            f"| {r.case.op} | {r.case.where} | {r.case.shape} | {r.impl} | {cell(r.ms, '.3f')} "
            f"| {cell(speed, '.2f')} | {cell(r.peak_mib, '.0f')} | {cell(r.err, '.1e')} | {r.note} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[Row], gpu: bool) -> list[str]:
    """One line per case: does liger pay against what ``aimpre train`` runs today?"""
    out = []
    for case in dict.fromkeys(r.case for r in rows):
        by = {r.impl: r for r in rows if r.case == case}
        ce = case.op == "linear_ce"
        peer = by["eager torch" if ce else "torch.compile"]
        # a compiled block would run liger inside the compiled graph; if that fails, Dynamo breaks the graph there
        compiled = by["liger in torch.compile"]
        ours = by["liger"] if ce or compiled.ms is None else compiled
        label = f"- {case.op} ({case.where} {case.shape})"
        if ours.ms is None or peer.ms is None:
            out.append(f"{label}: not measured ({ours.note or peer.note})")
            continue
        ratio = peer.ms / ours.ms
        use = "use it" if ratio >= 1 + TIE else "do not" if ratio <= 1 - TIE else "a tie: keep torch"
        memory = ""
        if ce and ours.peak_mib is not None and peer.peak_mib is not None:
            memory = f"; peak {ours.peak_mib:.0f} MiB vs {peer.peak_mib:.0f} MiB"
        peer_word = "eager torch (the loss is not compiled)" if ce else "Inductor"
        suffix = "" if gpu else " (CPU: not a verdict)"
        out.append(f"{label}: {ours.impl} {ratio:.2f}x faster than {peer_word}{memory}: {use}{suffix}")
    return out


def run_ops(shapes: dict[str, int], label: str, quick: bool = False, reps: int = 20, out: str | None = None,
            ops: tuple[str, ...] = OPS) -> str:  # fmt: skip
    """Measures, prints and returns the report (header, table, verdicts); ``out`` also writes it.

    Args:
        shapes: the keyword arguments of ``cases`` but ``ops``.
        label: what the shapes are, for the header (e.g. "AIMv2-large, batch 128").
        quick: a smoke test (tiny shapes, 2 runs, torch.compile with the aot_eager backend); always so on CPU.
        reps: timed runs per measurement (median reported).
        out: a markdown file to write the report to (atomically); rewritten as each case is measured, its rows
            also appended to ``out`` with the suffix ``.jsonl`` (``RowsSoFar``).
        ops: which of ``OPS`` to measure.
    """
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda" and not quick
    warmup, reps = (3, reps) if gpu else (1, 2)
    backend = "inductor" if gpu else "aot_eager"
    todo = cases(**shapes, ops=ops)
    rows: list[Row] = []
    so_far = RowsSoFar(out, "fused ops benchmark")
    for i, case in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {case.op} {case.where} {case.shape}", file=sys.stderr, flush=True)
        case_rows = measure(case, device, warmup, reps, backend)
        rows += case_rows
        so_far.add(case_rows, table(rows))  # a case's rows together: "vs eager" needs the case's eager row
    header = [
        f"fused ops benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {label}",
        device_line(
            device,
            "liger's RMSNorm and SwiGLU cannot run, its cross-entropy runs in Triton's "
            "interpreter: these times say nothing about GPU speed",
        ),
        f"{versions('triton', 'liger-kernel')}; forward+backward under bf16 autocast, median of {reps} runs "
        f"after {warmup} warm-up "
        f"(compilation included there); torch.compile backend {backend}",
        "peak MiB: allocated above the inputs during one forward+backward; max abs diff: the first output against "
        "eager torch's. Residual stream and norm weights fp32, branch outputs bf16, norm outputs cast to bf16 (as "
        "the next linear reads them); ~20% of caption tokens are pads.",
    ]
    report = "\n".join([*header, "", table(rows), "", *verdicts(rows, gpu), "",
                        f"took {time.perf_counter() - t0:.0f} s", ""])  # fmt: skip
    print(report)
    if out:
        write_text(out, report)
    return report
