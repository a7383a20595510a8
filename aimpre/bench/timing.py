"""The timers and report helpers every bench shares (attention, ops, step, fp8; the GPU check's header): wall time
of calls queued back to back or of one synchronised call, GPU time from the profiler, the device and version lines
of a report's header, table cells, and ``RowsSoFar``, which writes each row as soon as it is measured."""

from __future__ import annotations

import dataclasses
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aimpre.files import write_text


def dist_version(name: str) -> str:
    """``NAME VERSION`` of an installed distribution, or ``NAME not installed``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:
        return f"{name} not installed"


def versions(*dists: str) -> str:
    """The version line of a bench's header: torch's version and each named distribution's."""
    return ", ".join([f"torch {torch.__version__}", *map(dist_version, dists)])


def device_line(device: torch.device, cpu_note: str) -> str:
    """``device: NAME (CUDA x)``, or on CPU ``device: NO GPU: CPU (processor); cpu_note`` (what the times mean)."""
    if device.type == "cuda":
        return f"device: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"device: NO GPU: CPU ({platform.processor() or platform.machine()}); {cpu_note}"


def short_error(e: BaseException) -> str:
    """An exception as a table note: its type and the first line of its message, cut to 100 characters."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first[:100]}".rstrip(": ")


def cell(x: float | None, fmt: str) -> str:
    """A table cell: ``x`` formatted, or "-" when not measured."""
    return "-" if x is None else format(x, fmt)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def back_to_back_ms(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Wall ms per call of ``n`` calls queued with no synchronisation between them (CUDA events around all)."""
    sync(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) * 1e3 / n
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


class RowsSoFar:
    """A bench's rows written as soon as each is measured, so that a bench killed by a timeout (the GPU check's) still
    leaves what it measured: ``out`` rewritten with the markdown table so far, and every row appended as one JSON
    object to ``out`` with the suffix ``.jsonl`` (emptied when the bench starts). Nothing without ``out``."""

    def __init__(self, out: str | Path | None, title: str) -> None:
        """Args:
        out: the bench's markdown report (None: write nothing).
        title: the report's title while it is in progress.
        """
        self.out, self.title = out, title
        self.jsonl = Path(out).with_suffix(".jsonl") if out else None
        if self.jsonl:
            write_text(self.jsonl, "")

    def add(self, rows: list[Any], table: str) -> None:
        """Appends ``rows`` (dataclasses or dicts) to the JSON lines and rewrites the markdown with ``table``."""
        if not (self.out and self.jsonl):
            return
        write_text(self.out, f"# {self.title} (in progress: rows so far)\n\n{table}\n")
        with self.jsonl.open("a") as f:
            for r in rows:
                d = dataclasses.asdict(r) if dataclasses.is_dataclass(r) and not isinstance(r, type) else r
                f.write(json.dumps(d, default=str) + "\n")


def single_call_ms(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Median wall ms of one call on an idle device: synchronise, host clock around the call and a synchronise."""
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_time_ms(fn: Callable[[], object], n: int) -> float:
    """Summed duration of the CUDA kernels (and memcpy/memset) one call launches, averaged over ``n`` calls."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    # Device events, less the GPU projections of record_function ranges (torch.compile's graphs make some), as
    # the profiler's own "Self CUDA time total" counts them.
    kernels = [
        e for e in prof.events() if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    device_us = sum(e.time_range.elapsed_us() for e in kernels)
    if device_us == 0:
        raise RuntimeError("the profiler saw no CUDA kernel")
    return device_us / n / 1e3


def free_memory(device: torch.device) -> None:
    """Collects garbage and, on CUDA, empties the allocator's cache and resets its peak, so the next build's peak
    memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
