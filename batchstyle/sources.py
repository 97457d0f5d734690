"""Rows from folders, globs and bucket prefixes rather than a CSV: `batchstyle run --content 'photos/*.jpg' --style
paintings/ --out night/` stylizes every photo found with every painting found, and `batchstyle manifest` writes the
CSV such a command runs, for people who want to edit it.

The rows are the table a CSV would give (`manifest.Table`), so every check of a manifest applies to them unchanged.
Each output is named from its own inputs' places alone, never from what else a folder holds nor from a row's number:
when two new photos arrive, the photos of last night keep their outputs' names and job keys, and a rerun of the same
command skips them and does only the new ones. Files are taken in sorted order, so the rows are the same on every
machine that sees the same files.
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import os
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from batchstyle.errors import UnusableInput
from batchstyle.images import SUPPORTED_SUFFIXES
from batchstyle.manifest import Table
from batchstyle.reserved import fold
from batchstyle.video import VIDEO_SUFFIXES, is_clip

_GLOB = frozenset("*?[")
# Option values that name files: the manifest reads them relative to its own folder, as it reads content and style.
PATH_OPTIONS = ("init", "style_masks", "content_mask")


class SourceError(UnusableInput):
    """--content or --style gives no rows: a pattern that finds no image, counts --pair cannot match, or two rows
    that would write one output."""


@dataclass(frozen=True)
class _Found:
    cell: str  # what the row's cell holds: an absolute path, or a URL
    parts: tuple[str, ...]  # its place, part by part: ("/", "home", ..., "x.jpg") or ("s3:", "bucket", ..., "x.jpg")
    listing: Mapping[str, Any] | None = field(default=None, compare=False)  # an object's entry in the listing

    @property
    def stem(self) -> str:
        return PurePath(self.parts[-1]).stem

    @property
    def suffix(self) -> str:
        return PurePath(self.parts[-1]).suffix.lower()


@dataclass(frozen=True)
class Sources:
    """What --content, --style and --pair found: the rows' table and, for messages and the ledger, the flags."""

    table: Table
    label: str  # the flags as a shell would take them: `--content 'photos/*.jpg' --style paintings/`
    # Each object's entry in the listing that found it, by URL: its ETag and size, which staging it then needs
    # (`store.stage_all`) rather than asking the store for each again.
    listed: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def find_rows(
    contents: Sequence[str], styles: Sequence[str], pair: bool = False, fmt: str = "png", out: Path | None = None
) -> Sources:
    """Every content with every style (with `pair`, the first content with the first style, and so on), as rows
    whose cells are absolute paths or URLs and whose outputs are named `<content>-<style>.<fmt>` below the
    content's sub-folder (its place under the folder all --content patterns share), so that two photos of one name
    in different folders never meet. Files inside `out` are never inputs: outputs of last night are not tonight's
    photos. Raises SourceError naming the flag and the pattern, or both files of a clash, before any work."""
    if not contents or not styles:
        raise SourceError("the folder form needs --content and --style, each a file, a folder, a glob or a URL")
    excluded = os.path.abspath(out) if out is not None else None
    found_contents, root = _find_all(contents, "--content", SUPPORTED_SUFFIXES | VIDEO_SUFFIXES, excluded)
    found_styles, _ = _find_all(styles, "--style", SUPPORTED_SUFFIXES, excluded)
    if pair and len(found_contents) != len(found_styles):
        raise SourceError(
            f"--pair matches contents to styles in sorted order, but --content found {len(found_contents)} files and "
            f"--style {len(found_styles)}; give as many styles as contents, or drop --pair for every content with "
            "every style"
        )
    pairs = zip(found_contents, found_styles) if pair else itertools.product(found_contents, found_styles)
    suffix = "." + fmt.lower().lstrip(".")
    rows: list[tuple[int | None, dict[str, str]]] = []
    taken: dict[str, tuple[_Found, _Found]] = {}
    for content, style in pairs:
        kind = content.suffix if _is_video(content) else suffix
        output = "/".join((*content.parts[len(root) : -1], f"{content.stem}-{style.stem}{kind}"))
        first = taken.setdefault(fold(output), (content, style))
        if first != (content, style):
            raise SourceError(
                f"{first[0].cell} with {first[1].cell} and {content.cell} with {style.cell} would both write "
                f"{output!r} (names that differ only in extension or letter case are one output); rename or move "
                "one of the files"
            )
        rows.append((None, {"content": content.cell, "style": style.cell, "output": output}))
    label = " ".join(
        [*(f"--content {shlex.quote(p)}" for p in contents), *(f"--style {shlex.quote(p)}" for p in styles)]
        + (["--pair"] if pair else [])
    )
    listed = {found.cell: found.listing for found in (*found_contents, *found_styles) if found.listing is not None}
    return Sources((["content", "style", "output"], rows), label, listed)


def manifest_text(
    sources: Sources, options: Mapping[str, Any], to_text: Callable[[str, Any], str], folder: Path | None
) -> str:
    """The CSV that runs `sources`' rows: `options` (the flags given, as values) a column each, paths relative to
    `folder` (where the CSV is saved) or absolute where there is none (standard output), URLs as they are."""

    def place(cell: str) -> str:
        if "://" in cell or folder is None:
            return cell
        return Path(os.path.relpath(cell, os.path.abspath(folder))).as_posix()

    def option_cell(name: str, value: Any) -> str:
        if name in PATH_OPTIONS and value not in ("content", "noise", ""):
            value = tuple(map(place, value)) if isinstance(value, tuple) else place(value)
        return to_text(name, value)

    columns, rows = sources.table
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*columns, *options])
    cells = [option_cell(name, value) for name, value in options.items()]
    for _, row in rows:
        writer.writerow([place(row["content"]), place(row["style"]), row["output"], *cells])
    return buffer.getvalue()


def _is_video(found: _Found) -> bool:
    """A video keeps its container, as a manifest row without an output does; a GIF only if it moves."""
    if found.suffix != ".gif":
        return found.suffix in VIDEO_SUFFIXES
    return "://" not in found.cell and is_clip(Path(found.cell))


def _find_all(
    patterns: Sequence[str], flag: str, suffixes: frozenset[str], excluded: str | None
) -> tuple[list[_Found], tuple[str, ...]]:
    """Every file the patterns find, sorted, each once, and the folder their roots share (as parts)."""
    found: dict[str, _Found] = {}
    roots = []
    for pattern in patterns:
        root, files = _find_url(pattern, flag, suffixes) if "://" in pattern else _find_local(pattern, flag, suffixes)
        roots.append(root)
        for item in files:
            if excluded is None or "://" in item.cell or os.path.commonpath([item.cell, excluded]) != excluded:
                found.setdefault(item.cell, item)
    if not found:
        quoted = " ".join(map(shlex.quote, patterns))
        raise SourceError(f"{flag} {quoted} finds only files inside --out, the outputs; give the inputs' folder")
    shared = roots[0]
    for root in roots[1:]:
        shared = tuple(a for a, b in itertools.takewhile(lambda ab: ab[0] == ab[1], zip(shared, root)))
    return sorted(found.values(), key=lambda item: item.parts), shared


def _nothing(flag: str, pattern: str, suffixes: frozenset[str], seen: Iterable[str]) -> SourceError:
    skipped = sorted({PurePath(name).suffix.lower() or "(none)" for name in seen})
    other = f"; it holds only {', '.join(skipped)} files" if skipped else ""
    return SourceError(
        f"{flag} {shlex.quote(pattern)} finds no image ({', '.join(sorted(suffixes))}){other}; check the pattern "
        "(quote it, so that the shell does not expand it)"
    )


def _find_local(pattern: str, flag: str, suffixes: frozenset[str]) -> tuple[tuple[str, ...], list[_Found]]:
    """A folder gives the images directly in it (`photos/**/*.jpg` reaches into sub-folders), a glob what it
    matches, a file itself. Hidden files (`.x.jpg`, as macOS leaves beside copies) are no one's photos."""
    path = os.path.abspath(os.path.expanduser(pattern))
    parts = PurePath(path).parts
    if any(char in pattern for char in _GLOB):
        depth = next(i for i, part in enumerate(parts) if _GLOB & set(part))
        root, names = parts[:depth], glob.glob(path, recursive=True)
    elif os.path.isdir(path):
        root = parts
        names = [os.path.join(path, name) for name in os.listdir(path) if not name.startswith(".")]
    elif os.path.isfile(path):
        root, names = parts[:-1], [path]
        if PurePath(path).suffix.lower() not in suffixes:
            raise SourceError(f"{flag} {pattern}: not an image file; use one of {', '.join(sorted(suffixes))}")
    else:
        raise SourceError(f"{flag} {pattern}: no such file or folder")
    files = [name for name in names if os.path.isfile(name)]
    kept = [_Found(name, PurePath(name).parts) for name in files if PurePath(name).suffix.lower() in suffixes]
    if not kept:
        raise _nothing(flag, pattern, suffixes, files)
    return root, kept


def _find_url(pattern: str, flag: str, suffixes: frozenset[str]) -> tuple[tuple[str, ...], list[_Found]]:
    """A bucket prefix (`s3://bucket/photos/`) gives the objects directly under it, a glob what it matches, an
    object itself; listed with fsspec, as the run reads them."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise SourceError(f"{flag} {pattern}: URLs need fsspec: pip install 'batchstyle[s3]'") from None
    protocol = pattern.split("://", 1)[0]
    try:
        fs, path = url_to_fs(pattern)
        path = path.rstrip("/")
        # fsspec keeps listings for the life of the process: a second run in one process (the API, a test) saw
        # none of the photos added since the first.
        fs.invalidate_cache(path)
        if _GLOB & set(path):
            depth = next(i for i, part in enumerate(path.split("/")) if _GLOB & set(part))
            root, listed = path.split("/")[:depth], fs.glob(path, detail=True)
        elif pattern.endswith("/") or fs.isdir(path):
            root, listed = path.split("/"), {entry["name"]: entry for entry in fs.ls(path, detail=True)}
        else:
            root, listed = path.split("/")[:-1], {path: fs.info(path)}
    except (ImportError, ValueError) as exc:  # no implementation for the protocol (s3fs not installed), or a bad URL
        raise SourceError(f"{flag} {pattern}: {exc}") from None
    except OSError as exc:
        raise SourceError(f"{flag} {pattern}: cannot list it ({exc})") from None
    names = [name for name, entry in listed.items() if entry.get("type") == "file"]  # one listing, no call per object
    kept = [
        _Found(f"{protocol}://{name}", (f"{protocol}:", *name.split("/")), listed[name])
        for name in names
        if PurePath(name).suffix.lower() in suffixes and not PurePath(name).name.startswith(".")
    ]
    if not kept:
        raise _nothing(flag, pattern, suffixes, names)
    return (f"{protocol}:", *root), kept
