"""What Ctrl-C and SIGTERM ask of a run, and when it may act on them.

The first Ctrl-C asks for a stop: no new rows start, running ones finish. A second Ctrl-C, or SIGTERM (what
schedulers send before they kill), stops at once by raising `Interrupted` in the main thread, except inside a
`shielded` section (the parent recording a batch in the ledger), which it waits for, so the ledger never says
`running` for a row that no worker has.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Interrupted(KeyboardInterrupt):
    """Stop at once: a second Ctrl-C, or SIGTERM. Carries the signal for the exit code (128 + signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stop:
    """What the signals asked for: `requested` after a first Ctrl-C (finish running rows, start no more); `now` to
    stop at once, which waits for the end of the shielded sections."""

    def __init__(self) -> None:
        self.requested = False
        self._shields = 0
        self._deferred: int | None = None

    def request(self) -> None:
        """Finish what runs, start nothing more."""
        self.requested = True

    def now(self, signum: int) -> None:
        """Stop at once: raises `Interrupted` here, or at the end of the shielded section running now."""
        self.requested = True
        if self._shields:
            self._deferred = signum
        else:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """A section a stop waits for (several may nest); a stop asked for inside it is raised as it ends."""
        self._shields += 1
        try:
            yield
        finally:
            self._shields -= 1
        if not self._shields and self._deferred is not None:
            signum, self._deferred = self._deferred, None
            raise Interrupted(signum)

    def shield(self) -> None:
        """Shields everything from here on, for good: a run cleaning up after a stop, whose last ledger writes a
        further signal must not cut short. The signal is then never raised; the run is ending anyway."""
        self._shields += 1


@contextlib.contextmanager
def catch_signals(stop: Stop) -> Iterator[None]:
    """SIGINT and SIGTERM tell `stop` while the block runs; the handlers before it are put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread; a library caller keeps its own
        return

    def on_int(signum: int, frame: Any) -> None:
        if stop.requested:
            stop.now(signum)
        else:
            stop.request()

    def on_term(signum: int, frame: Any) -> None:
        stop.now(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, on_int)
    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
