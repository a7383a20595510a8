"""Progress of a loop: a tqdm bar on a terminal, plain lines in a file.

A tqdm bar redraws itself with carriage returns; written into a log file (a SLURM output, ``2> log``) that is one
line of thousands of characters. So where stderr is not a terminal, ``progress`` prints a plain line every few
steps instead, as training does (``MetricsCSV``'s echo): ``LiT (siglip): 300/600 step, 41.2 step/s, loss=1.234``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class LineProgress:
    """The part of tqdm's interface aimpre uses (iteration, ``set_postfix``, ``close``), as a line to stderr at
    every ``every``-th item and one at the end."""

    def __init__(self, iterable: Iterable[T], desc: str, total: int | None, unit: str, every: int) -> None:
        self.iterable, self.desc, self.total, self.unit, self.every = iterable, desc, total, unit, every
        self.n, self.postfix, self.start, self.shown = 0, "", time.time(), -1

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.n += 1
            if self.n % self.every == 0:
                self._line()
        self.close()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.shown != self.n:  # the last line, unless the last step already printed one
            self._line()

    def _line(self) -> None:
        self.shown = self.n
        seconds = time.time() - self.start
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        rate = f", {self.n / seconds:.1f} {self.unit}/s" if seconds > 0 else ""
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {count} {self.unit}{rate}{tail}", file=sys.stderr, flush=True)


def progress(
    iterable: Iterable[T], desc: str, *, total: int | None = None, unit: str = "it", leave: bool = True, lines: int = 10
) -> Any:
    """``iterable`` wrapped in a tqdm bar if stderr is a terminal, else in ``LineProgress``.

    Args:
        iterable: what the loop runs over.
        desc: the bar's label.
        total: the number of items (default: ``len(iterable)`` where it has one).
        unit: what an item is (``step``, ``img``).
        leave: keep the finished bar on the terminal (tqdm's ``leave``).
        lines: in a file, about this many lines for a loop of known length; one every 1000 items otherwise.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave)
    every = max(1, math.ceil(total / lines)) if total else 1000
    return LineProgress(iterable, desc, total, unit, every)
