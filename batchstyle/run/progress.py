"""What a run tells the people and programs watching it: progress bars on the terminal, JSON lines in a log file.

The engine emits events through one small interface, so the terminal display, a machine-readable log and silence
(`--quiet`) are interchangeable and the engine never formats output itself.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any, Protocol

from tqdm import tqdm

from batchstyle.video import is_clip_output


class Events(Protocol):
    def run_started(self, total: int, to_do: int, model: str, reason: str, device: str) -> None: ...
    # A clip row (a video output) counts frames finished where an image row counts iterations.
    def row_started(self, row: int, output: str, iterations: int) -> None: ...
    # losses: the iterate's terms by name (content, style, tv, a video row's temporal, ...) and its total
    def iteration(self, row: int, iteration: int, losses: dict[str, float]) -> None: ...
    def row_finished(self, row: int, output: str, status: str, info: dict[str, Any]) -> None: ...
    def run_finished(self, counts: dict[str, int]) -> None: ...
    def message(self, text: str) -> None: ...


class Silent:
    def run_started(self, total: int, to_do: int, model: str, reason: str, device: str) -> None:
        pass

    def row_started(self, row: int, output: str, iterations: int) -> None:
        pass

    def iteration(self, row: int, iteration: int, losses: dict[str, float]) -> None:
        pass

    def row_finished(self, row: int, output: str, status: str, info: dict[str, Any]) -> None:
        pass

    def run_finished(self, counts: dict[str, int]) -> None:
        pass

    def message(self, text: str) -> None:
        pass


class Terminal(Silent):
    """A bar for the whole run (rows) and one per running row (iterations, loss, ETA): several workers, several
    rows at once."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.rows: tqdm | None = None
        self.images: dict[int, tqdm] = {}
        self.positions: dict[int, int] = {}  # screen line of each running row's bar

    def run_started(self, total: int, to_do: int, model: str, reason: str, device: str) -> None:
        self.message(f"model: {model} ({reason}); devices: {device}; {to_do} of {total} rows to do")
        if to_do:
            self.rows = tqdm(total=to_do, desc="rows", unit="row", file=self.stream, position=0, dynamic_ncols=True)

    def row_started(self, row: int, output: str, iterations: int) -> None:
        taken = set(self.positions.values())
        position = self.positions[row] = next(p for p in range(1, len(taken) + 2) if p not in taken)
        self.images[row] = tqdm(
            total=iterations,
            desc=f"row {row}",
            unit="frame" if is_clip_output(Path(output)) else "it",  # a clip's bar counts frames
            file=self.stream,
            position=position,
            leave=False,
            dynamic_ncols=True,
        )

    def iteration(self, row: int, iteration: int, losses: dict[str, float]) -> None:
        bar = self.images.get(row)
        if bar is not None:
            bar.update(iteration - bar.n)
            bar.set_postfix_str(_terms(losses), refresh=False)

    def row_finished(self, row: int, output: str, status: str, info: dict[str, Any]) -> None:
        if status == "failed":
            self.message(f"failed: {info.get('error')}")
        bar = self.images.pop(row, None)
        self.positions.pop(row, None)
        if bar is None:  # a row that failed validation was never started: not counted in the bar
            return
        bar.close()
        if self.rows is not None and status != "retry":
            self.rows.update(1)

    def run_finished(self, counts: dict[str, int]) -> None:
        for bar in self.images.values():
            bar.close()
        self.images.clear()
        if self.rows is not None:
            self.rows.close()

    def message(self, text: str) -> None:
        tqdm.write(text, file=self.stream)


def _terms(losses: dict[str, float]) -> str:
    """The total first (as `loss`), then every other term given, by name: a video row's temporal term too."""
    shown = {"loss": losses["total"]} if "total" in losses else {}
    shown |= {name: value for name, value in losses.items() if name != "total"}
    return " ".join(f"{name} {value:.4g}" for name, value in shown.items())


class JsonLog(Silent):
    """One JSON object per line, flushed as it happens, for schedulers and dashboards to tail."""

    def __init__(self, handle: IO[str], every: int = 10) -> None:
        self.handle = handle
        self.every = every
        self.last: dict[int, int] = {}

    def _emit(self, event: str, **fields: Any) -> None:
        self.handle.write(json.dumps({"time": round(time.time(), 3), "event": event, **fields}) + "\n")
        self.handle.flush()

    def run_started(self, total: int, to_do: int, model: str, reason: str, device: str) -> None:
        self._emit("run_started", rows=total, to_do=to_do, model=model, reason=reason, device=device)

    def row_started(self, row: int, output: str, iterations: int) -> None:
        self._emit("row_started", row=row, output=output, iterations=iterations)

    def iteration(self, row: int, iteration: int, losses: dict[str, float]) -> None:
        # Every term given, by name, beside the total. Once per value: a clip reports its frames finished on every
        # iteration (a heartbeat), the same value often.
        if iteration % self.every == 0 and self.last.get(row) != iteration:
            self.last[row] = iteration
            self._emit("iteration", row=row, iteration=iteration, **losses)

    def row_finished(self, row: int, output: str, status: str, info: dict[str, Any]) -> None:
        self._emit("row_finished", row=row, output=output, status=status, **info)

    def run_finished(self, counts: dict[str, int]) -> None:
        self._emit("run_finished", **counts)

    def message(self, text: str) -> None:
        self._emit("message", text=text)


class Fanout(Silent):
    def __init__(self, *sinks: Events) -> None:
        self.sinks = sinks

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or name == "sinks":
            return object.__getattribute__(self, name)

        def call(*args: Any, **kwargs: Any) -> None:
            for sink in object.__getattribute__(self, "sinks"):
                getattr(sink, name)(*args, **kwargs)

        return call
