"""What can go wrong before any work, in one place: every error a user fixes by changing the input or the command.

`UnusableInput` is the one meaning of exit code 2 ("nothing was run: change this and run again"); the CLI maps it,
and only it, to that code. Errors of a single row never come here: they are recorded against the row and the run
goes on.
"""

from __future__ import annotations

import shutil
from pathlib import Path


class UnusableInput(Exception):
    """The manifest, a flag, the weights or the output folder cannot be used at all; the message says the fix."""


class RunError(UnusableInput):
    """A run that cannot start: no usable device, no worker could start, an unreachable cluster."""


def free_space(folder: Path) -> str:
    """`12 MB free`, for a message about a full disk: how much room there is tells the user whether to free some or
    move the run. The nearest folder that exists is asked (the one named may be what could not be made)."""
    for where in (Path(folder), *Path(folder).parents):
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            continue
        return f"{free / 1e6:,.0f} MB free" if free >= 1e6 else f"{free:,} bytes free"
    return "free space unknown"
