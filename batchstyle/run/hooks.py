"""Test hooks a worker obeys, torch-free: the pools (in a run's parent, which plans without torch) hand them on to
the processes and Ray actors they start, and the worker checks them."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchstyle.run.plan import Job

TEST_HANG_ROW = "BATCHSTYLE_TEST_HANG_ROW"


def hang_if_asked(jobs: Sequence[Job]) -> None:
    """Test hook: with BATCHSTYLE_TEST_HANG_ROW=<row number> in its environment, a worker handed that row blocks for
    good without another sign of life, as one stuck in a driver call would; every other row runs as ever. A real
    hang (SIGSTOP) of whichever worker holds a row cannot single out the row, and a test that waits for it races the
    healthy worker beside it under load."""
    row = os.environ.get(TEST_HANG_ROW)
    if row and any(str(job.row.number) == row for job in jobs):
        threading.Event().wait()
