"""What can go wrong before any work, in one place: every error a user fixes by changing the input or the command.

`UnusableInput` is the one meaning of exit code 2 ("nothing was run: change this and run again"); the CLI maps it,
and only it, to that code. Errors of a single row never come here: they are recorded against the row and the run
goes on.
"""

from __future__ import annotations


class UnusableInput(Exception):
    """The manifest, a flag, the weights or the output folder cannot be used at all; the message says the fix."""


class RunError(UnusableInput):
    """A run that cannot start: no usable device, no worker could start, an unreachable cluster."""
