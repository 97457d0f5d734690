"""The run report: contact-sheet.png and report.html, checked by parsing what was written, not by matching the template.

One module-scoped run (random VGG, 32 px, 4 iterations) makes a manifest of two good rows (one blending two styles),
a row whose style does not exist and a row whose content is corrupt; a second, two-row run into another folder gives
a smaller report to compare with, and then a rerun into the same folder gives a ledger holding two manifests' rows.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import sqlite3
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, make_painting, make_photo, write_manifest
from PIL import Image

from batchstyle import images
from batchstyle.images import is_temp_file
from batchstyle.report import ReportFiles, write_report
from batchstyle.run.ledger import LEDGER_NAME, Ledger, Record, pack_history, read_records

FAST = ("--model", "random", "--device", "cpu", "--size", "32", "--iterations", "4", "-q")
THUMB = 40  # below the test images' long sides, so thumbnails really are reduced
BAD_NAME = "b&d <1>.png"  # markup characters in a path: the error text quoting it must be escaped
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find_all(self, tag: str, cls: str | None = None) -> list[Node]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if child.tag == tag and (cls is None or cls in child.attrs.get("class", "").split()):
                    found.append(child)
                found.extend(child.find_all(tag, cls))
        return found


class Tree(HTMLParser):
    """A minimal DOM: enough to ask which images and texts sit inside which row section."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return
        raise AssertionError(f"</{tag}> closes nothing")

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(path: Path) -> tuple[str, Tree]:
    text = path.read_text(encoding="utf-8")
    tree = Tree()
    tree.feed(text)
    tree.close()
    assert len(tree.stack) == 1, f"unclosed elements: {[n.tag for n in tree.stack[1:]]}"
    return text, tree


def decode(uri: str) -> Image.Image:
    head, _, data = uri.partition(",")
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head[:40]
    img = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    img.load()
    return img


def sections(tree: Tree) -> list[Node]:
    return tree.root.find_all("section", "row")


def table(node: Node, cls: str) -> dict[str, str]:
    tables = node.find_all("table", cls)
    assert len(tables) == 1, f"expected one table.{cls}"
    rows = {}
    for tr in tables[0].find_all("tr"):
        heads, cells = tr.find_all("th"), tr.find_all("td")
        if heads and cells:
            rows[heads[0].text().strip()] = cells[-1].text().strip()
    return rows


@dataclass
class Run:
    out: Path
    files: ReportFiles
    records: list[Record]
    small: ReportFiles  # a two-row, all-done report for comparison


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("report")
    make_photo(root / "in" / "photo.png")
    make_photo(root / "in" / "photo2.jpg", 40, 56, seed=3)
    make_painting(root / "in" / "painting.png")
    make_painting(root / "in" / "painting2.png", seed=5)
    (root / "in" / BAD_NAME).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a PNG signature, then garbage
    manifest = write_manifest(
        root / "night.csv",
        "content,style,output,style_blend_weights",
        "in/photo.png,in/painting.png,a.png,",
        "in/photo2.jpg,in/painting.png;in/painting2.png,b.png,1;3",
        "in/photo.png,in/no-such-style.png,c.png,",
        f"in/{BAD_NAME},in/painting.png,d.png,",
    )
    out = root / "night"
    cli("run", manifest, "--out", out, *FAST)
    small_manifest = write_manifest(
        root / "small.csv",
        "content,style,output",
        "in/photo.png,in/painting.png,x.png",
        "in/photo2.jpg,in/painting2.png,y.png",
    )
    cli("run", small_manifest, "--out", root / "small", *FAST)
    records, _ = read_records(out)
    return Run(out, write_report(out, thumb=THUMB), records, write_report(root / "small", thumb=THUMB))


def test_report_files_are_named_and_in_the_output_folder(run: Run) -> None:
    assert run.files == ReportFiles(run.out / "contact-sheet.png", run.out / "report.html")
    assert run.files.contact_sheet.is_file() and run.files.html.is_file()


def test_one_section_per_row_with_the_ledgers_status(run: Run) -> None:
    _, tree = parse(run.files.html)
    found = sections(tree)
    assert len(found) == 4
    assert [s.attrs["id"] for s in found] == ["row-1", "row-2", "row-3", "row-4"]
    by_row = {r.row: r.status for r in run.records}
    assert by_row == {1: "done", 2: "done", 3: "failed", 4: "failed"}
    assert [s.attrs["data-status"] for s in found] == [by_row[n] for n in (1, 2, 3, 4)]
    assert len({s.attrs["id"] for s in tree.root.find_all("section")}) == 4  # ids unique


def test_failed_rows_show_their_error_escaped(run: Run) -> None:
    text, tree = parse(run.files.html)
    found = sections(tree)
    for record in run.records:
        section = found[record.row - 1]
        if record.status == "failed":
            assert record.error and record.error in section.text()
            assert html.escape(record.error) in text
        else:
            assert not section.find_all("p", "error")
    assert BAD_NAME not in text  # only its escaped form: no stray "<1>" tag in the page
    assert html.escape(BAD_NAME) in text


def test_done_rows_have_a_png_loss_curve_and_failed_rows_a_note(run: Run) -> None:
    _, tree = parse(run.files.html)
    for section in sections(tree):
        curves = section.find_all("img", "curve")
        if section.attrs["data-status"] == "done":
            assert len(curves) == 1
            img = decode(curves[0].attrs["src"])
            assert img.format == "PNG" and img.width > 200 and img.height > 80
        else:
            assert curves == []
            assert any("no loss curve" in note.text() for note in section.find_all("p", "note"))


def test_thumbnails_decode_and_fit_the_thumb_size(run: Run) -> None:
    _, tree = parse(run.files.html)
    found = sections(tree)
    thumbs = tree.root.find_all("img", "thumb")
    # rows 1 and 2: content, style(s), output; row 3: content (read back from the manifest); row 4: its style
    assert [len(s.find_all("img", "thumb")) for s in found] == [3, 4, 1, 1]
    for node in thumbs:
        img = decode(node.attrs["src"])
        assert max(img.size) <= THUMB
    tall = decode(found[1].find_all("img", "thumb")[0].attrs["src"])  # photo2 is 40x56: really reduced
    assert tall.size == (29, 40)


def test_missing_and_unreadable_inputs_get_placeholders(run: Run) -> None:
    _, tree = parse(run.files.html)
    found = sections(tree)
    placeholders = [[p.text().strip() for p in s.find_all("div", "placeholder")] for s in found]
    assert placeholders[0] == placeholders[1] == []
    assert placeholders[2][0] == "missing" and placeholders[3][0] == "unreadable"
    assert "no-such-style.png" in found[2].text()


def test_blend_weights_parameters_and_scales_are_shown(run: Run) -> None:
    _, tree = parse(run.files.html)
    found = sections(tree)
    captions = [c.text() for c in found[1].find_all("figcaption")]
    assert any("style 1 ×1" in c for c in captions) and any("style 2 ×3" in c for c in captions)
    for section, record in zip(found[:2], run.records[:2]):
        params = table(section, "params")
        recorded = json.loads(record.params or "{}")
        assert params["size"] == "32" and params["iterations"] == "4"
        (w, h, iterations), *_ = recorded["scales"]
        assert params["scales"] == f"{w}×{h} px, {iterations} iterations"
        info = table(section, "info")
        assert info["model"] == "random" and info["device"] == "cpu"
        assert info["target cache"] == record.targets and info["provider"] == record.provider
        losses = table(section, "losses")
        assert float(losses["total"]) == pytest.approx(record.total_loss, rel=1e-3)


def test_the_page_is_self_contained(run: Run) -> None:
    text, tree = parse(run.files.html)
    lowered = text.lower()
    for needle in ("http://", "https://", 'src="/', "<link", "<script", "url(", "@import"):
        assert needle not in lowered, needle
    assert "script" not in tree.tags and "link" not in tree.tags and "iframe" not in tree.tags
    images = tree.root.find_all("img")
    assert images and all(node.attrs["src"].startswith("data:image/") for node in images)


def test_summary_counts_and_model(run: Run) -> None:
    _, tree = parse(run.files.html)
    summary = table(tree.root.find_all("header")[0], "summary")
    assert "2 done" in summary["rows"] and "2 failed" in summary["rows"]
    assert summary["model"] == "random"
    assert summary["folder"] == str(run.out.resolve())


def test_contact_sheet_grows_with_rows_and_marks_failures(run: Run) -> None:
    with Image.open(run.files.contact_sheet) as big, Image.open(run.small.contact_sheet) as small:
        assert big.format == "PNG" and big.mode == "RGB"
        assert big.height > small.height
        # The error box outline is drawn only for failed rows: the all-done sheet has none of its colour.
        outline = (200, 70, 70)
        assert outline in {c for _, c in big.getcolors(1 << 20)}
        assert outline not in {c for _, c in small.getcolors(1 << 20)}


def test_no_temp_files_are_left(run: Run) -> None:
    for folder in (run.out, run.small.html.parent):
        assert not [p for p in folder.iterdir() if is_temp_file(p)]


def test_a_failed_write_leaves_the_old_report_and_no_temp_file(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p: p.read_bytes() for p in (run.small.contact_sheet, run.small.html)}

    def broken_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images.os, "fsync", broken_disk)
    with pytest.raises(OSError, match="No space"):
        write_report(run.small.html.parent, thumb=THUMB)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in run.small.html.parent.iterdir() if is_temp_file(p)]


def test_all_rows_includes_earlier_manifests_rows(run: Run, tmp_path: Path) -> None:
    folder = tmp_path / "small"
    shutil.copytree(run.small.html.parent, folder)  # the ledger records absolute paths, so a copy still finds them
    manifest = write_manifest(tmp_path / "later.csv", "content,style,output", "photo.png,painting2.png,z.png")
    make_photo(tmp_path / "photo.png")
    make_painting(tmp_path / "painting2.png", seed=5)
    cli("run", manifest, "--out", folder, *FAST)
    _, latest = parse(write_report(folder, thumb=THUMB).html)
    _, everything = parse(write_report(folder, all_rows=True, thumb=THUMB).html)
    assert [s.attrs["id"] for s in sections(latest)] == ["row-1"]
    ids = [s.attrs["id"] for s in sections(everything)]
    assert len(ids) == 3 and len(set(ids)) == 3  # three rows numbered 1 and 2: anchors stay unique


def test_no_ledger_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no batchstyle-ledger\.sqlite.*batchstyle run"):
        write_report(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_report_command_and_run_report_write_both_files(tmp_path: Path) -> None:
    make_photo(tmp_path / "in" / "photo.png")
    make_painting(tmp_path / "in" / "painting.png")
    manifest = write_manifest(tmp_path / "m.csv", "content,style,output", "in/photo.png,in/painting.png,a.png")
    args = ["run", manifest, "--model", "random", "--device", "cpu", "--size", "32", "--iterations", "2", "-q"]
    result = cli(*args, "--report")
    assert result.exit_code == 0, result.output
    out = tmp_path / "m"
    assert "report:" in result.output
    assert Image.open(out / "contact-sheet.png").size[1] > 0
    (out / "report.html").unlink()
    again = cli("report", out)
    assert again.exit_code == 0, again.output
    assert (out / "report.html").is_file()
    missing = cli("report", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "nothing to report" in missing.output


TEMPORAL_COLOUR = (0x94, 0x67, 0xBD)  # the report's colour for the temporal term's curve


def _near(img: Image.Image, colour: tuple[int, int, int], tolerance: int = 12) -> int:
    """Pixels of `img` within `tolerance` of `colour` in every channel: a curve's own line."""
    pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.asarray(colour)).max(axis=-1) <= tolerance).sum())


def _ledger_with(out: Path, histories: dict[str, list[dict[str, float]]], params: dict[str, float]) -> None:
    with Ledger(out) as ledger:
        run_id = ledger.start_run(out / "m.csv", [], "random", "w")
        for number, (name, history) in enumerate(histories.items(), start=1):
            output = out / name
            ledger.mark_pending(output, row=number, content="in/c.png", styles="in/s.png", key="k", run_id=run_id)
            ledger.mark_running(output, run_id=run_id, device="cpu", model="random", weights="w")
            last = history[-1]
            ledger.mark_finished(
                output,
                status="done",
                iterations=len(history),
                content_loss=last["content"],
                style_loss=last["style"],
                tv_loss=last["tv"],
                total_loss=sum(params[f"{term}_weight"] * value for term, value in last.items()),
                params=json.dumps(params),
                history=pack_history(history),
            )


def test_a_video_rows_temporal_term_is_drawn_as_a_curve_of_its_own(tmp_path: Path) -> None:
    """Every recorded term gets a curve, weighted by its own option: a row whose only positive term is temporal
    still has a curve, and a row with temporal draws it in the temporal colour; a still row has none of it."""
    params = {"content_weight": 1.0, "style_weight": 100.0, "tv_weight": 10.0, "temporal_weight": 200.0}
    falling = [{"content": 0.01 * k, "style": 1.0 / k, "tv": 0.02, "temporal": 0.05 / k} for k in range(1, 9)]
    _ledger_with(
        tmp_path,
        {
            "clip.mp4": falling,
            "still.png": [{name: v for name, v in h.items() if name != "temporal"} for h in falling],
            "only-temporal.mp4": [{"content": 0.0, "style": 0.0, "tv": 0.0, "temporal": 0.05 / k} for k in range(1, 9)],
        },
        params,
    )
    _, tree = parse(write_report(tmp_path, thumb=THUMB).html)
    curves = {}
    for section in sections(tree):
        [curve] = section.find_all("img", "curve")
        curves[section.find_all("span", "name")[0].text().strip()] = decode(curve.attrs["src"])
    clip, still, only = curves["clip.mp4"], curves["still.png"], curves["only-temporal.mp4"]
    assert _near(clip, TEMPORAL_COLOUR) > 50 and _near(only, TEMPORAL_COLOUR) > 50
    assert _near(still, TEMPORAL_COLOUR) == 0


def test_a_schema_5_ledger_still_reports_and_shows_its_status(tmp_path: Path) -> None:
    """An output folder written before terms had names: `report` draws its curves and `status --json` reads it,
    both read-only (the ledger stays schema 5 until a run opens it)."""
    old = sqlite3.connect(tmp_path / LEDGER_NAME)
    old.executescript(
        """
        CREATE TABLE runs (id INTEGER PRIMARY KEY, started REAL NOT NULL, finished REAL, manifest TEXT, argv TEXT,
                           model TEXT, weights TEXT, outcome TEXT);
        CREATE TABLE rows (output TEXT PRIMARY KEY, row INTEGER, content TEXT, styles TEXT, key TEXT NOT NULL,
                           status TEXT NOT NULL, run_id INTEGER, started REAL, finished REAL, seconds REAL,
                           iterations INTEGER, content_loss REAL, style_loss REAL, tv_loss REAL, total_loss REAL,
                           device TEXT, model TEXT, weights TEXT, params TEXT, error TEXT, targets TEXT,
                           provider TEXT, history BLOB, precision TEXT, frames INTEGER, frames_done INTEGER);
        INSERT INTO runs (id, started, model) VALUES (1, 0, 'random');
        PRAGMA user_version = 5;
        """
    )
    history = np.asarray([[1e-13, 2.0, 0.1], [0.2, 1.5, 0.09], [0.3, 1.0, 0.08]], dtype="<f4")
    old.execute(
        "INSERT INTO rows (output, row, content, styles, key, status, run_id, iterations, total_loss, params, history)"
        " VALUES ('a.png', 1, 'in/c.png', 'in/s.png', 'k', 'done', 1, 3, 1.2, ?, ?)",
        (json.dumps({"style_weight": 100.0, "tv_weight": 10.0}), zlib.compress(history.tobytes(), 6)),
    )
    old.commit()
    old.close()

    _, tree = parse(write_report(tmp_path, thumb=THUMB).html)
    [section] = sections(tree)
    [curve] = section.find_all("img", "curve")
    assert decode(curve.attrs["src"]).format == "PNG"
    status = cli("status", tmp_path, "--json")
    assert status.exit_code == 0, status.output
    [row] = json.loads(status.stdout)["rows"]
    assert (row["output"], row["status"], row["total_loss"]) == ("a.png", "done", 1.2)
    conn = sqlite3.connect(tmp_path / LEDGER_NAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
    conn.close()
