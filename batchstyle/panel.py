"""The panel defaults are chosen on: kinds of subject against kinds of style, in one contact sheet.

A default that looks right on one landscape can erase a face, so `batchstyle bench panel` stylizes a fixed grid
(a portrait, an animal, a street, a landscape, a night scene, an object; textured strokes, The Starry Night, a
flat-colour modern painting, a photographic texture) with the same options and lays the results out as rows of
subjects under columns of styles, with each cell's time and loss. The photographs and paintings come from the
folder given (the project's development images), the rest from the package's own samples.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps, PngImagePlugin

SAMPLES = Path(__file__).resolve().parent.parent / "manifests" / "samples"

# (label, file name, where: "samples" or "images")
CONTENTS = (
    ("portrait", "astronaut.jpg", "samples"),
    ("animal", "chelsea.jpg", "samples"),
    ("street", "tubingen.jpg", "images"),
    ("landscape", "golden_gate.jpg", "images"),
    ("night", "hoovertowernight.jpg", "images"),
    ("object", "coffee.jpg", "samples"),
)
STYLES = (
    ("strokes", "strokes.png", "samples"),
    ("starry night", "starry_night.jpg", "images"),
    ("flat colour", "woman-with-hat-matisse.jpg", "images"),
    ("photo texture", "hubble.jpg", "samples"),
)


@dataclass(frozen=True)
class Cell:
    content: str
    style: str
    path: Path
    seconds: float
    total_loss: float
    iterations: int


def panel_files(images: Path | None) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """The panel's contents and styles that exist here: the development images only where `images` has them."""

    def found(table: tuple[tuple[str, str, str], ...]) -> list[tuple[str, Path]]:
        out = []
        for label, name, where in table:
            path = (SAMPLES if where == "samples" else images or SAMPLES) / name
            if path.is_file():
                out.append((label, path))
        return out

    return found(CONTENTS), found(STYLES)


def run_panel(
    transfer: Any,
    out_dir: Path,
    options: Mapping[str, Any],
    images: Path | None = None,
    only: Callable[[str, str], bool] = lambda content, style: True,
    on_cell: Callable[[Cell], None] = lambda cell: None,
) -> Path:
    """Stylizes every (content, style) of the panel with `transfer` (a `StyleTransfer`) and `options`, writes each
    result and `panel.png`, the contact sheet; returns the sheet's path. The sheet also shows the cells an earlier
    run left in `out_dir` with the same options (each cell file carries them), so a panel made a row at a time
    (`only`) ends in one sheet, and never a sheet that mixes options."""
    contents, styles = panel_files(images)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = earlier_cells(out_dir, options)
    for c_label, c_path in contents:
        for s_label, s_path in styles:
            if not only(c_label, s_label):
                continue
            losses: list[Any] = []
            start = time.perf_counter()
            image = transfer.stylize(
                c_path, s_path, progress=lambda i, n, loss, seen=losses: seen.append(loss), **options
            )
            seconds = time.perf_counter() - start
            path = out_dir / f"{c_label.replace(' ', '-')}--{s_label.replace(' ', '-')}.png"
            cell = Cell(c_label, s_label, path, seconds, losses[-1].total if losses else float("nan"), len(losses))
            image.save(path, pnginfo=_cell_info(cell, options))
            cells[(c_label, s_label)] = cell
            on_cell(cell)
    sheet = contact_sheet(contents, styles, cells, options)
    target = out_dir / "panel.png"
    sheet.save(target)
    return target


CELL_KEY = "batchstyle:panel-cell"  # a cell file's PNG text: its labels, time, loss and the options it was made with


def _cell_info(cell: Cell, options: Mapping[str, Any]) -> PngImagePlugin.PngInfo:
    """The cell's fields but its path (the file it is written to), and the options."""
    fields = {k: v for k, v in asdict(cell).items() if k != "path"}
    info = PngImagePlugin.PngInfo()
    info.add_text(CELL_KEY, json.dumps({**fields, "options": _comparable(options)}))
    return info


def _comparable(options: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in sorted(options.items())}


def earlier_cells(out_dir: Path, options: Mapping[str, Any]) -> dict[tuple[str, str], Cell]:
    """The cells in `out_dir` made with exactly `options`, by (subject, style) label; other files are left alone."""
    found: dict[tuple[str, str], Cell] = {}
    for path in sorted(out_dir.glob("*--*.png")):
        try:
            with Image.open(path) as image:
                record = json.loads(image.info.get(CELL_KEY, "null"))
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or record.pop("options", None) != _comparable(options):
            continue
        try:
            cell = Cell(path=path, **record)
        except TypeError:  # written by another version, with other fields: not this panel's
            continue
        found[(cell.content, cell.style)] = cell
    return found


def contact_sheet(
    contents: list[tuple[str, Path]],
    styles: list[tuple[str, Path]],
    cells: Mapping[tuple[str, str], Cell],
    options: Mapping[str, Any],
    thumb: int = 220,
) -> Image.Image:
    """Subjects down, styles across; the first column the photographs, the first row the paintings."""
    label_h, pad = 34, 6
    width = (len(styles) + 1) * (thumb + pad) + pad
    height = (len(contents) + 1) * (thumb + label_h + pad) + pad + 20
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    settings = ", ".join(f"{k}={v}" for k, v in options.items())
    draw.text((pad, 4), f"batchstyle panel: {settings}"[:200], fill="black")

    def place(image_path: Path, col: int, row: int, caption: str) -> None:
        x = pad + col * (thumb + pad)
        y = 20 + pad + row * (thumb + label_h + pad)
        with Image.open(image_path) as img:
            small = ImageOps.contain(img.convert("RGB"), (thumb, thumb))  # small cells are enlarged to be seen
        sheet.paste(small, (x + (thumb - small.width) // 2, y + (thumb - small.height) // 2))
        for k, line in enumerate(caption.split("\n")[:2]):
            draw.text((x, y + thumb + 2 + 12 * k), line[:40], fill="black")

    for col, (label, path) in enumerate(styles, start=1):
        place(path, col, 0, label)
    for row, (label, path) in enumerate(contents, start=1):
        place(path, 0, row, label)
        for col, (s_label, _) in enumerate(styles, start=1):
            cell = cells.get((label, s_label))
            if cell is not None:
                place(cell.path, col, row, f"{label} x {s_label}\n{cell.seconds:.0f} s, loss {cell.total_loss:.3g}")
    return sheet
