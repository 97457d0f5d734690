"""Reading and validating a CSV manifest into rows, with every problem reported by row number.

Validation is complete before any work starts and never loads the network, so `batchstyle check` can vet a night's
manifest in seconds, and a run knows up front which rows cannot succeed.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import difflib
import io
import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from batchstyle.errors import UnusableInput
from batchstyle.images import DEEP_SUFFIXES, SUPPORTED_SUFFIXES, ImageError, check_image, output_size, temp_name
from batchstyle.model.layout import stride
from batchstyle.model.scales import scale_sizes, style_long_side
from batchstyle.options import OPTIONS, OptionError, Settings, make_settings, parse_weight_list, settings_problem
from batchstyle.reserved import fold, reserved_in
from batchstyle.store import StoreError, child, is_url, join, local_path, scrub, stage, stage_all, work_dir
from batchstyle.video import VIDEO_SUFFIXES, ClipInfo, is_clip, is_clip_output, output_problem, probe_clip, select

REQUIRED = ("content", "style")
ROW_ONLY = ("output", "style_blend_weights")
COLUMNS = (*REQUIRED, *ROW_ONLY, *OPTIONS)


class ManifestError(UnusableInput):
    """The manifest as a whole is unusable (exit code 2): nothing can be run from it."""


@dataclass(frozen=True)
class Problem:
    manifest: Path | str  # see Manifest.path
    row: int | None
    line: int | None
    column: str
    message: str

    def __str__(self) -> str:
        where = [str(self.manifest)]
        if self.row is not None:
            where.append(f"row {self.row}" + (f" (line {self.line})" if self.line is not None else ""))
        where.append(f"column {self.column}")
        return f"{', '.join(where)}: {self.message}"


@dataclass(frozen=True, slots=True)
class Row:
    number: int  # 1-based among data rows, as a spreadsheet user counts them below the header
    line: int | None  # line in the file, for editors; None for rows from no file (batchstyle.sources)
    content: Path
    styles: tuple[Path, ...]
    blend: tuple[float, ...]
    output: Path  # absolute, inside the output folder
    values: dict[str, Any]  # every option: defaults overlaid by this row's cells (shared: never change it)
    init_image: Path | None = None
    # Objects in a store: each local copy this row reads and the URL it was staged from, so that a worker on another
    # node (a Ray actor) stages its own; and the URL the output is put to, where --out is one.
    sources: tuple[tuple[Path, str], ...] = ()
    output_url: str | None = None

    def place(self, path: Path) -> str:
        """Where the user put one of this row's inputs, for the ledger and messages: an object's URL (scrubbed)
        rather than its local copy, which is named by a hash, differs between nodes and goes with the cache."""
        for local, url in self.sources:
            if local == path:
                return scrub(url)
        return str(path)

    def on_this_node(self, path: Path) -> Path:
        """One of this row's inputs as a file on the node that reads it: one the parent staged from a store is
        staged again here from its URL (into this node's own staging folder: a Ray actor on another node shares no
        folder with the driver); a path is used as given."""
        for local, url in self.sources:
            if local == path:
                return stage(url)
        return path


@dataclass
class Manifest:
    path: Path | str  # the CSV file; for rows from no file (batchstyle.sources), the flags that found them
    out_dir: Path  # where --out is a URL: the run's local folder (ledger, lock, outputs before they are put)
    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    total_rows: int = 0
    image_sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)  # (w, h) of every image checked
    clips: dict[Path, ClipInfo] = field(default_factory=dict)  # the header of every clip (video or frame folder)
    url: str | None = None  # the manifest's own URL, where it was read from a store
    out_url: str | None = None  # the prefix outputs are put under, where --out is a URL
    sources: dict[Path, str] = field(default_factory=dict)  # every staged input's URL, by its local copy

    def problem_rows(self) -> dict[int, list[Problem]]:
        found: dict[int, list[Problem]] = {}
        for problem in self.problems:
            if problem.row is not None:
                found.setdefault(problem.row, []).append(problem)
        return found


def default_out_dir(manifest: Path) -> Path:
    """Beside the manifest, named after it: `night.csv` writes to `night/`."""
    return manifest.parent / manifest.stem


def _split_paths(cell: str) -> list[str]:
    return [part.strip() for part in cell.split(";") if part.strip()]


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, COLUMNS, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# A field that starts with a quote runs to the quote that closes it ("" inside is one quote), then on to the next
# comma or line end; any other field runs to the next comma or line end, its quotes kept as text. This is how the csv
# module's default dialect reads, so a quoted field whose closing group is empty runs to the end of the file.
_FIELD = re.compile(r'"(?:[^"]+|"")*("?)[^,\r\n]*|[^,\r\n]*')
FIX_ENCODING = "save it as CSV UTF-8 (in Excel: Save As, CSV UTF-8)"


def _line_and_column(text: str) -> tuple[int, int]:
    """Where the character just after `text` lies, counting lines as the csv module does (LF, CRLF or CR)."""
    line = text.count("\n") + text.count("\r") - text.count("\r\n") + 1
    return line, len(text) - max(text.rfind("\n"), text.rfind("\r"))


def _unclosed_quote(text: str) -> int | None:
    """The index of a quote that opens a field and is never closed, or None."""
    pos = 0
    while pos < len(text):
        field = _FIELD.match(text, pos)
        assert field is not None  # the second alternative matches anywhere
        if text[pos] == '"' and not field.group(1):
            return pos
        pos = field.end()
        pos += 2 if text.startswith("\r\n", pos) else 1  # the comma or line end after the field
    return None


def _decode(path: Path, data: bytes) -> str:
    """The file's text, or a ManifestError naming the line of the first thing that keeps it from being UTF-8 CSV."""
    for bom, encoding in (
        (codecs.BOM_UTF32_LE, "UTF-32"),  # before UTF-16's: FF FE 00 00 starts with FF FE
        (codecs.BOM_UTF32_BE, "UTF-32"),
        (codecs.BOM_UTF16_LE, "UTF-16"),
        (codecs.BOM_UTF16_BE, "UTF-16"),
    ):
        if data.startswith(bom):
            raise ManifestError(
                f"{path}, line 1: the file is {encoding} text (it starts with a {encoding} byte order mark); "
                + FIX_ENCODING
            )
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0

    def where(offset: int) -> str:
        line, column = _line_and_column(data[start:offset].decode("utf-8", "replace"))
        return f"{path}, line {line}: byte 0x{data[offset]:02X} at column {column} (file offset {offset})"

    nul = data.find(b"\0", start)
    if nul >= 0:
        raise ManifestError(
            f"{where(nul)} is a NUL byte, which text never has: the file is UTF-16 text or no text at all "
            f"(an image or a spreadsheet saved as .csv); {FIX_ENCODING}"
        )
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"{where(start + exc.start)} is not UTF-8: the file was saved in another encoding "
            f"(Windows-1252, Latin-1, ...); {FIX_ENCODING}"
        ) from None


def _not_a_file(path: Path) -> str:
    """Why `path` cannot be read as the manifest file: a folder, a pipe or a device, or nothing at all."""
    if path.is_dir():
        found = sorted(path.glob("*.csv"))
        if not found:
            return "is a folder, and holds no .csv file; give the manifest CSV file's path"
        some = ", ".join(str(p) for p in found[:3]) + (", ..." if len(found) > 3 else "")
        return f"is a folder; give the manifest CSV file, e.g. {some}"
    if path.exists():
        return "is not a regular file (a named pipe, socket or device); give the manifest CSV file"
    return "no such manifest file"


def _delimiter_hint(header: list[str]) -> str:
    """A header read as one column that holds `;` or a tab: the file is separated by something other than commas,
    as spreadsheets set to many European locales save "CSV" (with `;`), and tab-separated exports do."""
    if len(header) != 1:
        return ""
    for delimiter, name in ((";", "semicolons (;)"), ("\t", "tabs")):
        if delimiter in header[0]:
            return (
                f"; the header is one column holding {name}, so the file is separated by {name}, not commas: save "
                "it as comma-separated CSV (in Excel: Save As, CSV UTF-8 (Comma delimited))"
            )
    return ""


# A manifest's columns, and each row's line (None for rows from no file) and its cells by column.
Table = tuple[list[str], list[tuple[int | None, dict[str, str]]]]


def _read_table(path: Path) -> Table:
    if not path.is_file():
        raise ManifestError(f"{path}: {_not_a_file(path)}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    text = _decode(path, data)
    quote = _unclosed_quote(text)
    if quote is not None:
        line, column = _line_and_column(text[:quote])
        raise ManifestError(
            f"{path}, line {line}: a quote opened here (column {column}) is never closed, so the rest of the file "
            'would be read as one cell; close the quote, or write a quote inside a cell as two ("")'
        )
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        while not any(cell.strip() for cell in header) or header[0].lstrip().startswith("#"):
            header = next(reader)  # blank lines and comments above the header
    except StopIteration:
        raise ManifestError(f"{path}: the manifest is empty; it needs a header line with content,style") from None
    except csv.Error as exc:
        raise ManifestError(f"{path}: not a CSV file ({exc})") from None
    columns = [name.strip().lower() for name in header]
    missing = [name for name in REQUIRED if name not in columns]
    if missing:
        hints = [f"{c!r} (did you mean {m}?)" for c in columns for m in missing if difflib.get_close_matches(c, [m])]
        hint = f"; found {', '.join(hints)}" if hints else ""
        raise ManifestError(
            f"{path}: the header {','.join(header)!r} has no {' or '.join(missing)} column{hint}"
            + (_delimiter_hint(header) or "; the first line must name the columns, e.g. content,style,output")
        )
    unknown = [name for name in columns if name and name not in COLUMNS]
    if unknown:
        raise ManifestError(
            f"{path}: unknown column {', '.join(repr(u) + _suggest(u) for u in unknown)}; "
            f"known columns: {', '.join(COLUMNS)}"
        )
    duplicated = sorted({name for name in columns if name and columns.count(name) > 1})
    if duplicated:
        raise ManifestError(f"{path}: column {', '.join(duplicated)} appears twice in the header")
    rows: list[tuple[int | None, dict[str, str]]] = []
    # A row is named by the line it starts on: a quoted cell may run over several, and reader.line_num is the last.
    starts = reader.line_num + 1
    try:
        for cells in reader:
            line, starts = starts, reader.line_num + 1
            if not any(cell.strip() for cell in cells) or cells[0].lstrip().startswith("#"):
                continue
            while len(cells) > len(columns) and not cells[-1].strip():
                cells = cells[:-1]  # trailing empty cells, as spreadsheets write them, say nothing
            if len(cells) > len(columns):
                raise ManifestError(
                    f"{path}, line {line}: {len(cells)} cells but the header has {len(columns)} columns "
                    f"(extra: {','.join(cells[len(columns) :])!r}); quote cells that contain commas, "
                    'e.g. "relu1_1,relu2_1"'
                )
            rows.append((line, {name: cell for name, cell in zip(columns, cells) if name}))
    except csv.Error as exc:
        raise ManifestError(f"{path}, line {reader.line_num}: not valid CSV ({exc})") from None
    if not rows:
        raise ManifestError(f"{path}: the manifest has a header but no rows; add one row per content/style pair")
    return columns, rows


def read_manifest(
    path: Path | str,
    defaults: dict[str, Any],
    out_dir: Path | str | None = None,
    fmt: str = "png",
    check_images: bool = True,
    source_table: Table | None = None,
    ledger_dir: Path | None = None,
    listed: Mapping[str, Mapping[str, Any]] | None = None,
) -> Manifest:
    """Parses and validates every row. Raises ManifestError when the file as a whole cannot be used: not UTF-8 text,
    a quote never closed, a row with more cells than the header, a header or rows missing. Problems of single rows
    are listed in `problems`, by row and column.

    `defaults` are the command line's option values; a row's non-empty cells override them. Rows share what their
    cells share: one Path per distinct file cell, one options dict per distinct set of option cells (never change a
    row's `values`: other rows hold the same dict). A large manifest repeats a few photos' folders and a few sets of
    options over many rows, and a dict of every option per row was most of reading 200,000 rows' memory.

    `source_table` holds rows that come from no file (`batchstyle.sources`: folders, globs, bucket prefixes): `path`
    then names the flags that found them in every problem, their cells are absolute paths or URLs, and `out_dir` is
    needed. Every check applies to them as to a CSV's rows; `listed` holds the entries of the objects among them
    from the listing that found them (`Sources.listed`), which staging reads instead of asking for each.

    `path`, `out_dir` and every file cell may be URLs (`batchstyle.store`): a relative cell of a manifest read from
    a store names an object beside it. Objects are staged as local copies, which the checks and job keys read; a
    URL `out_dir` gets a local folder for the ledger (`ledger_dir`, else one in the cache named after the URL).
    """
    url = str(path) if source_table is None and is_url(str(path)) else None
    if url is not None and url.lower().startswith("file://"):
        path, url = local_path(url), None
    out_url = str(out_dir) if out_dir is not None and is_url(str(out_dir)) else None
    if out_url is not None and out_url.lower().startswith("file://"):
        out_dir, out_url = local_path(out_url), None
    if url is not None:
        try:
            path = stage(url)
        except StoreError as exc:
            raise ManifestError(f"cannot read the manifest {exc}") from None
        if out_dir is None:  # beside the manifest, named after it, as for a file
            out_url = url.rsplit(".", 1)[0] + "/" if url.lower().endswith(".csv") else url + "-out/"
    if source_table is None:
        path = Path(path)
        columns, table = _read_table(path)
        base, out = path.parent, Path(out_dir) if out_dir is not None else default_out_dir(path)
    elif out_dir is None:
        raise ValueError("rows from no file need an output folder")
    else:
        columns, table = source_table[0], list(source_table[1])  # a copy: its rows are taken as they are read
        base, out = Path.cwd(), Path(out_dir)
    if out_url is not None:
        out = Path(ledger_dir) if ledger_dir is not None else work_dir(out_url)
    manifest = Manifest(path=path, out_dir=out, total_rows=len(table), url=url, out_url=out_url)
    sources = manifest.sources
    suffix = "." + fmt.lower().lstrip(".")
    image_ok: dict[Path, str | None] = {}
    image_size = manifest.image_sizes
    clip_or_not: dict[Path, bool] = {}  # is_clip asks the file system: once per file, not once per row

    def clip_file(file: Path) -> bool:
        found = clip_or_not.get(file)
        if found is None:
            found = clip_or_not[file] = is_clip(file)
        return found

    def image_problem(file: Path, clip_ok: bool = False) -> str | None:
        if clip_file(file):
            if clip_ok:
                return clip_problem(file)
            return f"{file} is a video or a folder; only content takes a clip, give an image here"
        if file not in image_ok:
            try:
                if check_images:
                    image_size[file] = check_image(file)
                elif not file.is_file():
                    raise ImageError(f"{file}: no such file")
                image_ok[file] = None
            except ImageError as exc:
                image_ok[file] = str(exc)
        return image_ok[file]

    def clip_problem(file: Path) -> str | None:
        """A clip's header, read once (streams, frame count, size): what `check` can know without decoding."""
        if file not in image_ok:
            try:
                manifest.clips[file] = info = probe_clip(file)
                image_size[file] = (info.width, info.height)
                image_ok[file] = None
            except ImageError as exc:
                image_ok[file] = str(exc)
        return image_ok[file]

    located: dict[str, Path] = {}

    def remote_of(cell: str) -> str | None:
        """The URL a cell names (a URL cell, or any relative cell of a manifest read from a store), or None."""
        return cell if is_url(cell) else join(url, cell) if url and not Path(cell).is_absolute() else None

    def fetched(remote: str | None) -> str | None:
        return None if remote is None or remote.lower().startswith("file://") else remote

    # The contents' and styles' objects are staged together before the rows are read: one after another, 10,000
    # photos under a prefix took 226 s of a HEAD and a GET each (docs/benchmarks.md#object-storage).
    distinct = {cells.get("content", "").strip() for _, cells in table}
    distinct.update(part for style in {cells.get("style", "") for _, cells in table} for part in _split_paths(style))
    staged = stage_all([u for cell in distinct if cell and (u := fetched(remote_of(cell))) is not None], known=listed)

    def at(cell: str) -> Path:
        """One Path per distinct cell: a row's own made 200,000 copies of four photos' paths. An object (a URL
        cell, or any relative cell of a manifest read from a store) is staged here, once."""
        found = located.get(cell)
        if found is None:
            remote = remote_of(cell)
            if fetched(remote) is None:
                found = _as_on_disk(base / local_path(remote or cell))
            else:
                assert remote is not None
                try:
                    got = staged.get(remote)
                    if isinstance(got, StoreError):
                        raise got
                    found = got if got is not None else stage(remote)
                except StoreError as exc:
                    found = work_dir(remote) / "missing" / (Path(cell).name or "object")
                    image_ok[found] = str(exc)
                    clip_or_not[found] = False
                sources[found] = remote
            located[cell] = found
        return found

    style_sets: dict[str, tuple[Path, ...]] = {}
    option_columns = tuple(name for name in columns if name in OPTIONS)
    option_sets: dict[tuple[str, ...], _Options] = {}

    def options_of(raw: tuple[str, ...]) -> _Options:
        """What a set of option cells makes: the values, the files they name, and their problems, once per set."""
        problems: list[tuple[str, str]] = []
        values = dict(defaults)
        for name, cell in zip(option_columns, raw):
            if cell.strip():
                try:
                    values[name] = OPTIONS[name].from_text(cell)
                except OptionError as exc:
                    problems.append((name, str(exc)))
        files: list[tuple[str, Path]] = []
        init_image = None
        if values["init"] not in ("content", "noise"):
            init_image = at(values["init"])
            files.append(("init", init_image))
            problem = image_problem(init_image)
            if problem:
                problems.append(("init", problem))
        # Masks are paths relative to the manifest, like the images; they are kept resolved in the row's values.
        masks = tuple(at(mask) for mask in values["style_masks"])
        for mask in masks:
            problem = image_problem(mask)
            if problem:
                problems.append(("style_masks", problem))
        values["style_masks"] = tuple(str(mask) for mask in masks)
        files += [("style_masks", mask) for mask in masks]
        later: list[tuple[str, str]] = []  # after the masks' count, which depends on the row's styles
        if values["content_mask"]:
            content_mask = at(values["content_mask"])
            files.append(("content_mask", content_mask))
            problem = image_problem(content_mask)
            if problem:
                later.append(("content_mask", problem))
            values["content_mask"] = str(content_mask)
        if problems or later:
            return _Options(values, init_image, len(masks), problems, later, files, None, None, ("", 0, 0, 0))
        settings = make_settings(values)
        return _Options(
            values,
            init_image,
            len(masks),
            problems,
            later,
            files,
            settings,
            settings_problem(settings),
            _thinnest(settings),
        )

    blends: dict[int, tuple[float, ...]] = {}
    planned: list[tuple[Row, str, _Key]] = []
    paths = _Paths(out)
    inputs: dict[Path, _Input] = {}  # every file any row reads, problem rows' too, with the first row that reads it
    unplanned: list[_Output] = []  # rows with other problems: their outputs are checked as well
    table.reverse()  # rows are taken from the end: each row's cells are let go once read
    number = 0
    while table:
        line, cells = table.pop()
        number += 1
        problems: list[tuple[str, str]] = []
        content_cell = cells.get("content", "").strip()
        style_cell = cells.get("style", "")
        styles = style_sets.get(style_cell)
        if styles is None:
            styles = style_sets[style_cell] = tuple(at(cell) for cell in _split_paths(style_cell))
        if not content_cell:
            problems.append(("content", "empty; give the content image's path"))
        if not styles:
            problems.append(("style", "empty; give one style image path, or several separated by ';'"))
        content = at(content_cell) if content_cell else base
        if content_cell:
            inputs.setdefault(content, (number, "content", content))
        for style in styles:
            inputs.setdefault(style, (number, "style", style))
        if content_cell:
            problem = image_problem(content, clip_ok=True)
            if problem:
                problems.append(("content", problem))
        for style in styles:
            problem = image_problem(style)
            if problem:
                problems.append(("style", problem))

        raw = tuple(cells.get(name, "") for name in option_columns)
        options = option_sets.get(raw)
        if options is None:
            options = option_sets[raw] = options_of(raw)
        for column, file in options.files:
            inputs.setdefault(file, (number, column, file))
        problems += options.problems
        miscounted = options.masks > 0 and options.masks != len(styles)
        if miscounted:
            problems.append(
                (
                    "style_masks",
                    f"{options.masks} mask{'s' if options.masks != 1 else ''} for {len(styles)} style image"
                    f"{'s' if len(styles) != 1 else ''}; give one mask per style, ';'-separated in the styles' order",
                )
            )
        problems += options.later
        values, settings = options.values, None if miscounted else options.settings

        blend = blends.get(len(styles))
        if blend is None:
            blend = blends[len(styles)] = (1.0,) * len(styles)
        raw_blend = cells.get("style_blend_weights", "").strip()
        if raw_blend:
            try:
                blend = parse_weight_list(raw_blend)
                if len(blend) != len(styles):
                    problems.append(
                        (
                            "style_blend_weights",
                            f"{len(blend)} weights for {len(styles)} style images; give one each",
                        )
                    )
            except OptionError as exc:
                problems.append(("style_blend_weights", str(exc)))
        # Cross-option checks run unless an option cell itself failed (its default would stand in and mislead), so
        # one `check` reports them next to a row's other problems. The only one is about style_layer_weights.
        if settings is not None:
            if options.cross:
                problems.append(("style_layer_weights", options.cross))
            problems += _too_thin(options.thinnest, content if content_cell else None, styles, image_size)

        clip = manifest.clips.get(content) if content_cell else None
        video_cells = [name for name in ("frames", "every") if cells.get(name, "").strip()]
        if content_cell and clip is None and video_cells and not clip_file(content):
            problems += [(name, "only video rows take it; the content is an image") for name in video_cells]
        if (
            clip is not None
            and settings is not None
            and not options.cross
            and not select(clip.frames, settings.frame_span(), settings.every)
        ):
            problems.append(
                ("frames", f"selects no frame of {content.name}, which has {clip.frames}; use START below that")
            )
        output_cell = cells.get("output", "").strip()
        if output_cell and content_cell and clip_file(content):
            output = out / output_cell
            if not is_clip_output(output):
                problems.append(
                    (
                        "output",
                        f"{output_cell!r}: a clip's output is a video ({', '.join(sorted(VIDEO_SUFFIXES))}) or a "
                        "folder (a name without extension)",
                    )
                )
            elif clip is not None and output_problem(clip, output):
                problems.append(("output", str(output_problem(clip, output))))
        elif output_cell:
            output = out / output_cell
            if output.suffix.lower() not in SUPPORTED_SUFFIXES:
                problems.append(
                    (
                        "output",
                        f"{output_cell!r} has no supported extension ({', '.join(sorted(SUPPORTED_SUFFIXES))})",
                    )
                )
        else:
            stem = f"{content.stem}-{'+'.join(s.stem for s in styles)}" if content_cell and styles else f"row{number}"
            # A clip keeps its kind: a video gives the same container, a folder of frames a folder.
            kind = (content.suffix.lower() if content.suffix.lower() in VIDEO_SUFFIXES else "") if clip else suffix
            if clip is not None and kind and output_problem(clip, out / f"{stem}{kind}"):
                kind = ".mkv"  # a WebM whose audio WebM cannot hold unchanged
            output = out / f"{stem}{kind}"
        if values["bit_depth"] == 16 and output.suffix.lower() not in DEEP_SUFFIXES:
            problems.append(
                ("bit_depth", f"16 bits per channel need a .png or .tif output, not {output.name}: change the output")
            )
        key, inside = paths.output(output)
        if not inside:
            problems.append(
                (
                    "output",
                    f"{output_cell!r} would land outside the output folder {out}; use a path "
                    "relative to it without '..'",
                )
            )
        for column, message in problems:
            manifest.problems.append(Problem(path, number, line, column, message))
        if not problems:
            planned.append(
                (Row(number, line, content, styles, blend, output, values, options.init_image), output_cell, key)
            )
        elif not any(column == "output" for column, _ in problems):
            unplanned.append((number, line, output, output_cell, key))

    outputs = _resolve_output_clashes(manifest, planned, paths)
    _refuse_unsafe_outputs(manifest, sorted(outputs + unplanned), list(inputs.values()), paths)
    if sources or out_url or url:
        _with_urls(manifest)
    return manifest


def _as_on_disk(path: Path) -> Path:
    """`path`, or the file it names in the other Unicode normalisation. A name typed or pasted in NFD (as macOS
    writes names) names no file on Linux, where the photo's name was written in NFC, and the reverse: the bytes
    differ though the names read the same. macOS and Windows match either form themselves."""
    text = str(path)
    if text.isascii() or path.exists():
        return path
    for form in ("NFC", "NFD"):
        other = Path(unicodedata.normalize(form, text))
        if other != path and other.exists():
            return other
    return path


def _with_urls(manifest: Manifest) -> None:
    """Rows told the URLs of the objects they read and of their output; problems told the objects' URLs in place
    of their local copies' paths (which a user never gave)."""
    sources, out_url = manifest.sources, manifest.out_url
    for index, row in enumerate(manifest.rows):
        files = [row.content, *row.styles, *([row.init_image] if row.init_image else [])]
        files += [Path(mask) for mask in row.values["style_masks"]]
        files += [Path(row.values["content_mask"])] if row.values["content_mask"] else []
        output_url = child(out_url, row.output.relative_to(manifest.out_dir).as_posix()) if out_url else None
        found = tuple((file, sources[file]) for file in dict.fromkeys(files) if file in sources)
        manifest.rows[index] = dataclasses.replace(row, sources=found, output_url=output_url)
    shown = {str(file): scrub(url) for file, url in sources.items()}
    if manifest.url:
        shown[str(manifest.path)] = scrub(manifest.url)
    if manifest.problems and shown:
        pattern = re.compile("|".join(re.escape(file) for file in sorted(shown, key=len, reverse=True)))
        manifest.problems = [
            dataclasses.replace(
                problem,
                manifest=shown.get(str(problem.manifest), problem.manifest),
                message=pattern.sub(lambda m: shown[m.group(0)], problem.message),
            )
            for problem in manifest.problems
        ]


@dataclass(frozen=True)
class _Options:
    """What one set of option cells makes of a row, shared by every row with the same cells."""

    values: dict[str, Any]
    init_image: Path | None
    masks: int  # style masks given
    problems: list[tuple[str, str]]  # of the option cells, the init image and the masks, in a row's column order
    later: list[tuple[str, str]]  # the content mask's, listed after the masks' count
    files: list[tuple[str, Path]]  # (column, path) of each file the options name
    settings: Settings | None  # None where a cell failed: its default would stand in and mislead
    cross: str | None  # settings_problem
    thinnest: tuple[str, int, int, int]  # see _too_thin


def _thinnest(settings: Settings) -> tuple[str, int, int, int]:
    """The deepest tapped layer, its stride, and the smallest scale's long side for the content and the styles."""
    deepest = max((*settings.content_layers, *settings.style_layers), key=stride)
    smallest = scale_sizes(settings.min_size, settings.size)[0]
    return deepest, stride(deepest), smallest, style_long_side(smallest, settings.style_scale)


def _too_thin(
    thinnest: tuple[str, int, int, int],
    content: Path | None,
    styles: tuple[Path, ...],
    sizes: dict[Path, tuple[int, int]],
) -> list[tuple[str, str]]:
    """Every pooling halves the image: at its smallest scale an image must keep at least one pixel at the deepest
    tapped layer, or the network fails mid-run with a cryptic error. Found here, it names the row and the fix.
    `thinnest` is the row's settings' `_thinnest`, worked out once per set of options."""
    deepest, need, smallest, style_side = thinnest
    found = []
    checks = [("content", content, smallest)] if content is not None else []
    checks += [("style", style, style_side) for style in styles]
    for column, file, long_side in checks:
        if file in sizes:
            w, h = output_size(*sizes[file], long_side)
            if min(w, h) < need:
                found.append(
                    (
                        column,
                        f"{file.name} is {w}x{h} px at its smallest scale, too thin for {need} px at "
                        f"{deepest}; raise size or min_size (or style_scale), or crop the image",
                    )
                )
    return found


_Key = tuple[str, ...]
_Output = tuple[int, int | None, Path, str, _Key]  # (row, line, output, its cell, its key) of an output to check


class _Folder:
    """A folder as the checks see it: resolved once, its clash key, and from one listing (not a system call per
    row) which of its names are links and which are folders. A rerun's output folder holds 200,000 names."""

    __slots__ = ("path", "resolved", "key", "_listing", "_name_max", "inside")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.resolved = path.resolve()
        self.key: _Key = tuple(fold(part) for part in self.resolved.parts)
        self._listing: tuple[frozenset[str], frozenset[str]] | None = None
        self._name_max: int | None = None
        self.inside: bool | None = None  # in the output folder (`_Paths.output`)

    def listing(self) -> tuple[frozenset[str], frozenset[str]]:
        """(links, folders) among its names; nothing where it is not there (yet) or cannot be listed. A name too
        long for it is in neither, as os.path.islink and isdir say (pathlib's raise ENAMETOOLONG)."""
        if self._listing is None:
            links, folders = set(), set()
            with contextlib.suppress(OSError), os.scandir(self.path) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if entry.is_symlink():
                            links.add(entry.name)
                        if entry.is_dir():
                            folders.add(entry.name)
            self._listing = frozenset(links), frozenset(folders)
        return self._listing

    def name_max(self) -> int:
        """The longest name, in bytes, its file system holds (that of its nearest parent there, if it is not)."""
        if self._name_max is None:
            self._name_max = _name_max(self.resolved)
        return self._name_max


def _name_max(folder: Path) -> int:
    if hasattr(os, "pathconf"):  # not on Windows, whose file systems hold 255 UTF-16 units
        for where in (folder, *folder.parents):
            try:
                found = os.pathconf(where, "PC_NAME_MAX")
            except (OSError, ValueError):
                continue
            return found if found > 0 else DEFAULT_NAME_MAX
    return DEFAULT_NAME_MAX


DEFAULT_NAME_MAX = 255  # bytes in a name: ext4, XFS, Btrfs, APFS, tmpfs
# A temp file's name is its output's and this much more: a dot, the marker, a process id (7 digits at most: Linux's
# largest pid_max is 4194304) and 16 hex digits. An output name must leave room for it, or it cannot be saved.
TEMP_ROOM = len(os.fsencode(temp_name(Path("x")).name)) - 1 - len(str(os.getpid())) + 7


class _Paths:
    """Resolved paths and clash keys, each folder resolved once: a large manifest names a few folders many times,
    and resolving every path in full (a system call per part) cost more than reading the manifest.

    Names that differ only in letter case or Unicode normalisation are one file on Windows and macOS, so their keys
    are equal everywhere: a manifest checked on Linux must not overwrite one row's output with another's, or an
    input, when it runs on a laptop. Symlinks are resolved, so a link never hides that two names are one file. A key
    is the path's parts, so that a folder's key starts the keys of everything in it.

    Inputs are kept once resolved (every row asks for its style's), outputs are not: each is asked for once, and
    200,000 of them kept were 100 MB."""

    def __init__(self, out: Path) -> None:
        self._folders: dict[Path, _Folder] = {}
        self._files: dict[Path, tuple[Path, _Key]] = {}
        self.out = self.resolve(out)

    def folder(self, folder: Path) -> _Folder:
        found = self._folders.get(folder)
        if found is None:
            found = self._folders[folder] = _Folder(folder)
        return found

    def resolve(self, path: Path) -> Path:
        return self.resolve_with_key(path)[0]

    def key(self, path: Path) -> _Key:
        return self.resolve_with_key(path)[1]

    def resolve_with_key(self, path: Path, keep: bool = True) -> tuple[Path, _Key]:
        found = self._files.get(path)
        if found is None:
            folder = self.folder(path.parent)
            if self._plain(path.name, folder):
                found = folder.resolved / path.name, (*folder.key, fold(path.name))
            else:
                resolved = path.resolve()
                found = resolved, tuple(fold(part) for part in resolved.parts)
            if keep:
                self._files[path] = found
        return found

    def output(self, path: Path) -> tuple[_Key, bool]:
        """An output's key, and whether it lands in the output folder (asked of its folder once, for a plain
        name: `is_relative_to` per row cost a second for 200,000 rows)."""
        name, folder = path.name, self.folder(path.parent)
        if not self._plain(name, folder):
            resolved, key = self.resolve_with_key(path, keep=False)
            return key, resolved.is_relative_to(self.out)
        if folder.inside is None:
            folder.inside = folder.resolved.is_relative_to(self.out)
        return (*folder.key, fold(name)), folder.inside

    def is_folder(self, path: Path) -> bool:
        return path.name in self.folder(path.parent).listing()[1]

    @staticmethod
    def _plain(name: str, folder: _Folder) -> bool:
        """A name that resolves to itself in its folder: not '..', nor a link."""
        return name not in ("", "..") and name not in folder.listing()[0]


_Input = tuple[int | None, str, Path]  # (row, column, path) of a file a run reads; the manifest itself has no row
_FIX = "give the output another name, or the run another --out folder"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode's control characters (category Cc): C0, DEL and C1


def _refuse_unsafe_outputs(manifest: Manifest, outputs: list[_Output], inputs: list[_Input], paths: _Paths) -> None:
    """A row whose output would destroy a file that is not its own to write fails, before any work, with a problem
    in its output column: an input of any row (a photo was replaced by its own stylization: `v.jpg,s.jpg,v.jpg`
    with `--out .`), the manifest, a file batchstyle writes itself (`reserved.reserved_in`: the report, the ledger,
    temp names, iterates and frames folders), a folder already at an image's name, or the output folder itself.
    A name with a control character is refused too: a line break in a file name breaks every listing and script
    that meets it; and so is a name longer than its folder's file system holds (a 300-character name passed
    `check` and failed its row at run time). The other rows still run."""
    out_key = paths.key(paths.out)
    read: dict[_Key, _Input] = {}
    itself: list[_Input] = [(None, "manifest", manifest.path)] if isinstance(manifest.path, Path) else []
    for item in [*itself, *inputs]:
        read.setdefault(paths.key(item[2]), item)
    holding: dict[_Key, _Input] = {}  # every folder above an input: the first input inside it
    for key, item in read.items():
        for depth in range(len(key) - 1, 0, -1):
            if key[:depth] in holding:
                break  # its own parents were entered with it
            holding[key[:depth]] = item

    def whose(item: _Input, number: int) -> str:
        row, column, path = item
        if row is None:
            return f"the manifest {path}"
        owner = "this row's" if row == number else f"row {row}'s"
        return f"{owner} {column.replace('_', ' ').removesuffix('s')} {path}"

    def hazard(number: int, output: Path, cell: str, key: _Key) -> str | None:
        name = repr(cell) if cell else f"the generated output name {output.name!r}"
        if _CONTROL.search(cell or output.name):
            return f"{name} holds a control character (a line break or tab); remove it from the output name"
        too_long = _name_too_long(cell or output.name, paths.folder(output.parent).name_max())
        if too_long:
            return f"{name} {too_long}"
        if key == out_key:  # it lies in the output folder (checked), so this is the folder itself
            return f"{name} is the output folder itself; name a file or folder inside it"
        reserved = reserved_in(key[len(out_key) :])
        if reserved:
            return f"{name} {reserved}; {_FIX}"
        if output.suffix and paths.is_folder(output):
            return f"{name} is a folder already at {output}; move it away, or {_FIX}"
        found = read.get(key)
        if found is not None:
            same = paths.resolve_with_key(output, keep=False)[0] == paths.resolve(found[2])
            alike = "" if same else " (the same file on Windows and macOS: only letter case or normalisation differs)"
            return f"{name} would overwrite {whose(found, number)}{alike}; {_FIX}"
        if key in holding:
            return f"{name} would replace the folder that holds {whose(holding[key], number)}; {_FIX}"
        inside = next((read[key[:depth]] for depth in range(len(key) - 1, 0, -1) if key[:depth] in read), None)
        if inside is not None:
            return f"{name} would be written into {whose(inside, number)}; {_FIX}"
        return None

    refused = set()
    for number, line, output, cell, key in outputs:
        problem = hazard(number, output, cell, key)
        if problem is not None:
            manifest.problems.append(Problem(manifest.path, number, line, "output", problem))
            refused.add(number)
    if refused:
        manifest.rows = [row for row in manifest.rows if row.number not in refused]


def _name_too_long(name: str, limit: int) -> str | None:
    """Why an output name (a cell's path, or a generated name) cannot be made in a folder whose names hold at most
    `limit` bytes, or None. Its file name must leave room for the temp file it is saved through (`TEMP_ROOM`)."""
    if len(os.fsencode(name)) <= limit - TEMP_ROOM:
        return None
    *folders, last = PurePath(name).parts
    for part in folders:
        if len(os.fsencode(part)) > limit:
            return (
                f"has a folder name of {len(os.fsencode(part))} bytes; give a shorter output name: names there hold "
                f"at most {limit} bytes"
            )
    size = len(os.fsencode(last))
    if size <= limit - TEMP_ROOM:
        return None
    return (
        f"is a file name of {size} bytes; give a shorter output name: names there hold at most {limit} bytes, and "
        f"the run saves each output through a temp file {TEMP_ROOM} bytes longer, so at most {limit - TEMP_ROOM}"
    )


def _resolve_output_clashes(manifest: Manifest, planned: list[tuple[Row, str, _Key]], paths: _Paths) -> list[_Output]:
    """Explicit outputs must be unique, letter case aside (an error names both rows); generated names that collide
    with any other output get the row number appended, so a manifest of repeated pairs with different options just
    works. The rows kept go to `manifest.rows`, and their outputs are returned."""

    def output_problem(row: Row, message: str) -> None:
        manifest.problems.append(Problem(manifest.path, row.number, row.line, "output", message))

    kept: list[_Output] = []
    explicit: dict[_Key, tuple[Row, str]] = {}
    generated_count: dict[_Key, int] = {}
    for row, cell, key in planned:
        if not cell:
            generated_count[key] = generated_count.get(key, 0) + 1
        elif key in explicit:
            first, first_cell = explicit[key]
            if paths.resolve_with_key(row.output, keep=False)[0] == paths.resolve_with_key(first.output, keep=False)[0]:
                output_problem(row, f"same output {cell!r} as row {first.number}; give each row its own output")
            else:
                output_problem(
                    row,
                    f"output {cell!r} differs from row {first.number}'s {first_cell!r} only in letter case or "
                    "Unicode normalisation, which name one file on Windows and macOS; give each row its own output",
                )
        else:
            explicit[key] = row, cell
            manifest.rows.append(row)
            kept.append((row.number, row.line, row.output, cell, key))
    taken: dict[_Key, Row] = {key: row for key, (row, _) in explicit.items()}
    for row, cell, key in planned:
        if cell:
            continue
        if key in explicit or generated_count[key] > 1:
            row = dataclasses.replace(
                row, output=row.output.with_name(f"{row.output.stem}-row{row.number}{row.output.suffix}")
            )
            key = paths.output(row.output)[0]
        if key in taken:  # a renamed name that another row's output already has: never let two rows share a file
            output_problem(
                row,
                f"the generated output name {row.output.name!r} is row {taken[key].number}'s output too; "
                "give this row its own output",
            )
            continue
        taken[key] = row
        manifest.rows.append(row)
        kept.append((row.number, row.line, row.output, cell, key))
    manifest.rows.sort(key=lambda r: r.number)
    return kept
