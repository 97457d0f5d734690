"""A look at what a run made: a contact sheet (PNG) and a self-contained HTML report, written into the output folder.

A nightly batch is judged by eye the next morning, so both are built from the ledger alone (the source of truth for
what each row did) plus the images it names: one PNG to glance at, one HTML page to dig into (parameters, cache hits,
loss curves). The page loads nothing from anywhere -- every image is an inline data URI and there is no script -- so
it can be mailed, archived or opened on an air-gapped box, and shows the same thing years later.

Nothing here may stop the report from being written: a row whose files are gone, unreadable or never recorded gets a
placeholder, and a failed row shows its error where its output would be.

A run whose outputs went to a bucket (a URL `--out`) is reported the same way: the ledger is in the run's local folder,
the outputs and any inputs in buckets are read through their staged copies (`batchstyle.store`), and the two files are
built in that local folder, then each put to the output prefix in one request, so each appears there whole.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from batchstyle import store
from batchstyle.errors import UnusableInput
from batchstyle.images import ImageError, load_image, read_metadata, save_image_atomic, write_file_atomic
from batchstyle.reserved import CONTACT_SHEET_NAME, HTML_NAME, fold
from batchstyle.run.ledger import (
    LEDGER_NAME,
    STATUSES,
    Record,
    ledger_files,
    read_records,
    read_runs,
    unpack_history,
)
from batchstyle.video import frames_folder, is_clip, is_clip_output, read_frames

# Inputs are cached at this multiple of the thumbnail box, so a wide image still has pixels left for the sheet.
_MAX_ASPECT = 2.0
_STATUS_COLOURS = {"done": (30, 130, 60), "failed": (190, 40, 40), "pending": (170, 120, 0), "running": (40, 90, 180)}
# One curve per recorded term; a term with no colour of its own here takes the next of _SPARE_COLOURS.
_CURVE_COLOURS = {
    "content": "#1f77b4",
    "style": "#d62728",
    "tv": "#2ca02c",
    "temporal": "#9467bd",
    "laplacian": "#ff7f0e",
}
_FACE_COLOUR = (255, 200, 0)  # the boxes of the faces faces=auto found, drawn on the content's thumbnail
_SPARE_COLOURS = ("#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_FINAL_COLUMNS = ("content", "style", "tv")  # the terms whose kept-iterate values have ledger columns of their own


@dataclass(frozen=True)
class ReportFiles:
    """Where the report was written: the local files, and (a URL --out) the objects they were put to, scrubbed."""

    contact_sheet: Path
    html: Path
    contact_sheet_url: str | None = None
    html_url: str | None = None


# --------------------------------------------------------------------------------------------------- gathering


@dataclass(frozen=True)
class _Place:
    """What a report is of, as its title and summary show it: the output folder, or a URL --out (scrubbed) and the
    local folder that holds its ledger."""

    shown: str
    name: str
    ledger: Path | None = None

    @classmethod
    def of(cls, out_dir: Path, out_url: str | None) -> _Place:
        if out_url is not None:
            shown = store.scrub(out_url)
            return cls(shown, store.name_of(shown) or shown, out_dir.resolve())
        folder = out_dir.resolve()
        return cls(str(folder), folder.name or str(folder))


@dataclass
class _Input:
    """One image a row names: where it was looked for, and the picture or why there is none."""

    role: str  # "content", "style" or "output"
    label: str  # caption under the thumbnail
    path: Path | None  # the file read; None: the ledger does not say which, or an object's copy could not be had
    image: Image.Image | None = None  # reduced to fit (thumb * _MAX_ASPECT, thumb), never enlarged
    problem: str | None = None  # "missing", "unreadable" or "not recorded" when image is None
    weight: str | None = None  # a style's blend weight, when the row blends several
    url: str | None = None  # an object's URL, scrubbed: shown in place of its local copy, named by a hash
    detail: str | None = None  # why an object could not be read, in words (the store's error)

    @property
    def where(self) -> str | None:
        """Where the image is, as the user gave it: an object's URL rather than the path of its staged copy."""
        return self.url or (str(self.path) if self.path is not None else None)

    @property
    def name(self) -> str:
        if self.url is not None:
            return store.name_of(self.url)
        return self.path.name if self.path is not None else ""


@dataclass
class _Row:
    record: Record
    anchor: str
    output_name: str  # what to call the output in captions; the ledger's name for an invalid row is internal
    inputs: list[_Input] = field(default_factory=list)  # content, then styles
    output: _Input | None = None  # None: show the error box instead
    params: dict[str, Any] = field(default_factory=dict)
    blend: list[str] = field(default_factory=list)
    recovered: bool = False  # inputs read back from the manifest because the ledger kept none
    strip: Image.Image | None = None  # a clip: evenly spaced finished frames side by side

    @property
    def history(self) -> dict[str, np.ndarray]:
        return unpack_history(self.record.history)


class _Thumbs:
    """Loads each file once: a night's manifest typically pairs many contents with a handful of styles."""

    def __init__(self, thumb: int) -> None:
        self.box = (round(thumb * _MAX_ASPECT), thumb)
        self._seen: dict[Path, tuple[Image.Image | None, str | None]] = {}

    def get(self, path: Path) -> tuple[Image.Image | None, str | None]:
        if path not in self._seen:
            if is_clip(path) and path.exists():  # a clip (content or output) shows its first frame
                try:
                    img = next(image for _, image in read_frames(path, [0]))
                    img.thumbnail(self.box, Image.Resampling.LANCZOS)
                    self._seen[path] = (img, None)
                except (ImageError, OSError, ValueError, StopIteration):
                    self._seen[path] = (None, "unreadable")
            elif not path.is_file():
                self._seen[path] = (None, "missing")
            else:
                try:
                    img = load_image(path)
                    img.thumbnail(self.box, Image.Resampling.LANCZOS)
                    self._seen[path] = (img, None)
                except (ImageError, OSError, ValueError):
                    self._seen[path] = (None, "unreadable")
        return self._seen[path]


class _Staged:
    """Local copies of the objects a report shows (a URL --out's outputs, inputs in buckets), each fetched once per
    node and version (`store.stage`: the run's own staged inputs are found again, not fetched twice). An object that
    cannot be had any more is its problem and the store's words for it, never an exception: a report of a night
    whose photos were deleted since still shows every row."""

    def __init__(self) -> None:
        self._found: dict[str, Path | tuple[str, str]] = {}

    def fetch(self, urls: Iterable[str]) -> None:
        """Many objects at once (`store.stage_all`): a night's photos wait on the store's latency, not this machine."""
        wanted = [url for url in dict.fromkeys(urls) if url not in self._found]
        try:
            found = store.stage_all(wanted)
        except OSError:  # the staging folder cannot be written: each object says so on its own in `get`
            return
        for url, copy in found.items():
            self._found[url] = copy if isinstance(copy, Path) else self._problem(copy)

    def get(self, url: str) -> tuple[Path | None, str | None, str | None]:
        """(the local copy, or None with the placeholder's word and the store's error in words)."""
        if url not in self._found:
            try:
                self._found[url] = store.stage(url)
            except (store.StoreError, OSError) as exc:
                self._found[url] = self._problem(exc, url)
        found = self._found[url]
        return (found, None, None) if isinstance(found, Path) else (None, *found)

    @staticmethod
    def _problem(exc: Exception, url: str = "") -> tuple[str, str]:
        if isinstance(exc, store.StoreError):
            word = "missing" if exc.cause == store.NO_SUCH_OBJECT else "unreadable"
            return word, store.scrub_text(str(exc))
        return "unreadable", store.scrub_text(f"{store.scrub(url)}: {exc}")


def _is_object(text: str) -> bool:
    """A cell that names an object in a store (not a `file://` URL, which is a path)."""
    return store.is_url(text) and not text.lower().startswith("file://")


def _locate(text: str, out_dir: Path) -> Path:
    """Where a path the ledger recorded is now.

    The engine records paths as the run saw them: relative to the directory the run was started from when the
    manifest was named relatively. That directory is unknown, but the output folder lies under it, so the current
    directory and then the output folder's ancestors are tried; the path as written is returned if none has it.
    """
    path = Path(text)
    if path.is_absolute():
        return path
    base = out_dir.resolve()
    for folder in (Path.cwd(), base, *base.parents):
        candidate = folder / path
        if candidate.exists():
            return candidate
    return path


def _manifest_cells(run: dict[str, Any] | None, out_dir: Path, memo: dict[Path, list | None]) -> tuple[Path, list]:
    """The data rows of the manifest a run read, or an empty list when they cannot be trusted to be the same.

    A row that fails validation is recorded without its paths, yet its content and style are what one wants to see
    next to the error. The manifest is read back only if it has not been modified since the run started.
    """
    if not run or not run.get("manifest"):
        return Path(), []
    path = _locate(str(run["manifest"]), out_dir)
    if path not in memo:
        memo[path] = None
        try:
            if path.stat().st_mtime <= float(run["started"]):
                from batchstyle.manifest import _read_table

                memo[path] = _read_table(path)[1]
        except Exception:  # a report without the recovered paths is still a report
            memo[path] = None
    return path, memo[path] or []


def _params(record: Record) -> dict[str, Any]:
    try:
        value = json.loads(record.params) if record.params else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _gather(
    records: list[Record],
    out_dir: Path,
    thumb: int,
    out_url: str | None = None,
    listed: frozenset[str] = frozenset(),
    staged: _Staged | None = None,
) -> list[_Row]:
    """Each record with its pictures. With a URL --out (`out_url`), a row's output is the object under its name:
    in `listed` (the prefix's one listing) or missing, read through its staged copy."""
    thumbs = _Thumbs(thumb)
    staged = staged or _Staged()
    staged.fetch(
        [
            *(cell for r in records for cell in [r.content or "", *(r.styles or "").split(";")] if _is_object(cell)),
            *(store.child(out_url, r.output) for r in records if out_url is not None and r.output in listed),
        ]
    )
    runs = read_runs(out_dir)
    manifests: dict[Path, list | None] = {}
    anchors: Counter[str] = Counter()
    rows = []
    for index, record in enumerate(records):
        base_anchor = f"row-{record.row}" if record.row is not None else f"entry-{index + 1}"
        anchors[base_anchor] += 1
        anchor = base_anchor if anchors[base_anchor] == 1 else f"{base_anchor}-{anchors[base_anchor]}"
        invalid = record.key == "invalid"
        output_name = "(not planned)" if invalid else record.output
        content = record.content or ""
        styles = [s for s in (record.styles or "").split(";") if s]
        row = _Row(record, anchor, output_name, params=_params(record))
        if invalid and not content and not styles and record.row is not None:
            manifest, cells = _manifest_cells(runs.get((record.ledger, record.run_id or -1)), out_dir, manifests)
            if 0 < record.row <= len(cells):
                found = cells[record.row - 1][1]
                content = str(manifest.parent / found["content"].strip()) if found.get("content", "").strip() else ""
                styles = [str(manifest.parent / s.strip()) for s in found.get("style", "").split(";") if s.strip()]
                row.recovered = bool(content or styles)
                if found.get("output", "").strip():
                    row.output_name = found["output"].strip() + " (not planned)"
        row.inputs.append(_with_faces(_input("content", "content", content, out_dir, thumbs, staged), row.params))
        for number, style in enumerate(styles or [""], start=1):
            label = "style" if len(styles) < 2 else f"style {number}"
            row.inputs.append(_input("style", label, style, out_dir, thumbs, staged))
        output_path = out_dir / record.output
        url = None if out_url is None else store.child(out_url, record.output)
        exists = output_path.is_file() if url is None else record.output in listed
        if record.status == "done" or (record.status in ("pending", "running") and exists):
            label = "output" if record.status == "done" else f"output ({record.status})"
            if url is None:
                row.output = _Input("output", label, output_path, *thumbs.get(output_path))
            elif not exists:
                detail = f"{store.scrub(url)}: no such object under {store.scrub(out_url or '')}"
                row.output = _Input("output", label, None, problem="missing", url=store.scrub(url), detail=detail)
            else:
                row.output = _staged_input("output", label, url, thumbs, staged)
            if record.status == "done" and row.output.path is not None:
                row.blend = _blend(row.output.path, record, len(styles))
        elif record.status in ("pending", "running"):
            local = output_path if url is None else None
            row.output = _Input("output", "output", local, problem="not yet", url=url and store.scrub(url))
        if url is None and is_clip_output(output_path):  # a URL --out takes no video rows
            row.strip = _frame_strip(output_path, thumb)
        if len(row.blend) == len(row.inputs) - 1 > 1:
            for shown, weight in zip(row.inputs[1:], row.blend):
                shown.weight = weight
        rows.append(row)
    return rows


STRIP_FRAMES = 8


def _frame_strip(output: Path, thumb: int) -> Image.Image | None:
    """Up to STRIP_FRAMES finished frames of a clip, evenly spaced, side by side at the thumbnail height."""
    frames = sorted(frames_folder(output).glob("frame-*.png")) if frames_folder(output).is_dir() else []
    if not frames:
        return None
    picked = [frames[round(k * (len(frames) - 1) / max(1, STRIP_FRAMES - 1))] for k in range(STRIP_FRAMES)]
    tiles = []
    for path in dict.fromkeys(picked):
        try:
            img = load_image(path)
        except ImageError:
            continue
        img.thumbnail((thumb * 4, thumb), Image.Resampling.LANCZOS)
        tiles.append(img)
    if not tiles:
        return None
    strip = Image.new(
        "RGB", (sum(t.width for t in tiles) + 2 * (len(tiles) - 1), max(t.height for t in tiles)), "white"
    )
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + 2
    return strip


def _with_faces(item: _Input, params: dict[str, Any]) -> _Input:
    """The content's thumbnail with a box around each face faces=auto found (the ledger records them as fractions of
    the content's size), on a copy: the cached thumbnail may be another row's content too."""
    found = params.get("faces_found")
    if item.image is None or not isinstance(found, list) or not found:
        return item
    from batchstyle.faces import Face

    image = item.image.convert("RGB")  # a copy, in a mode that takes a coloured outline
    draw = ImageDraw.Draw(image)
    width = max(1, round(max(image.size) / 120))
    for box in found:
        if isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
            draw.rectangle(Face(*box).pixels(image.width, image.height), outline=_FACE_COLOUR, width=width)
    label = f"{item.label} ({len(found)} face{'s' if len(found) > 1 else ''})"
    return dataclasses.replace(item, image=image, label=label)


def _input(role: str, label: str, text: str, out_dir: Path, thumbs: _Thumbs, staged: _Staged) -> _Input:
    if not text:
        return _Input(role, label, None, problem="not recorded")
    if _is_object(text):
        return _staged_input(role, label, text, thumbs, staged)
    path = _locate(store.local_path(text), out_dir)
    return _Input(role, label, path, *thumbs.get(path))


def _staged_input(role: str, label: str, url: str, thumbs: _Thumbs, staged: _Staged) -> _Input:
    """An object's picture from its staged copy, shown under its URL (scrubbed: a signed URL's query is a
    credential); an object that cannot be read any more gets a placeholder and the store's words for why."""
    copy, problem, detail = staged.get(url)
    if copy is None:
        return _Input(role, label, None, problem=problem, url=store.scrub(url), detail=detail)
    return _Input(role, label, copy, *thumbs.get(copy), url=store.scrub(url))


def _blend(output: Path, record: Record, styles: int) -> list[str]:
    """Style blend weights are not in the ledger's params, but the output's own metadata has them."""
    if styles < 2:
        return []
    try:
        meta = read_metadata(output)
    except (ImageError, OSError, ValueError):
        return []
    if meta.get("batchstyle:key") != record.key:
        return []
    weights = [w for w in meta.get("batchstyle:style_blend_weights", "").split(";") if w]
    return weights if len(weights) == styles else []


# --------------------------------------------------------------------------------------------------- text helpers


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.2f} s"
    minutes, secs = divmod(value, 60)
    if minutes < 60:
        return f"{int(minutes)} min {secs:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes)} min"


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _counts(records: Iterable[Record]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for record in records:
        counts[record.status] = counts.get(record.status, 0) + 1
    return counts


def _models(records: Sequence[Record], last_run: dict[str, Any] | None) -> list[str]:
    found = list(dict.fromkeys(r.model for r in records if r.model))
    if not found and last_run and last_run.get("model"):
        found = [str(last_run["model"])]
    return found


# --------------------------------------------------------------------------------------------------- contact sheet


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError):  # Pillow < 10.1, or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(text: str, font: Any, width: float) -> str:
    """``text`` cut to ``width`` pixels, ending in '...' when cut."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap(text: str, font: Any, width: float, lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a word longer than a line (a path) is broken inside."""
    out: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            out.append(current)
        while font.getlength(word) > width:
            cut = len(word)
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            out.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        out.append(current)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = _fit(out[-1] + " ...", font, width)
    return out


@dataclass
class _Cell:
    width: int
    image: Image.Image | None = None
    placeholder: str | None = None
    error: str | None = None
    caption: str = ""
    subcaption: str = ""


def _sheet_cells(row: _Row, thumb: int) -> list[_Cell]:
    cells = []
    for item in [*row.inputs, row.output]:
        if item is None:
            cells.append(_Cell(round(thumb * 1.6), error=row.record.error or "failed", caption="output"))
            continue
        name = item.name
        # Pillow's default font has no multiplication sign, so the sheet spells the weight out.
        caption = item.label if item.weight is None else f"{item.label}, weight {item.weight}"
        if item.image is not None:
            img = item.image
            width = max(1, min(round(thumb * _MAX_ASPECT), round(img.width * thumb / img.height)))
            resample = Image.Resampling.LANCZOS if img.height >= thumb else Image.Resampling.BICUBIC
            cells.append(_Cell(width, img.resize((width, thumb), resample), caption=caption, subcaption=name))
        else:
            cells.append(_Cell(round(thumb * 0.75), placeholder=item.problem, caption=caption, subcaption=name))
    return cells


def _contact_sheet(
    rows: list[_Row], place: _Place, last_run: dict[str, Any] | None, models: list[str], thumb: int
) -> Image.Image:
    pad, gap, label_w = 10, 8, 190
    title_font, label_font, small_font = _font(18), _font(14), _font(11)
    line = 18
    caption_h = 2 * 14 + 2
    row_h = pad + thumb + 4 + caption_h + pad
    header_h = pad + 24 + line + pad
    layouts = [_sheet_cells(row, thumb) for row in rows]
    widths = [pad + label_w + sum(c.width + gap for c in cells) + pad for cells in layouts]
    counts = _counts(row.record for row in rows)
    title = f"batchstyle: {place.name}"
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no rows"
    summary += f"   model: {', '.join(models) or '-'}"
    if last_run and last_run.get("started"):
        summary += f"   run {_when(last_run['started'])}"
    width = max([pad * 2 + 560, *widths])
    height = header_h + max(1, len(rows)) * row_h + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.rectangle([0, 0, width, header_h - 1], fill=(236, 238, 242))
    draw.text((pad, pad), _fit(title, title_font, width - 2 * pad), fill=(20, 20, 20), font=title_font)
    draw.text((pad, pad + 26), _fit(summary, label_font, width - 2 * pad), fill=(60, 60, 60), font=label_font)
    if not rows:
        draw.text((pad, header_h + pad), "the ledger has no rows", fill=(120, 120, 120), font=label_font)
    for index, (row, cells) in enumerate(zip(rows, layouts)):
        top = header_h + index * row_h
        if index % 2:
            draw.rectangle([0, top, width, top + row_h - 1], fill=(247, 247, 249))
        draw.line([0, top, width, top], fill=(215, 215, 220))
        record = row.record
        y = top + pad
        draw.text((pad, y), f"row {record.row if record.row is not None else '?'}", fill=(20, 20, 20), font=title_font)
        y += 26
        colour = _STATUS_COLOURS.get(record.status, (90, 90, 90))
        draw.text((pad, y), record.status, fill=colour, font=label_font)
        y += line
        draw.text((pad, y), _fit(row.output_name, label_font, label_w - gap), fill=(40, 40, 40), font=label_font)
        y += line
        if record.status == "done" and record.total_loss is not None:
            verdict, verdict_colour = f"loss {_fmt(record.total_loss)}", (40, 40, 40)
        elif record.status == "failed":
            verdict, verdict_colour = "FAILED", _STATUS_COLOURS["failed"]
        else:
            verdict, verdict_colour = "", (40, 40, 40)
        if verdict:
            draw.text((pad, y), verdict, fill=verdict_colour, font=label_font)
            y += line
        if record.seconds is not None:
            draw.text((pad, y), _seconds(record.seconds), fill=(110, 110, 110), font=small_font)
        x = pad + label_w
        for cell in cells:
            box = [x, top + pad, x + cell.width - 1, top + pad + thumb - 1]
            if cell.image is not None:
                sheet.paste(cell.image, (x, top + pad))
            elif cell.error is not None:
                draw.rectangle(box, fill=(253, 231, 231), outline=(200, 70, 70), width=2)
                text_lines = _wrap(cell.error, small_font, cell.width - 12, max(1, (thumb - 10) // 14))
                for n, text in enumerate(text_lines):
                    draw.text((x + 6, top + pad + 5 + n * 14), text, fill=(150, 20, 20), font=small_font)
            else:
                draw.rectangle(box, fill=(205, 205, 205), outline=(170, 170, 170))
                word = cell.placeholder or "missing"
                tw = small_font.getlength(word)
                draw.text(
                    (x + (cell.width - tw) / 2, top + pad + thumb / 2 - 7), word, fill=(80, 80, 80), font=small_font
                )
            cy = top + pad + thumb + 4
            draw.text((x, cy), _fit(cell.caption, small_font, cell.width), fill=(40, 40, 40), font=small_font)
            if cell.subcaption:
                draw.text(
                    (x, cy + 14), _fit(cell.subcaption, small_font, cell.width), fill=(120, 120, 120), font=small_font
                )
            x += cell.width + gap
    return sheet


# --------------------------------------------------------------------------------------------------- HTML


def _data_uri(img: Image.Image, thumb: int) -> str:
    small = img.copy()
    small.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.convert("RGB").save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _loss_curve(history: dict[str, np.ndarray], params: dict[str, Any]) -> str | None:
    """Each recorded term times its weight (its `{name}_weight` parameter), as the optimiser saw them, on a log
    axis: the terms span orders of magnitude. Whatever terms the row recorded are drawn: a video row's temporal
    term too, and any term added later.

    The figure is built with matplotlib's object API rather than pyplot, so no global backend is switched and no
    figure registry grows in a process that also uses matplotlib for something else.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    iterations = _iterations(history)
    weights = {name: _number(params.get(f"{name}_weight"), 1.0) for name in history}
    steps = np.arange(1, iterations + 1)
    fig = Figure(figsize=(5, 2.2), dpi=100)
    ax = fig.add_subplot()
    plotted = 0
    weighted = np.stack([history[name].astype(np.float64) * weight for name, weight in weights.items()], axis=1)
    spare = iter(_SPARE_COLOURS * len(weights))
    for column, (name, weight) in enumerate(weights.items()):
        values = weighted[:, column]
        values = np.where(np.isfinite(values) & (values > 0), values, np.nan)
        if np.all(np.isnan(values)):
            continue
        marker = "o" if len(steps) <= 25 else None
        ax.plot(steps, values, lw=1.3, marker=marker, ms=2.5, color=_CURVE_COLOURS.get(name) or next(spare))
        ax.lines[-1].set_label(f"{name} \N{MULTIPLICATION SIGN}{weight:g}")
        plotted += 1
    if not plotted:
        return None
    # A term missing at some iterations (NaN there: recorded at some scales only) adds nothing to their total.
    total = np.where(np.isnan(weighted).all(axis=1), np.nan, np.nansum(weighted, axis=1))
    ax.plot(steps, np.where(total > 0, total, np.nan), lw=1, ls="--", color="#555555", label="total")
    ax.set_yscale("log")
    # Initialised from the content, the content loss starts near 1e-13: left alone, that one point would squash
    # every curve into the top tenth of the plot. Terms a millionth of the total matter to nobody.
    top = np.nanmax(np.where(total > 0, total, np.nan)) if np.any(total > 0) else np.nanmax(weighted)
    low, high = ax.get_ylim()
    if np.isfinite(top) and top > 0 and low < top * 1e-6:
        ax.set_ylim(top * 1e-6, high)
    scales = params.get("scales") or []
    if len(scales) > 1 and sum(int(s[2]) for s in scales) == iterations:
        # Labelled by long side ("px" on the first only), alternately high and low: at 2048 px a scale may get
        # 20 of 320 iterations, and full "WxH" labels side by side ran into each other.
        edge = 0
        for index, scale in enumerate(scales):
            ax.axvline(edge + 0.5, color="#999999", lw=0.8, ls=":")
            ax.text(
                edge + 0.7,
                0.97 if index % 2 == 0 else 0.89,
                f"{max(int(scale[0]), int(scale[1]))}" + (" px" if index == 0 else ""),
                transform=ax.get_xaxis_transform(),
                fontsize=6,
                va="top",
                color="#666666",
            )
            edge += int(scale[2])
    ax.set_xlim(0.5, iterations + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration", fontsize=8, labelpad=1)
    ax.set_ylabel("weighted loss", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=4, frameon=False, loc="lower left", bbox_to_anchor=(0, 1.0), borderaxespad=0.2)
    # Fixed margins rather than tight_layout, which draws the figure an extra time: a third of the cost per row.
    fig.subplots_adjust(left=0.14, right=0.98, bottom=0.2, top=0.87)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _iterations(history: dict[str, np.ndarray]) -> int:
    """How many iterations a recorded history spans (every term has a value, or NaN, at each)."""
    return max((len(values) for values in history.values()), default=0)


def _number(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _param_value(name: str, value: Any) -> str:
    if name == "scales" and isinstance(value, list):
        parts = []
        for scale in value:
            if isinstance(scale, list) and len(scale) == 3:
                parts.append(f"{scale[0]}\N{MULTIPLICATION SIGN}{scale[1]} px, {scale[2]} iterations")
            else:
                parts.append(json.dumps(scale))
        return "<br>".join(_e(p) for p in parts) or "-"
    if isinstance(value, list):
        return _e(", ".join(str(v) for v in value) or "(none)")
    if value is None:
        return '<span class="dim">default</span>'
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _e(value)


def _figure_html(item: _Input, thumb: int) -> str:
    name = _e(item.name)
    hover = item.detail or item.where  # the store's error names the object too
    title = f' title="{_e(hover)}"' if hover is not None else ""
    if item.image is not None:
        body = f'<img class="thumb" alt="{_e(item.label)}" src="{_data_uri(item.image, thumb)}">'
    else:
        body = f'<div class="placeholder">{_e(item.problem or "missing")}</div>'
    label = item.label if item.weight is None else f"{item.label} \N{MULTIPLICATION SIGN}{item.weight}"
    return f'<figure class="{_e(item.role)}"{title}>{body}<figcaption>{_e(label)}<br>{name}</figcaption></figure>'


def _row_html(row: _Row, thumb: int) -> str:
    record = row.record
    number = record.row if record.row is not None else "?"
    parts = [
        f'<section class="row" id="{_e(row.anchor)}" data-status="{_e(record.status)}">',
        f'<h2><a href="#{_e(row.anchor)}">row {_e(number)}</a> <span class="name">{_e(row.output_name)}</span> '
        f'<span class="badge {_e(record.status)}">{_e(record.status)}</span></h2>',
    ]
    if record.error:
        parts.append(f'<p class="error"><b>error:</b> {_e(record.error)}</p>')
    parts.append('<div class="thumbs">')
    parts.extend(_figure_html(item, thumb) for item in row.inputs)
    if row.output is not None:
        parts.append(_figure_html(row.output, thumb))
    else:
        parts.append(
            '<figure class="output"><div class="placeholder failed-box">no output: the row failed</div>'
            "<figcaption>output<br>none</figcaption></figure>"
        )
    # The curve sits beside the pictures, where a row of three thumbnails leaves room for it.
    done = record.status == "done"
    history = row.history
    curve = _loss_curve(history, row.params if done else {}) if _iterations(history) else None
    note = ""
    if curve is not None:
        parts.append(f'<figure class="curve"><img class="curve" alt="loss curve of row {_e(number)}" src="{curve}">')
        parts.append("<figcaption>losses per iteration, each times its weight (log scale)</figcaption></figure>")
    elif _iterations(history):
        note = "no loss curve: no positive losses were recorded."
    else:
        note = "no loss curve: this row recorded no per-iteration losses."
    parts.append("</div>")
    if row.strip is not None:
        error = row.params.get("temporal_error") if done else None
        measured = f"; temporal error {error:.2f} levels (8-bit)" if isinstance(error, (int, float)) else ""
        buffer = io.BytesIO()
        row.strip.save(buffer, format="JPEG", quality=88)
        uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        parts.append(
            f'<figure class="strip"><img alt="frames of row {_e(number)}" src="{uri}">'
            f"<figcaption>frames, evenly spaced{_e(measured)}</figcaption></figure>"
        )
    if row.recovered:
        parts.append(
            '<p class="note">This row failed validation; the inputs shown are read back from the manifest.</p>'
        )

    # A row keeps the losses and parameters of its last success when a later attempt fails or is still under way,
    # so they are shown only for rows that are done; the error, timing and history are always the latest attempt's.
    info: list[tuple[str, str | None]] = [
        ("status", _e(record.status)),
        ("model", _e(record.model) if record.model else None),
        ("device", _e(record.device) if record.device else None),
        ("precision", _e(record.precision) if record.precision else None),
        ("provider", _e(record.provider) if record.provider else None),
        ("target cache", _e(record.targets) if record.targets else None),
        ("seconds", _e(_seconds(record.seconds)) if record.seconds is not None else None),
        ("iterations", _e(record.iterations) if record.iterations is not None else None),
        ("finished", _e(_when(record.finished)) if record.finished is not None else None),
        ("content", _e(row.inputs[0].where) if row.inputs[0].where else None),
        ("style", "<br>".join(_e(i.where) for i in row.inputs[1:] if i.where) or None),
        ("style blend", _e(", ".join(row.blend)) if row.blend else None),
        ("frames", _e(row.params.get("frames")) if done and row.params.get("frames") else None),
        (
            "temporal error",
            _e(f"{row.params['temporal_error']:.2f} levels")
            if done and isinstance(row.params.get("temporal_error"), (int, float))
            else None,
        ),
    ]
    parts.append('<div class="details"><div><table class="info"><caption>run</caption>')
    parts.extend(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in info if v is not None)
    parts.append("</table>")

    finals = (record.content_loss, record.style_loss, record.tv_loss)
    if done and any(v is not None for v in (*finals, record.total_loss)):
        weights = [_number(row.params.get(f"{name}_weight"), 1.0) for name in _FINAL_COLUMNS]
        parts.append(
            '<table class="losses"><caption>final losses</caption><tr><th></th><th>recorded</th><th>weight</th>'
            "<th>weighted</th></tr>"
        )
        for name, value, weight in zip(_FINAL_COLUMNS, finals, weights):
            weighted = _fmt(value * weight) if value is not None and row.params else "-"
            shown_weight = f"{weight:g}" if row.params else "-"
            parts.append(f"<tr><th>{name}</th><td>{_fmt(value)}</td><td>{shown_weight}</td><td>{weighted}</td></tr>")
        parts.append(
            f'<tr class="total"><th>total</th><td></td><td></td><td>{_fmt(record.total_loss)}</td></tr></table>'
        )
    parts.append("</div>")
    if done and row.params:
        parts.append('<table class="params"><caption>parameters</caption>')
        parts.extend(f"<tr><th>{_e(k)}</th><td>{_param_value(k, v)}</td></tr>" for k, v in row.params.items())
        parts.append("</table>")
    parts.append("</div>")

    if note:
        parts.append(f'<p class="note">{note}</p>')
    parts.append("</section>")
    return "\n".join(parts)


_CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
       color: #1d1d1f; background: #fafafa; }
header { background: #eceef2; padding: 16px 24px; border-bottom: 1px solid #d5d5dc; }
main { padding: 8px 24px 32px; }
h1 { font-size: 22px; margin: 0 0 8px; }
h2 { font-size: 17px; margin: 0 0 8px; }
h2 a { color: inherit; text-decoration: none; }
h2 .name { font-weight: normal; color: #444; margin-left: 6px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { text-align: left; vertical-align: top; padding: 2px 10px 2px 0; }
th { font-weight: 600; color: #555; white-space: nowrap; }
caption { text-align: left; font-weight: 700; padding-bottom: 2px; }
.summary td, .summary th { padding-right: 18px; }
.index { margin: 12px 0 4px; }
.index th { border-bottom: 1px solid #ccc; }
.index td { padding-right: 18px; }
.badge { font-size: 12px; font-weight: 600; padding: 1px 8px; border-radius: 9px; color: #fff; background: #777;
         vertical-align: middle; }
.badge.done { background: #1e823c; } .badge.failed { background: #be2828; }
.badge.pending { background: #aa7800; } .badge.running { background: #285ab4; }
section.row { background: #fff; border: 1px solid #ddd; border-radius: 6px; margin: 14px 0; padding: 12px 16px; }
section.row[data-status="failed"] { border-left: 5px solid #be2828; }
section.row[data-status="done"] { border-left: 5px solid #1e823c; }
.thumbs { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; margin: 6px 0 10px; }
figure { margin: 0; }
figure img.thumb { height: THUMBpx; width: auto; max-width: MAXWpx; display: block; border: 1px solid #ccc;
                   background: #eee; }
figcaption { font-size: 12px; color: #555; max-width: MAXWpx; overflow-wrap: anywhere; }
.placeholder { height: THUMBpx; width: PLACEpx; display: flex; align-items: center; justify-content: center;
               background: #cdcdcd; color: #444; border: 1px solid #aaa; font-size: 13px; }
.placeholder.failed-box { background: #fde7e7; color: #961414; border: 2px solid #c84646; padding: 6px;
               box-sizing: border-box; text-align: center; font-size: 12px; }
.error { color: #961414; background: #fdf0f0; padding: 6px 8px; border-radius: 4px; margin: 4px 0 8px;
         overflow-wrap: anywhere; }
.details { display: flex; flex-wrap: wrap; gap: 12px 36px; align-items: flex-start; }
.details td { overflow-wrap: anywhere; max-width: 460px; }
.losses { margin-top: 12px; }
.losses td { text-align: right; font-variant-numeric: tabular-nums; padding-right: 14px; }
.losses tr.total td { font-weight: 700; }
img.curve { display: block; max-width: 100%; height: auto; }
figure.curve { margin-left: 14px; }
.note { color: #777; font-style: italic; font-size: 13px; }
.dim { color: #999; }
"""


def _html(rows: list[_Row], place: _Place, last_run: dict[str, Any] | None, models: list[str], thumb: int) -> str:
    records = [row.record for row in rows]
    counts = _counts(records)
    css = (
        _CSS.replace("THUMB", str(thumb))
        .replace("MAXW", str(round(thumb * _MAX_ASPECT)))
        .replace("PLACE", str(round(thumb * 0.75)))
    )
    compute = sum(r.seconds or 0.0 for r in records)
    where = [("folder", _e(place.shown))]
    if place.ledger is not None:
        where = [("outputs", _e(place.shown)), ("ledger", _e(place.ledger))]
    summary = [
        *where,
        ("rows", " ".join(f'<span class="badge {_e(s)}">{n} {_e(s)}</span>' for s, n in counts.items() if n) or "none"),
        ("model", _e(", ".join(models) or "-")),
        ("device", _e(", ".join(dict.fromkeys(r.device for r in records if r.device)) or "-")),
        ("compute time", _e(_seconds(compute)) + " (sum over rows)"),
    ]
    if last_run:
        started, finished = last_run.get("started"), last_run.get("finished")
        wall = _seconds(finished - started) if started and finished else "unfinished"
        summary += [
            ("manifest", _e(last_run.get("manifest") or "-")),
            ("last run", _e(f"{_when(started)}, {wall} wall time")),
        ]
    summary.append(("report written", _e(_when(time.time()))))
    index = ['<table class="index"><tr><th>row</th><th>output</th><th>status</th><th>total loss</th><th>time</th></tr>']
    for row in rows:
        r = row.record
        index.append(
            f'<tr><td><a href="#{_e(row.anchor)}">{_e(r.row if r.row is not None else "?")}</a></td>'
            f'<td>{_e(row.output_name)}</td><td><span class="badge {_e(r.status)}">{_e(r.status)}</span></td>'
            f"<td>{_fmt(r.total_loss)}</td><td>{_e(_seconds(r.seconds))}</td></tr>"
        )
    index.append("</table>")
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>batchstyle report: {_e(place.name)}</title>",
        f"<style>{css}</style></head><body>",
        f"<header><h1>batchstyle report: {_e(place.name)}</h1>",
        '<table class="summary">',
        *(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in summary),
        "</table>",
        *(index if rows else []),
        "</header><main>",
    ]
    if not rows:
        body.append('<p class="note">The ledger has no rows.</p>')
    body.extend(_row_html(row, thumb) for row in rows)
    body.append("</main></body></html>\n")
    return "\n".join(body)


# --------------------------------------------------------------------------------------------------- writing


def _write_text_atomic(path: Path, text: str) -> None:
    write_file_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


class ReportRefused(UnusableInput):
    """The report's files would replace a file it did not write."""


_SHEET_MARK = "batchstyle report"  # the contact sheet's Software text, since the first report
_HTML_MARK = "<title>batchstyle report"  # in the HTML page's head, since the first report


def _refuse_foreign(records: Sequence[Record], sheet: Path | str, page: Path | str) -> None:
    """Refuses to write over a row's output or any file the report did not write itself. Manifests refuse outputs
    at these names now, but a ledger from before they did may hold one (the sheet then replaced the row's output
    while the ledger said done, and reruns skipped it), and a user may have put a file of their own there.

    `sheet` and `page` are where the two go: local files, checked here, or objects' URLs (a URL --out), whose
    objects `_refuse_foreign_objects` checks."""
    taken = {fold(CONTACT_SHEET_NAME): sheet, fold(HTML_NAME): page}
    for record in records:
        path = taken.get(fold(record.output))
        if path is not None:
            raise ReportRefused(
                f"row {record.row}'s output is {path}, where the report writes its "
                f"{'contact sheet' if path == sheet else 'page'}: it would be replaced. Move that output and rename "
                "it in the manifest (runs refuse such names now), then report again"
            )
    for path, ours in ((sheet, _our_sheet), (page, _our_page)):
        if isinstance(path, Path) and path.is_file() and not ours(path):
            what = "contact sheet" if path == sheet else "report"
            raise ReportRefused(f"{path} is not a {what} batchstyle wrote: move it, then report again")


def _refuse_foreign_objects(out_url: str, listed: frozenset[str], staged: _Staged) -> None:
    """The same guarantee for a URL --out, from the prefix's one listing: an object already under the sheet's or the
    page's name is replaced only if the report put it there. An object that cannot be read to tell is not replaced
    either."""
    for name, ours, what in ((CONTACT_SHEET_NAME, _our_sheet, "contact sheet"), (HTML_NAME, _our_page, "report")):
        if name not in listed:
            continue
        url = store.child(out_url, name)
        copy, _, detail = staged.get(url)
        if copy is None:
            raise ReportRefused(
                f"{store.scrub(url)} is there and cannot be read to check that batchstyle wrote it ({detail}); "
                "fix that, or move that object, then report again"
            )
        if not ours(copy):
            raise ReportRefused(
                f"{store.scrub(url)} is not a {what} batchstyle wrote: move or delete that object, then report again"
            )


def _our_sheet(path: Path) -> bool:
    try:
        return read_metadata(path).get("Software") == _SHEET_MARK
    except ImageError:
        return False


def _our_page(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(4096).decode("utf-8", "replace")
    return _HTML_MARK in head


def write_report(out_dir: Path, all_rows: bool = False, thumb: int = 160, out_url: str | None = None) -> ReportFiles:
    """Writes contact-sheet.png and report.html into ``out_dir`` from its ledger, each atomically.

    ``all_rows`` includes rows of earlier runs no longer in the latest manifest (as ``batchstyle status --all``);
    ``thumb`` is the thumbnail height in pixels. Safe to call while a run is writing the folder: the ledger is read
    through SQLite's WAL, and rows still pending or running are shown as such.

    ``out_url``: the run's outputs went to this URL prefix and ``out_dir`` is its local folder (its ledger:
    ``store.work_dir(out_url)`` or the run's ``--ledger``). The outputs are read from the store (one listing of the
    prefix; an output not in it shows as missing), the two files are written into ``out_dir`` as for a folder, then
    each is put under the prefix in one request, so neither is ever seen there half-written. Raises StoreError when
    the prefix cannot be listed or a file cannot be put.
    """
    out_dir = Path(out_dir)
    if thumb < 16:
        raise ValueError(f"thumb must be at least 16 pixels, got {thumb}")
    if not ledger_files(out_dir):
        if out_url is not None:
            raise FileNotFoundError(
                f"{store.scrub(out_url)} has no {LEDGER_NAME} on this machine (looked in {out_dir}), so there is "
                "nothing to report: report on the machine that ran it, or name the --ledger folder it was run with"
            )
        raise FileNotFoundError(
            f"{out_dir} has no {LEDGER_NAME}, so there is nothing to report: name the output folder of a "
            "`batchstyle run` (by default the manifest's name without .csv, beside it)"
        )
    records, last_run = read_records(out_dir, all_rows)
    records = sorted(records, key=lambda r: (r.row is None, r.row or 0, r.output))
    sheet_path = out_dir / CONTACT_SHEET_NAME
    html_path = out_dir / HTML_NAME
    staged = _Staged()
    listed: frozenset[str] = frozenset()
    urls: tuple[str, str] | None = None  # where the two are put, with a URL --out
    if out_url is None:
        _refuse_foreign(records, sheet_path, html_path)
    else:
        urls = store.child(out_url, CONTACT_SHEET_NAME), store.child(out_url, HTML_NAME)
        _refuse_foreign(records, store.scrub(urls[0]), store.scrub(urls[1]))
        _refuse_foreign(records, sheet_path, html_path)  # the run's local folder: a --ledger DIR may hold a user's file
        listed = store.names(out_url)
        _refuse_foreign_objects(out_url, listed, staged)
    rows = _gather(records, out_dir, thumb, out_url, listed, staged)
    models = _models(records, last_run)
    place = _Place.of(out_dir, out_url)
    sheet = _contact_sheet(rows, place, last_run, models, thumb)
    save_image_atomic(sheet, sheet_path, {"Software": _SHEET_MARK, "batchstyle:report": place.name})
    _write_text_atomic(html_path, _html(rows, place, last_run, models, thumb))
    if urls is None:
        return ReportFiles(contact_sheet=sheet_path, html=html_path)
    for local, url in zip((sheet_path, html_path), urls):
        store.put(local, url)
    return ReportFiles(sheet_path, html_path, store.scrub(urls[0]), store.scrub(urls[1]))
