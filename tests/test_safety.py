"""Never destroy a user's file (issue 26): each case a hostile user found, with real files through the CLI.

An output that would land on an input of the run, on the manifest, or on a file batchstyle writes itself is a
problem of its row, found before any work: `check` lists it, and `run` fails that row and does the others.
"""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata
from pathlib import Path, PurePath

import numpy as np
import pytest
from conftest import cli, make_painting, make_photo, write_manifest
from PIL import Image

from batchstyle.images import TEMP_MARKER, is_temp_file
from batchstyle.report import CONTACT_SHEET_NAME, HTML_NAME
from batchstyle.reserved import reserved_problem
from batchstyle.run.ledger import read_records
from batchstyle.video import is_clip

FAST = ("--model", "random", "--device", "cpu", "--size", "32", "--iterations", "2", "-q")
HEADER = "content,style,output"


def identity(path: Path) -> tuple[int, int, bytes]:
    """Changes whenever the file is rewritten (atomic saves make a new inode), not only when its bytes differ."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


def statuses(out: Path) -> dict[int | None, str]:
    return {record.row: record.status for record in read_records(out)[0]}


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of a user's photo and painting, as the working folder: the manifest, inputs and `--out .` share it."""
    make_photo(tmp_path / "v.jpg")
    make_painting(tmp_path / "s.jpg")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- 1. a user's photo is never overwritten ----------------------------------------------------------------------


def test_an_output_on_its_own_content_fails_its_row_and_the_photo_survives_byte_for_byte(here: Path) -> None:
    manifest = write_manifest(here / "m.csv", HEADER, "v.jpg,s.jpg,v.jpg", "v.jpg,s.jpg,good.png")
    photo = identity(here / "v.jpg")

    checked = cli("check", manifest.name, "--out", ".")
    assert checked.exit_code == 1, checked.output
    assert "row 1 (line 2), column output: 'v.jpg' would overwrite this row's content v.jpg" in checked.output

    result = cli("run", manifest.name, "--out", ".", *FAST)
    assert result.exit_code != 0, result.output
    assert "row 1" in result.output
    assert identity(here / "v.jpg") == photo
    assert statuses(here) == {1: "failed", 2: "done"}
    assert (here / "good.png").is_file()


def test_an_output_on_another_rows_input_is_refused(here: Path) -> None:
    """Row 1's output would be row 2's content (written before row 2 reads it), row 3's its style, row 4's its init
    image: every input of any row is refused as an output, and the other rows are planned."""
    make_photo(here / "b.png", seed=4)
    make_painting(here / "t.png", seed=6)
    make_photo(here / "i.png", seed=7)
    manifest = write_manifest(
        here / "m.csv",
        "content,style,output,init",
        "v.jpg,s.jpg,b.png,",
        "b.png,s.jpg,c.png,",
        "v.jpg,s.jpg,t.png,",
        "v.jpg,t.png,d.png,i.png",
        "v.jpg,s.jpg,i.png,",
        "v.jpg,s.jpg,fine.png,",
    )
    result = cli("check", manifest.name, "--out", ".")
    assert result.exit_code == 1, result.output
    for line in [
        "row 1 (line 2), column output: 'b.png' would overwrite row 2's content b.png",
        "row 3 (line 4), column output: 't.png' would overwrite row 4's style t.png",
        "row 5 (line 6), column output: 'i.png' would overwrite row 4's init i.png",
    ]:
        assert line in result.output
    assert "6 rows: 3 ok, 3 with problems" in result.output


CAFE = unicodedata.normalize("NFC", "café.jpg")


@pytest.mark.parametrize(
    ("output", "alike"),
    [
        ("link.jpg", ";"),  # a symlink to the photo
        ("CAFÉ.JPG", " (the same file on Windows and macOS"),
        (unicodedata.normalize("NFD", CAFE), " (the same file on Windows and macOS"),  # as macOS writes names
    ],
)
def test_an_output_on_an_input_under_another_name_is_refused(here: Path, output: str, alike: str) -> None:
    """The same file by a symlink, by letter case, or by Unicode normalisation (NFD against the manifest's NFC): one
    file to the disk that runs it, so one file to the check."""
    make_photo(here / CAFE, seed=8)
    os.symlink(here / CAFE, here / "link.jpg")
    manifest = write_manifest(here / "m.csv", HEADER, f"{CAFE},s.jpg,{output}", "v.jpg,s.jpg,ok.png")
    result = cli("check", manifest.name, "--out", ".")
    assert result.exit_code == 1, result.output
    said = f"row 1 (line 2), column output: {output!r} would overwrite this row's content {CAFE}{alike}"
    assert said in result.output
    assert "2 rows: 1 ok, 1 with problems" in result.output


def test_outputs_differing_only_in_unicode_normalisation_clash(tmp_path: Path, images: dict[str, Path]) -> None:
    nfc = unicodedata.normalize("NFC", "café.png")
    nfd = unicodedata.normalize("NFD", nfc)
    manifest = write_manifest(
        tmp_path / "m.csv", HEADER, f"in/photo.png,in/painting.png,{nfc}", f"in/photo2.jpg,in/painting.png,{nfd}"
    )
    result = cli("check", manifest)
    assert result.exit_code == 1, result.output
    assert f"row 2 (line 3), column output: output {nfd!r} differs from row 1's {nfc!r} only in letter case or " in (
        result.output
    )


def test_an_input_named_in_the_other_unicode_normalisation_is_found(tmp_path: Path, images: dict[str, Path]) -> None:
    """The photo's name was written in NFC; the cell, pasted from macOS, is NFD: the same name to a reader, other
    bytes to Linux, and `check` said "no such file"."""
    nfc = unicodedata.normalize("NFC", "café.png")
    (tmp_path / "in" / nfc).write_bytes(images["photo"].read_bytes())
    manifest = write_manifest(
        tmp_path / "m.csv", HEADER, f"in/{unicodedata.normalize('NFD', nfc)},in/painting.png,a.png"
    )
    result = cli("run", manifest, *FAST)
    assert result.exit_code == 0, result.output
    assert statuses(tmp_path / "m") == {1: "done"}


# --- 2. the report and the run's own files are never an output ---------------------------------------------------


def test_an_output_named_contact_sheet_is_refused_and_the_report_writes_only_its_own_names(
    tmp_path: Path, images: dict[str, Path]
) -> None:
    manifest = write_manifest(
        tmp_path / "m.csv", HEADER, "in/photo.png,in/painting.png,contact-sheet.png", "in/photo2.jpg,in/painting.png,"
    )
    checked = cli("check", manifest)
    assert checked.exit_code == 1, checked.output
    assert "row 1 (line 2), column output: 'contact-sheet.png' is where `--report` and `batchstyle report` write " in (
        checked.output
    )

    result = cli("run", manifest, "--report", *FAST)
    assert result.exit_code != 0, result.output
    out = tmp_path / "m"
    assert statuses(out) == {1: "failed", 2: "done"}
    with Image.open(out / CONTACT_SHEET_NAME) as sheet:
        assert sheet.text.get("Software") == "batchstyle report"  # the report's sheet, nobody's output
    # Everything in the folder is the one output or a name the reserved list covers: the writers and the check agree.
    written = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert {PurePath(CONTACT_SHEET_NAME), PurePath(HTML_NAME), PurePath("photo2-painting.png")} <= written
    assert [p for p in written if p.name != "photo2-painting.png" and reserved_problem(p) is None] == []


def test_the_report_never_replaces_an_output_of_an_old_ledger_nor_a_file_of_its_own(
    tmp_path: Path, images: dict[str, Path]
) -> None:
    """A ledger from before such names were refused holds a done row whose output is contact-sheet.png: the report
    refuses (the output survives byte for byte) rather than replace it, as it refuses a sheet it did not write."""
    from batchstyle.run.ledger import Ledger

    out = tmp_path / "night"
    output = make_photo(out / CONTACT_SHEET_NAME)
    before = identity(output)
    with Ledger(out) as ledger:
        run_id = ledger.start_run(tmp_path / "m.csv", [], "random", "random:vgg16:seed0")
        ledger.mark_pending(output, row=1, content="in/photo.png", styles="in/painting.png", key="k", run_id=run_id)
        ledger.mark_running(output, run_id=run_id, device="cpu", model="random", weights="random:vgg16:seed0")
        ledger.mark_finished(output, status="done", seconds=1.0, iterations=2, total_loss=1.0)
        ledger.finish_run(run_id, {"done": 1})
    result = cli("report", out)
    assert result.exit_code == 2, result.output
    assert f"row 1's output is {output}, where the report writes its contact sheet" in result.output
    assert identity(output) == before and not (out / HTML_NAME).exists()

    mine = tmp_path / "mine"
    manifest = write_manifest(tmp_path / "m2.csv", HEADER, "in/photo.png,in/painting.png,a.png")
    assert cli("run", manifest, "--out", mine, *FAST).exit_code == 0
    sheet = make_photo(mine / CONTACT_SHEET_NAME)  # a user's own picture, under the sheet's name
    kept = identity(sheet)
    result = cli("report", mine)
    assert result.exit_code == 2 and "is not a contact sheet batchstyle wrote" in result.output, result.output
    assert identity(sheet) == kept
    sheet.unlink()
    assert cli("report", mine).exit_code == 0
    assert cli("report", mine).exit_code == 0  # its own sheet and page it replaces


@pytest.mark.parametrize(
    ("output", "says"),
    [
        ("Contact-Sheet.PNG", "is where `--report` and `batchstyle report` write the contact sheet"),
        ("a.iterates/scale0-iter00010.png", "lies in a '.iterates' folder"),
        ("clip.mp4.frames/frame-000000.png", "lies in a '.frames' folder"),
        ("bad\nname.png", "holds a control character"),
        ("tab\there.png", "holds a control character"),
    ],
)
def test_an_output_on_a_name_the_run_writes_itself_is_refused(
    tmp_path: Path, images: dict[str, Path], output: str, says: str
) -> None:
    manifest = write_manifest(
        tmp_path / "m.csv", HEADER, f'in/photo.png,in/painting.png,"{output}"', "in/photo2.jpg,in/painting.png,"
    )
    result = cli("check", manifest)
    assert result.exit_code == 1, result.output
    assert f"row 1 (line 2), column output: {output!r} {says}" in result.output
    assert "2 rows: 1 ok, 1 with problems" in result.output


# --- 6. the temp-file sweep takes only its own files ---------------------------------------------------------------


def test_an_output_named_like_an_old_temp_file_survives_a_rerun(tmp_path: Path, images: dict[str, Path]) -> None:
    """`.a.tmp-1.png` is a legal output: the sweep deleted it (and the row was redone) on every rerun, because it
    took any hidden name with `.tmp-` for its own. The temp names now carry a marker no user's file has."""
    manifest = write_manifest(tmp_path / "m.csv", HEADER, "in/photo.png,in/painting.png,.a.tmp-1.png")
    assert cli("run", manifest, *FAST).exit_code == 0
    output = tmp_path / "m" / ".a.tmp-1.png"
    before = identity(output)
    assert not is_temp_file(output)

    result = cli("run", manifest, *FAST)
    assert result.exit_code == 0, result.output
    assert identity(output) == before
    assert statuses(tmp_path / "m") == {1: "done"}


# --- 5. a name too long for its folder ---------------------------------------------------------------------------


def test_an_output_name_too_long_for_its_folder_is_refused_by_check_and_the_good_row_runs(here: Path) -> None:
    """A 300-character name passed `check`, then failed at run time (before that, it crashed the run). Names are
    measured in bytes, as the file system holds them: 106 'é' are 212 bytes. The file name must leave room for the
    temp file it is saved through (41 bytes), so 214 bytes is the longest an output name may be where names hold
    255; a folder in the output's path may take all 255."""
    limit = os.pathconf(here, "PC_NAME_MAX")
    assert limit == 255  # the test's figures are for it; every file system CI runs on holds 255-byte names
    longest = "x" * 210 + ".png"
    manifest = write_manifest(
        here / "m.csv",
        HEADER,
        f"v.jpg,s.jpg,{'x' * 300}.png",
        f"v.jpg,s.jpg,{'é' * 106}.png",
        f"v.jpg,s.jpg,{'d' * 256}/a.png",
        f"v.jpg,s.jpg,{longest}",
        f"v.jpg,s.jpg,{'d' * 255}/b.png",
    )
    checked = cli("check", manifest.name, "--out", "out")
    assert checked.exit_code == 1, checked.output
    fix = "give a shorter output name: names there hold at most 255 bytes"
    for row, what in [(1, "is a file name of 304"), (2, "is a file name of 216"), (3, "has a folder name of 256")]:
        said = [line for line in checked.output.splitlines() if f"row {row} (line {row + 1}), column output: " in line]
        assert len(said) == 1 and f"{what} bytes; {fix}" in said[0], checked.output
    assert "the run saves each output through a temp file 41 bytes longer, so at most 214" in checked.output
    assert "5 rows: 2 ok, 3 with problems" in checked.output

    for _ in range(2):  # the rerun fails it again, and skips the rows done
        result = cli("run", manifest.name, "--out", "out", *FAST)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        assert statuses(here / "out") == {1: "failed", 2: "failed", 3: "failed", 4: "done", 5: "done"}
        assert (here / "out" / longest).is_file() and (here / "out" / ("d" * 255) / "b.png").is_file()


# --- 7. questionable cases, fixed where cheap ----------------------------------------------------------------------


def test_a_folder_at_an_outputs_name_is_refused_by_check(tmp_path: Path, images: dict[str, Path]) -> None:
    (tmp_path / "m" / "x.png").mkdir(parents=True)
    manifest = write_manifest(tmp_path / "m.csv", HEADER, "in/photo.png,in/painting.png,x.png")
    result = cli("check", manifest)
    assert result.exit_code == 1, result.output
    assert f"row 1 (line 2), column output: 'x.png' is a folder already at {tmp_path / 'm' / 'x.png'}" in (
        result.output
    )


@pytest.mark.parametrize("name", ["pipe.png", "pipe.mp4"])
def test_a_named_pipe_as_content_is_refused_without_waiting_for_a_writer(
    tmp_path: Path, images: dict[str, Path], name: str
) -> None:
    """Opening a FIFO blocks until something writes to it: `check` hung, on an image's name and on a video's (FFmpeg
    opens it too). A fresh interpreter, so a hang fails."""
    os.mkfifo(tmp_path / "in" / name)
    manifest = write_manifest(tmp_path / "m.csv", HEADER, f"in/{name},in/painting.png,a{Path(name).suffix}")
    done = subprocess.run(
        [sys.executable, "-m", "batchstyle", "check", str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "column content: " in done.stdout and f"{name} is not a regular file (a named pipe" in done.stdout


@pytest.mark.parametrize(("delimiter", "says"), [(";", "separated by semicolons (;)"), ("\t", "separated by tabs")])
def test_a_manifest_separated_by_something_else_than_commas_gets_a_hint(
    tmp_path: Path, images: dict[str, Path], delimiter: str, says: str
) -> None:
    manifest = write_manifest(
        tmp_path / "m.csv", delimiter.join(["content", "style"]), delimiter.join(["in/photo.png", "in/painting.png"])
    )
    result = cli("check", manifest)
    assert result.exit_code == 2, result.output
    assert says in result.output and "save it as comma-separated CSV" in result.output


def test_a_folder_given_as_the_manifest_says_so(tmp_path: Path, images: dict[str, Path]) -> None:
    write_manifest(tmp_path / "night.csv", "content,style", "in/photo.png,in/painting.png")
    result = cli("check", tmp_path)
    assert result.exit_code == 2, result.output
    assert f"{tmp_path}: is a folder; give the manifest CSV file, e.g. {tmp_path / 'night.csv'}" in result.output


def test_a_one_frame_gif_is_a_style_image_and_an_animated_one_a_clip(tmp_path: Path, images: dict[str, Path]) -> None:
    still = tmp_path / "in" / "still.gif"
    with Image.open(images["painting"]) as painting:
        painting.save(still)
        moving = tmp_path / "in" / "moving.gif"
        frames = [painting, Image.fromarray(255 - np.asarray(painting))]
        frames[0].save(moving, save_all=True, append_images=frames[1:])
    assert not is_clip(still) and is_clip(moving)
    manifest = write_manifest(tmp_path / "m.csv", HEADER, "in/photo.png,in/still.gif,a.png")
    result = cli("check", manifest)
    assert result.exit_code == 0, result.output


def test_the_reserved_names_are_the_run_and_reports_own_in_any_case_and_nothing_else() -> None:
    own = [
        "batchstyle-ledger.sqlite",
        "Batchstyle-Ledger.sqlite-wal",
        "batchstyle-ledger.shard-0-of-4.sqlite",
        ".batchstyle.lock",
        ".batchstyle.shard-0-of-4.lock",
        "REPORT.HTML",
        f".a.png{TEMP_MARKER}12-0123456789abcdef",
        f"sub/.a.png{TEMP_MARKER}12-0123456789abcdef",
        "a.ITERATES/x.png",
    ]
    assert [name for name in own if reserved_problem(PurePath(name)) is None] == []
    users = ["photo.png", ".a.tmp-1.png", "sub/contact-sheet.png", "sub/report.html", "a.iterates.png", "frames/a.png"]
    assert [name for name in users if reserved_problem(PurePath(name)) is not None] == []
