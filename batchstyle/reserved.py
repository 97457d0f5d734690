"""The names in an output folder that batchstyle writes itself, which no output may take.

A run and its report write the ledger and its locks, the contact sheet and the HTML page, temp files, iterates and a
clip's frames beside the outputs. An output given one of those names was replaced by batchstyle's own file while the
ledger still said done (an output named `contact-sheet.png` became the report's sheet, and reruns skipped it), so the
manifest refuses such outputs before any work, and this module is the one list it checks: each name is defined by the
module that writes it and gathered here, so the writers and the check cannot drift apart. Torch-free, as `check` is.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from pathlib import PurePath

from batchstyle.images import ITERATES_SUFFIX, TEMP_MARKER, is_temp_name
from batchstyle.run.ledger import LEDGER_NAME, LOCK_NAME
from batchstyle.video import FRAMES_SUFFIX

CONTACT_SHEET_NAME = "contact-sheet.png"
HTML_NAME = "report.html"


def fold(name: str) -> str:
    """`name` as the file systems of Windows and macOS compare names: letter case and Unicode normalisation (NFC
    against NFD, which macOS writes) aside. Canonical caseless matching: decompose, casefold, compose."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", name).casefold())


# Every ledger (a shard's too: `batchstyle-ledger.shard-0-of-4.sqlite`) and SQLite's files beside it start with the
# ledger's stem and a dot; every lock (`.batchstyle.lock`, a shard's `.batchstyle.shard-0-of-4.lock`) with the lock's.
_LEDGER_PREFIX = fold(LEDGER_NAME.removesuffix(".sqlite") + ".")
_LOCK_PREFIX = fold(LOCK_NAME.removesuffix(".lock") + ".")
_REPORT = {fold(CONTACT_SHEET_NAME): "contact sheet", fold(HTML_NAME): "HTML report"}


def reserved_problem(relative: PurePath) -> str | None:
    """Why an output at `relative` (its path inside the output folder) would land on a file batchstyle writes
    itself, or None. Names are compared as :func:`fold` compares them, so a manifest checked on Linux is safe on a
    laptop too."""
    return reserved_in([fold(part) for part in relative.parts])


def reserved_in(parts: Sequence[str]) -> str | None:
    """`reserved_problem` of a path given as its parts, each already folded (a manifest's clash keys are): planning
    200,000 rows spent a fifth of reading the manifest making paths to fold here again."""
    if len(parts) == 1:
        name = parts[0]
        if name in _REPORT:
            return f"is where `--report` and `batchstyle report` write the {_REPORT[name]}"
        if name.startswith(_LEDGER_PREFIX):
            return "is the ledger's name, the run's record of what each row made"
        if name.startswith(_LOCK_PREFIX):
            return "is the name of the lock that keeps a second run off the output folder"
    if any(is_temp_name(part) for part in parts):
        return f"is named like a temp file ('{TEMP_MARKER}'), which a later run deletes as a killed save's leftover"
    for folder in parts[:-1]:
        if folder.endswith(ITERATES_SUFFIX):
            return f"lies in a '{ITERATES_SUFFIX}' folder, where --save-every writes an output's iterates"
        if folder.endswith(FRAMES_SUFFIX):
            return f"lies in a '{FRAMES_SUFFIX}' folder, where a clip's frames are kept while it is stylized"
    return None
