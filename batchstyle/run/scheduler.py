"""Which batch goes to which worker slot next: handed out one at a time to whichever slot is idle, a style kept on as
few workers as possible, rows back from a dead worker first."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence

from batchstyle.run.plan import Job


class Scheduler:
    """Hands batches out one at a time to whichever slot is idle (no static split: a slow row never holds up rows
    queued behind it on another device), preferring the style the slot worked on last, then a style no other slot
    is working on, so each style's targets are computed on as few workers as possible.

    Indexed by style, so a call costs the same for a manifest of ten rows or a hundred thousand.
    """

    LOOKAHEAD = 256  # queued batches looked at for a style no other slot has; beyond them, manifest order wins

    def __init__(self, batches: Sequence[list[Job]]) -> None:
        self.pending: dict[int, tuple[list[Job], frozenset[str]]] = {}
        self.order: deque[int] = deque()
        self.by_style: dict[str, deque[int]] = {}
        self.next_id = 0
        self.last: dict[int, frozenset[str]] = {}
        self.active: dict[int, frozenset[str]] = {}
        for batch in batches:
            self.order.append(self._add(batch))

    def _add(self, batch: list[Job]) -> int:
        key, self.next_id = self.next_id, self.next_id + 1
        styles = frozenset(d for job in batch for d in job.style_digests)
        self.pending[key] = (batch, styles)
        for style in styles:
            self.by_style.setdefault(style, deque()).append(key)
        return key

    def __len__(self) -> int:
        return len(self.pending)

    @property
    def queue(self) -> list[list[Job]]:
        """What is still to hand out, in the order it would go without style preferences."""
        return [self.pending[key][0] for key in self._live()]

    def rows(self) -> list[int]:
        return [job.row.number for batch in self.queue for job in batch]

    def _first(self, keys: deque[int]) -> int | None:
        while keys and keys[0] not in self.pending:
            keys.popleft()
        return keys[0] if keys else None

    def next_for(self, slot: int) -> list[Job] | None:
        first = self._first(self.order)
        if first is None:
            return None
        mine = [k for style in self.last.get(slot, ()) if (k := self._first(self.by_style[style])) is not None]
        if mine:
            key = min(mine)  # the earliest queued (rows sent back after a death aside)
        else:
            others = frozenset().union(*(s for k, s in self.active.items() if k != slot))
            key = next(
                (k for k in itertools.islice(self._live(), self.LOOKAHEAD) if not self.pending[k][1] & others),
                first,
            )
        batch, styles = self.pending.pop(key)
        self.last[slot] = self.active[slot] = styles
        return batch

    def _live(self) -> Iterator[int]:
        return (key for key in self.order if key in self.pending)

    def finished(self, slot: int) -> None:
        self.active.pop(slot, None)

    def again(self, jobs: Sequence[Job]) -> None:
        """Rows back from a dead worker go first, one per batch: a row that killed its worker once should not take
        batch-mates down with it again."""
        for job in reversed(jobs):
            self.order.appendleft(self._add([job]))

    def clear(self) -> None:
        self.pending.clear()
