"""The stop signals of a training run (SIGTERM: preemption; SIGUSR1: SLURM's warning before the time limit), noted
by a handler that only sets a flag. Standard library only: ``aimpre train`` installs it before it imports torch and
Lightning (seconds on a loaded node, during which the default action would kill the process outright)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """SIGTERM and SIGUSR1 noted, not acted on: ``received`` is the first such signal (0: none yet).

    A handler that only sets a flag is safe wherever the signal lands (inside a collective, a checkpoint write, a
    DataLoader call); the Checkpointer acts on it at the next safe point. ``forward`` (set by the Checkpointer
    under Lightning's DDP launcher) passes the first signal on to the ranks this process started, which get it
    from the process group too when the signal was sent to the group: a second one changes nothing.
    """

    def __init__(self) -> None:
        self.received = 0
        self.forward: Callable[[int], None] | None = None

    def _note(self, signum: int, frame: Any) -> None:
        first = not self.received
        self.received = self.received or signum
        if first and self.forward is not None:
            self.forward(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Notes the stop signals while the block runs (from the main thread; elsewhere signals cannot be set)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        before = {s: signal.signal(s, self._note) for s in STOP_SIGNALS}
        outer = getattr(before[signal.SIGTERM], "__self__", None)  # `aimpre train` notes them from its start
        outer = outer if isinstance(outer, StopSignals) else None
        if outer is not None:
            self.received = self.received or outer.received
        try:
            yield self
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)
            if outer is not None:
                outer.received = outer.received or self.received
