"""End-to-end tests of the `batchstyle` command: run, rerun, failures, check, status, formats, locking, kill/resume.

Runs go through click's CliRunner (in process) with the seeded random VGG-16 at 32-48 px and a few iterations, so
the whole file takes seconds; a real subprocess is used where only one will do (a lock held by another process, a
run killed with SIGKILL).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import Result
from conftest import MALFORMED, cli, make_photo, write_manifest
from PIL import Image

from batchstyle.api import run_manifest
from batchstyle.cli import main
from batchstyle.errors import RunError
from batchstyle.images import TEMP_MARKER, is_temp_file, load_image, read_metadata, resize_long_side
from batchstyle.model import weights
from batchstyle.model.pixels import image_to_tensor, rgb_to_yiq
from batchstyle.model.precision import decision_path, precision_decision
from batchstyle.model.stylize import style_colours
from batchstyle.options import OPTIONS
from batchstyle.run import engine
from batchstyle.run.config import RUN_SETTINGS
from batchstyle.run.ledger import LEDGER_NAME, LOCK_NAME, Record, read_records

# --device cpu keeps ledger and metadata the same on a GPU host; -q keeps progress bars out of the output.
FAST = ("--model", "random", "--device", "cpu", "--size", "32", "--iterations", "2", "-q")
LEDGER_FILES = {LEDGER_NAME, LEDGER_NAME + "-wal", LEDGER_NAME + "-shm", LOCK_NAME}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny images gain nothing from threads, and on a busy 2-core box OpenMP spinning makes them 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def count(result: Result, name: str) -> int:
    found = re.search(rf"^{name}\s+(\d+)$", result.stdout, re.MULTILINE)
    assert found, result.output
    return int(found.group(1))


def identity(path: Path) -> tuple[int, int]:
    """Changes whenever the file is rewritten (atomic saves make a new inode), not only when its bytes differ."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def assert_complete_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()  # a truncated file fails here
        loaded = img.copy()
        loaded.format = img.format
        return loaded


def visible_files(folder: Path) -> set[str]:
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name not in LEDGER_FILES and not is_temp_file(p)
    }


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if is_temp_file(p)]


def ledger_by_row(out: Path) -> dict[int, Record]:
    records, _ = read_records(out)
    return {r.row: r for r in records}


@pytest.fixture
def three_rows(tmp_path: Path, images: dict[str, Path]) -> Path:
    """Two generated output names and one explicit one; an (empty) iterations column to edit later."""
    return write_manifest(
        tmp_path / "night.csv",
        "content,style,output,iterations",
        "in/photo.png,in/painting.png,,",
        "in/photo2.jpg,in/painting2.png,,",
        "in/photo.png,in/painting2.png,three.png,",
    )


THREE_OUTPUTS = {1: "photo-painting.png", 2: "photo2-painting2.png", 3: "three.png"}
THREE_INPUTS = {1: ("photo.png", "painting.png"), 2: ("photo2.jpg", "painting2.png"), 3: ("photo.png", "painting2.png")}
# photo is 48x36 and photo2 40x56: long side 32, aspect ratio kept.
THREE_SIZES = {1: (32, 24), 2: (23, 32), 3: (32, 24)}


# --- a run and its status --------------------------------------------------------------------------------------


def test_run_writes_outputs_metadata_and_ledger(three_rows: Path, tmp_path: Path) -> None:
    result = cli("run", three_rows, *FAST)
    assert result.exit_code == 0, result.output
    assert (count(result, "done"), count(result, "skipped"), count(result, "failed")) == (3, 0, 0)
    out = tmp_path / "night"  # default: beside the manifest, named after it
    assert visible_files(out) == set(THREE_OUTPUTS.values())
    assert temp_files(out) == []

    for number, name in THREE_OUTPUTS.items():
        img = assert_complete_image(out / name)
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", THREE_SIZES[number])
        meta = read_metadata(out / name)
        assert meta["batchstyle:model"] == "random"
        assert meta["batchstyle:weights"] == weights.SOURCES["random"].sha256
        assert meta["batchstyle:seed"] == "0"
        losses = json.loads(meta["batchstyle:losses"])
        assert set(losses) >= {"content", "style", "tv", "total"}
        assert all(isinstance(v, float) for v in losses.values())
        params = json.loads(meta["batchstyle:params"])
        assert (params["size"], params["iterations"], params["preserve_color"]) == (32, 2, False)
        content, style = (tmp_path / "in" / name for name in THREE_INPUTS[number])
        # color=auto's choice for this pair, as the model layer makes it, is what the file says was made
        assert params["color"] == "auto"
        assert params["colours"] == list(style_colours("auto", load_image(content), [load_image(style)]))
    assert read_metadata(out / "three.png")["batchstyle:content"] == "photo.png"
    assert read_metadata(out / "three.png")["batchstyle:styles"] == "painting2.png"

    rows = ledger_by_row(out)
    assert sorted(rows) == [1, 2, 3]
    for number, record in rows.items():
        assert record.output == THREE_OUTPUTS[number]
        assert record.status == "done"
        assert record.error is None
        assert record.iterations == 2
        assert record.device == "cpu"
        assert record.model == "random"
        assert record.total_loss is not None and record.total_loss > 0
        assert record.content_loss is not None and record.style_loss is not None and record.tv_loss is not None
        assert record.seconds is not None and record.seconds > 0
        assert json.loads(record.params)["size"] == 32


@pytest.mark.parametrize(
    ("measured", "expected"),
    [({"fp32": 1.0, "bf16": 0.5}, "bf16"), ({"fp32": 0.37, "bf16": 1.31}, "fp32")],  # a Zen 4; a Xeon without AMX
)
def test_the_precision_a_row_ran_in_is_what_this_machine_measured(
    tmp_path: Path, images: dict[str, Path], measured: dict[str, float], expected: str
) -> None:
    """`--precision auto` runs what an earlier run measured faster on this machine (its decision is kept in the cache
    folder; here it was made from the timings given), without measuring again, and the row says which it ran in, in
    the ledger and the file: the bf16 path runs for real here."""
    cache = tmp_path / "cache"

    def timings(*_: object) -> dict[str, float]:
        return measured

    seeded = precision_decision(torch.device("cpu"), "auto", "vgg16", cache, timings)
    kept = decision_path(cache, torch.device("cpu"), "vgg16").read_bytes()
    manifest = write_manifest(tmp_path / "m.csv", "content,style", "in/photo.png,in/painting.png")
    result = cli("run", manifest, *FAST, "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    [record] = read_records(tmp_path / "m")[0]
    assert seeded.chosen == record.precision == expected
    assert read_metadata(tmp_path / "m" / record.output)["batchstyle:precision"] == expected
    assert record.total_loss is not None and record.total_loss > 0
    assert decision_path(cache, torch.device("cpu"), "vgg16").read_bytes() == kept  # reused, not measured again
    measured = json.loads(record.params or "{}")["precision_measured"]  # the ledger says what was timed and chosen
    assert measured.startswith(f"{expected} on cpu") and "measured earlier" in measured
    assert f"fp32 {round(1000 * seeded.seconds['fp32'])} ms" in measured


def test_output_in_a_subfolder(tmp_path: Path, images: dict[str, Path]) -> None:
    manifest = write_manifest(tmp_path / "m.csv", "content,style,output", "in/photo.png,in/painting.png,a/b/deep.png")
    result = cli("run", manifest, *FAST)
    assert result.exit_code == 0, result.output
    assert_complete_image(tmp_path / "m" / "a" / "b" / "deep.png")
    assert ledger_by_row(tmp_path / "m")[1].output == "a/b/deep.png"


def test_status_text_and_json(three_rows: Path, tmp_path: Path) -> None:
    assert cli("run", three_rows, *FAST).exit_code == 0
    out = tmp_path / "night"

    as_json = cli("status", out, "--json")
    assert as_json.exit_code == 0
    data = json.loads(as_json.stdout)
    assert data["counts"] == {"pending": 0, "running": 0, "done": 3, "failed": 0}
    assert Path(data["out_dir"]) == out
    assert sorted((r["row"], r["output"], r["status"]) for r in data["rows"]) == [
        (n, name, "done") for n, name in THREE_OUTPUTS.items()
    ]
    assert data["last_run"]["model"] == "random"
    assert json.loads(data["last_run"]["outcome"])["done"] == 3

    text = cli("status", out)
    assert text.exit_code == 0
    assert "3 done" in text.stdout and "0 failed" in text.stdout
    for number, name in THREE_OUTPUTS.items():
        assert re.search(rf"row\s+{number}\s+done\s+{re.escape(name)}\s", text.stdout), text.stdout

    # The manifest itself names its default output folder.
    assert cli("status", three_rows).stdout == text.stdout


def test_status_without_a_ledger_exits_2(tmp_path: Path) -> None:
    result = cli("status", tmp_path)
    assert result.exit_code == 2
    assert "no batchstyle run has written there" in result.output


# --- reruns ------------------------------------------------------------------------------------------------------


def test_rerun_skips_redoes_changed_rows_force_and_deleted_outputs(three_rows: Path, tmp_path: Path) -> None:
    out = tmp_path / "night"
    paths = {n: out / name for n, name in THREE_OUTPUTS.items()}
    assert cli("run", three_rows, *FAST).exit_code == 0
    first = {n: identity(p) for n, p in paths.items()}

    # Same manifest, same options: nothing is redone.
    again = cli("run", three_rows, *FAST)
    assert again.exit_code == 0, again.output
    assert (count(again, "done"), count(again, "skipped"), count(again, "failed")) == (0, 3, 0)
    assert {n: identity(p) for n, p in paths.items()} == first

    # One row's option changes: only that row is redone.
    write_manifest(
        three_rows,
        "content,style,output,iterations",
        "in/photo.png,in/painting.png,,",
        "in/photo2.jpg,in/painting2.png,,3",
        "in/photo.png,in/painting2.png,three.png,",
    )
    changed = cli("run", three_rows, *FAST)
    assert changed.exit_code == 0, changed.output
    assert (count(changed, "done"), count(changed, "skipped")) == (1, 2)
    now = {n: identity(p) for n, p in paths.items()}
    assert now[2] != first[2]
    assert (now[1], now[3]) == (first[1], first[3])
    assert ledger_by_row(out)[2].iterations == 3
    assert json.loads(read_metadata(paths[2])["batchstyle:params"])["iterations"] == 3

    # A changed input file (same path, new bytes) is a changed row too.
    make_photo(tmp_path / "in" / "photo2.jpg", 40, 56, seed=11)
    content_changed = cli("run", three_rows, *FAST)
    assert (count(content_changed, "done"), count(content_changed, "skipped")) == (1, 2)
    after_content = {n: identity(p) for n, p in paths.items()}
    assert after_content[2] != now[2]
    assert (after_content[1], after_content[3]) == (first[1], first[3])

    # --force redoes every row.
    forced = cli("run", three_rows, *FAST, "--force")
    assert forced.exit_code == 0, forced.output
    assert (count(forced, "done"), count(forced, "skipped")) == (3, 0)
    after_force = {n: identity(p) for n, p in paths.items()}
    assert all(after_force[n] != after_content[n] for n in paths)

    # A deleted output is redone, and only it.
    paths[3].unlink()
    redo = cli("run", three_rows, *FAST)
    assert redo.exit_code == 0, redo.output
    assert (count(redo, "done"), count(redo, "skipped")) == (1, 2)
    assert paths[3].is_file()
    assert {n: identity(paths[n]) for n in (1, 2)} == {n: after_force[n] for n in (1, 2)}
    assert all(r.status == "done" for r in ledger_by_row(out).values())


def test_changing_a_command_line_option_redoes_every_row(three_rows: Path, tmp_path: Path) -> None:
    assert cli("run", three_rows, *FAST).exit_code == 0
    result = cli("run", three_rows, *FAST, "--style-weight", "5")
    assert (count(result, "done"), count(result, "skipped")) == (3, 0)
    assert all(json.loads(r.params)["style_weight"] == 5.0 for r in ledger_by_row(tmp_path / "night").values())


# --- failing rows ------------------------------------------------------------------------------------------------


@pytest.fixture
def bad_rows(tmp_path: Path, images: dict[str, Path]) -> Path:
    (tmp_path / "in" / "corrupt-content.png").write_text("not an image at all\n")
    return write_manifest(
        tmp_path / "mixed.csv",
        "content,style,output,iterations",
        "in/photo.png,in/painting.png,good.png,",
        "in/photo.png,in/missing-style.png,two.png,",
        "in/corrupt-content.png,in/painting.png,three.png,",
        "in/photo2.jpg,in/painting.png,four.png,lots",
    )


BAD = {2: ("style", "missing-style.png"), 3: ("content", "corrupt-content.png"), 4: ("iterations", "'lots'")}


def test_failing_rows_are_recorded_and_the_run_goes_on(bad_rows: Path, tmp_path: Path) -> None:
    result = cli("run", bad_rows, *FAST)
    assert result.exit_code == 1, result.output
    assert (count(result, "done"), count(result, "skipped"), count(result, "failed")) == (1, 0, 3)
    out = tmp_path / "mixed"
    assert_complete_image(out / "good.png")
    assert visible_files(out) == {"good.png"}
    for number, (_, name) in BAD.items():
        assert re.search(rf"^  row {number}: .*{re.escape(name)}", result.stdout, re.MULTILINE), result.stdout

    text = cli("status", out)
    assert "1 done" in text.stdout and "3 failed" in text.stdout
    assert re.search(r"row\s+1\s+done\s+good\.png", text.stdout)
    for number, (column, name) in BAD.items():
        assert re.search(rf"row\s+{number}\s+failed", text.stdout), text.stdout
        assert re.search(rf"row {number} \(line {number + 1}\), column {column}: .*{re.escape(name)}", text.stdout)

    data = json.loads(cli("status", out, "--json").stdout)
    assert data["counts"]["failed"] == 3 and data["counts"]["done"] == 1
    errors = {r["row"]: r["error"] for r in data["rows"] if r["status"] == "failed"}
    assert sorted(errors) == [2, 3, 4]
    for number, (column, name) in BAD.items():
        assert f"row {number}" in errors[number] and column in errors[number] and name in errors[number]

    # Rerun: the good row is skipped, the bad ones fail again, still exit 1.
    again = cli("run", bad_rows, *FAST)
    assert again.exit_code == 1
    assert (count(again, "done"), count(again, "skipped"), count(again, "failed")) == (0, 1, 3)

    # Fixed manifest: the old validation failures are not left behind in the ledger.
    write_manifest(bad_rows, "content,style,output", "in/photo.png,in/painting.png,good.png")
    fixed = cli("run", bad_rows, *FAST)
    assert fixed.exit_code == 0, fixed.output
    assert json.loads(cli("status", out, "--json").stdout)["counts"] == {
        "pending": 0,
        "running": 0,
        "done": 1,
        "failed": 0,
    }


@pytest.mark.parametrize(
    "targets",
    [
        "torch",
        "ort",
    ],
)
def test_a_row_failing_at_run_time_does_not_stop_the_others(
    tmp_path: Path, images: dict[str, Path], targets: str
) -> None:
    """relu5_4 exists in VGG-19 only: `check` cannot know the model, the run finds out on that row alone."""
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,style_layers",
        'in/photo2.jpg,in/painting.png,deep.png,"relu1_1,relu5_4"',
        "in/photo.png,in/painting.png,good.png,",
    )
    assert cli("check", manifest).exit_code == 0
    result = cli("run", manifest, *FAST, "--targets", targets)
    assert result.exit_code == 1, result.output
    assert (count(result, "done"), count(result, "failed")) == (1, 1)
    assert_complete_image(tmp_path / "m" / "good.png")
    assert not (tmp_path / "m" / "deep.png").exists()
    record = ledger_by_row(tmp_path / "m")[1]
    assert record.status == "failed"
    assert "row 1" in record.error and "photo2.jpg" in record.error and "relu5_4" in record.error


def test_check_reports_every_problem_by_row(bad_rows: Path, tmp_path: Path) -> None:
    result = cli("check", bad_rows)
    assert result.exit_code == 1
    for number, (column, name) in BAD.items():
        assert re.search(
            rf"^{re.escape(str(bad_rows))}, row {number} \(line {number + 1}\), column {column}: .*{re.escape(name)}",
            result.stdout,
            re.MULTILINE,
        ), result.stdout
    assert "row 1 " not in result.stdout
    assert "4 rows: 1 ok, 3 with problems" in result.stdout
    assert not (tmp_path / "mixed").exists(), "check must not create the output folder"


def test_check_of_a_clean_manifest_is_fast_and_loads_no_network(
    three_rows: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("check loaded weights or started a run")

    monkeypatch.setattr(weights.WeightSource, "load", refuse)
    monkeypatch.setattr(engine, "run", refuse)
    start = time.perf_counter()
    result = cli("check", three_rows)
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert "model:" not in result.output
    assert "3 rows: 3 ok, 0 with problems" in result.stdout
    assert str(tmp_path / "night") in result.stdout
    assert elapsed < 5
    assert not (tmp_path / "night").exists()


def test_check_with_out_dir(tmp_path: Path, images: dict[str, Path]) -> None:
    manifest = write_manifest(tmp_path / "m.csv", "content,style,output", "in/photo.png,in/painting.png,../x.png")
    result = cli("check", manifest, "--out", tmp_path / "a" / "b")
    assert result.exit_code == 1
    assert f"outside the output folder {tmp_path / 'a' / 'b'}" in result.stdout
    assert result.stdout.rstrip().endswith(f"outputs to {tmp_path / 'a' / 'b'}")
    assert not (tmp_path / "a").exists()


# --- exit code 2: unusable manifest or command line ----------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "rows", "extra", "message"),
    [
        (None, (), (), "no such manifest file"),
        ("content,output", ("in/photo.png,x.png",), (), "no style column"),
        ("content,style,colour", ("in/photo.png,in/painting.png,red",), (), "unknown column 'colour'"),
        ("content,style", (), (), "no rows"),
        ("content,style", ("in/photo.png,in/painting.png",), ("--size", "abc"), "--size"),
        ("content,style", ("in/photo.png,in/painting.png",), ("--iterations", "0"), "--iterations"),
        ("content,style", ("in/photo.png,in/painting.png",), ("--optimizer", "sgd"), "--optimizer"),
        ("content,style", ("in/photo.png,in/painting.png",), ("--format", "gif"), "--format"),
        ("content,style", ("in/photo.png,in/painting.png",), ("--model", "vgg99"), "unknown model 'vgg99'"),
        ("content,style", ("in/photo.png,in/painting.png",), ("--bogus-flag",), "--bogus-flag"),
    ],
)
def test_unusable_manifest_or_command_line_exits_2(
    tmp_path: Path,
    images: dict[str, Path],
    header: str | None,
    rows: tuple[str, ...],
    extra: tuple[str, ...],
    message: str,
) -> None:
    manifest = tmp_path / "m.csv"
    if header is not None:
        write_manifest(manifest, header, *rows)
    args = ["--model", "random", "--device", "cpu", "--size", "32", "--iterations", "2", "-q", *extra]
    result = cli("run", manifest, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "m").exists(), "nothing may be written before the command line and manifest are vetted"
    if not extra:
        assert cli("check", manifest).exit_code == 2


@pytest.mark.parametrize("name", list(MALFORMED))
@pytest.mark.parametrize("command", ["check", "run"])
def test_malformed_manifest_exits_2_naming_the_line_before_any_work(
    tmp_path: Path, images: dict[str, Path], command: str, name: str
) -> None:
    data, line, parts = MALFORMED[name]
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(data)
    args = FAST if command == "run" else ()
    result = cli(command, manifest, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {manifest}, line {line}: "), result.stderr
    assert parts[0] in result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "m.csv"], "no output folder, no ledger"


def test_device_without_cuda_exits_2(three_rows: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    result = cli("run", three_rows, "--model", "random", "--device", "cuda", "-q")
    assert result.exit_code == 2
    assert "no CUDA GPU" in result.output
    assert not (tmp_path / "night").exists()


# --- output formats, JSON log ------------------------------------------------------------------------------------


def test_output_formats_carry_metadata(tmp_path: Path, images: dict[str, Path]) -> None:
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style,output",
        "in/photo.png,in/painting.png,a.jpg",
        "in/photo.png,in/painting.png,b.webp",
        "in/photo.png,in/painting.png,c.tif",
        "in/photo2.jpg,in/painting.png,",
    )
    result = cli("run", manifest, *FAST, "--format", "jpg")
    assert result.exit_code == 0, result.output
    out = tmp_path / "m"
    expected = {"a.jpg": "JPEG", "b.webp": "WEBP", "c.tif": "TIFF", "photo2-painting.jpg": "JPEG"}
    assert visible_files(out) == set(expected)
    for name, fmt in expected.items():
        img = assert_complete_image(out / name)
        assert img.format == fmt
        assert max(img.size) == 32
        meta = read_metadata(out / name)
        assert meta["batchstyle:model"] == "random"
        assert "total" in json.loads(meta["batchstyle:losses"])
        assert json.loads(meta["batchstyle:params"])["size"] == 32


def test_log_json_events(three_rows: Path, tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    assert cli("run", three_rows, *FAST, "--log-json", log).exit_code == 0
    events = [json.loads(line) for line in log.read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names[0] == "run_started" and names[-1] == "run_finished"
    assert events[0]["rows"] == 3 and events[0]["to_do"] == 3 and events[0]["model"] == "random"
    finished = [e for e in events if e["event"] == "row_finished"]
    assert sorted(e["row"] for e in finished) == [1, 2, 3]
    assert {e["output"] for e in finished} == set(THREE_OUTPUTS.values())
    assert all(e["status"] == "done" and isinstance(e["total"], float) for e in finished)
    assert events[-1]["done"] == 3 and events[-1]["failed"] == 0
    assert all(isinstance(e["time"], float) for e in events)

    # Appended on the next run, which skips everything.
    assert cli("run", three_rows, *FAST, "--log-json", log).exit_code == 0
    second = [json.loads(line) for line in log.read_text().splitlines()][len(events) :]
    assert second[0]["event"] == "run_started" and second[0]["to_do"] == 0
    assert second[-1]["event"] == "run_finished" and second[-1]["skipped"] == 3


# --- what the pictures look like ---------------------------------------------------------------------------------


def chroma(img: Image.Image) -> torch.Tensor:
    return rgb_to_yiq(image_to_tensor(img))[0, 1:].double()


def test_preserve_color_keeps_the_contents_chroma(tmp_path: Path, images: dict[str, Path]) -> None:
    # Noise init makes the plain run's colours its own, so the comparison cannot pass by doing nothing.
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,preserve_color",
        "in/photo.png,in/painting.png,kept.png,true",
        "in/photo.png,in/painting.png,free.png,false",
    )
    result = cli("run", manifest, *FAST, "--iterations", "5", "--init", "noise")
    assert result.exit_code == 0, result.output
    content = chroma(resize_long_side(load_image(images["photo"]), 32))
    kept = chroma(load_image(tmp_path / "m" / "kept.png"))
    free = chroma(load_image(tmp_path / "m" / "free.png"))
    kept_error = (kept - content).abs().mean().item()
    free_error = (free - content).abs().mean().item()
    assert kept_error < 0.01, kept_error
    assert kept_error < free_error / 3, (kept_error, free_error)
    # The luminance was still stylized: the output is not the content.
    y_kept = rgb_to_yiq(image_to_tensor(load_image(tmp_path / "m" / "kept.png")))[0, 0]
    y_content = rgb_to_yiq(image_to_tensor(resize_long_side(load_image(images["photo"]), 32)))[0, 0]
    assert (y_kept - y_content).abs().mean().item() > 0.02
    assert json.loads(read_metadata(tmp_path / "m" / "kept.png")["batchstyle:params"])["color"] == "luminance"


def test_blended_styles_differ_from_one_style(tmp_path: Path, images: dict[str, Path]) -> None:
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,style_blend_weights",
        "in/photo.png,in/painting.png,single.png,",
        "in/photo.png,in/painting.png;in/painting2.png,blend.png,0.7;0.3",
        "in/photo.png,in/painting.png;in/painting2.png,only-first.png,1;0",
    )
    # Adam moves every pixel steadily, so the two style targets visibly pull the image apart in a few steps.
    result = cli("run", manifest, *FAST, "--iterations", "6", "--optimizer", "adam", "--learning-rate", "0.05")
    assert result.exit_code == 0, result.output
    out = tmp_path / "m"
    single, blend, only_first = (
        image_to_tensor(load_image(out / name)) for name in ("single.png", "blend.png", "only-first.png")
    )
    assert (blend - single).abs().max().item() > 2 / 255
    # A zero-weighted second style contributes nothing: same pixels as the single style, give or take rounding.
    assert (only_first - single).abs().max().item() <= 1 / 255
    meta = read_metadata(out / "blend.png")
    assert meta["batchstyle:styles"] == "painting.png;painting2.png"
    assert meta["batchstyle:style_blend_weights"] == "0.7;0.3"


# --- one run per output folder -----------------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from batchstyle.run.ledger import Ledger
ledger = Ledger(sys.argv[1])
print("ready", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_busy_folder_exits_2(three_rows: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=subprocess_env()
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        result = cli("run", three_rows, *FAST, "--out", out)
        assert result.exit_code == 2, result.output
        assert "another batchstyle run" in result.output
        assert f"pid {holder.pid}" in result.output
        assert str(out) in result.output
        assert visible_files(out) == set()
        # Status still reads the folder while it is held.
        assert cli("status", out, "--json").exit_code == 0
    finally:
        holder.kill()
        holder.wait(timeout=30)
        if holder.stdout:
            holder.stdout.close()
    # The holder died: the folder is free again.
    assert cli("run", three_rows, *FAST, "--out", out).exit_code == 0


# --- SIGKILL at any moment, then resume ------------------------------------------------------------------------


def done_rows(out: Path) -> set[int]:
    path = out / LEDGER_NAME
    if not path.is_file():
        return set()
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return {r[0] for r in conn.execute("SELECT row FROM rows WHERE status = 'done'")}
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the schema is not there yet
        return set()


def test_sigkill_then_resume(tmp_path: Path, images: dict[str, Path]) -> None:
    # Row 1 is quick so that the kill lands while a later, longer row is being stylized.
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,iterations",
        "in/photo.png,in/painting.png,r1.png,2",
        "in/photo2.jpg,in/painting.png,r2.png,",
        "in/photo.png,in/painting2.png,r3.png,",
        "in/photo2.jpg,in/painting2.png,r4.png,",
    )
    out = tmp_path / "O"
    options = ("--model", "random", "--device", "cpu", "--size", "48", "--iterations", "15", "-q", "--out", out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchstyle", "run", str(manifest), *map(str, options)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
    )
    try:
        deadline = time.monotonic() + 60
        while not done_rows(out):
            assert proc.poll() is None, f"the run ended early: {proc.stderr.read() if proc.stderr else ''}"
            assert time.monotonic() < deadline, "no row was done within 60 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    before = done_rows(out)
    assert 1 in before and len(before) < 4, before
    # Nothing but finished outputs, the ledger, the lock and hidden temp files; every visible image is whole.
    for path in out.rglob("*"):
        if path.name in LEDGER_FILES or is_temp_file(path):
            continue
        assert path.suffix == ".png", path
        assert_complete_image(path)
    outputs = {n: out / f"r{n}.png" for n in range(1, 5)}
    kept = {n: identity(outputs[n]) for n in before}
    # As if the kill had also landed in the middle of a save.
    stale = out / f".r4.png{TEMP_MARKER}1234-0123456789abcdef"
    stale.write_bytes(outputs[1].read_bytes()[:100])

    result = cli("run", manifest, *options)
    assert result.exit_code == 0, result.output
    assert count(result, "skipped") == len(before)
    assert count(result, "done") == 4 - len(before)
    assert {n: identity(outputs[n]) for n in before} == kept
    assert temp_files(out) == []
    assert visible_files(out) == {f"r{n}.png" for n in range(1, 5)}
    for path in outputs.values():
        assert assert_complete_image(path).size in {(48, 36), (34, 48)}
    records = ledger_by_row(out)
    assert sorted(records) == [1, 2, 3, 4]
    assert all(r.status == "done" for r in records.values())
    assert records[2].iterations == 15 and records[1].iterations == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--device", "gpu"), "unknown device"),
        (("--log-json", "/nonexistent-dir/log.jsonl"), "cannot write the --log-json file"),
    ],
)
def test_unusable_run_settings_exit_2_before_any_work(
    tmp_path: Path, three_rows: Path, args: tuple[str, ...], message: str
) -> None:
    result = cli("run", three_rows, *FAST, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "night").exists() or not visible_files(tmp_path / "night")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("workers_per_device", "0"),
        ("batch_size", "many"),
        ("retries", "-1"),
        ("stall_timeout", "soon"),
        ("precision", "fp16"),
        ("backend", "slurm"),
        ("clip_chunks", "-2"),
        ("max_memory", "1x"),
        ("tile", "-1"),
    ],
)
def test_a_bad_run_setting_is_refused_in_the_same_words_by_the_flag_and_the_keyword(
    tmp_path: Path, three_rows: Path, name: str, text: str
) -> None:
    """One check per setting (`RunConfig`), whichever surface the value came in by."""
    with pytest.raises(RunError) as refused:
        run_manifest(three_rows, out=tmp_path / "py", **{name: text})
    assert str(refused.value).startswith(RUN_SETTINGS[name].flag_name)
    result = cli("run", three_rows, *FAST, RUN_SETTINGS[name].flag_name, text)
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {refused.value}\n"
    assert not (tmp_path / "night").exists() and not (tmp_path / "py").exists()


def test_the_run_commands_flags_are_the_run_settings_table() -> None:
    """Names, aliases and defaults come from `RUN_SETTINGS`; nothing else is a run-level flag."""
    params = {param.name: param for param in main.commands["run"].params}
    flagged = {name: setting for name, setting in RUN_SETTINGS.items() if setting.flag}
    assert set(flagged) <= set(params)
    for name, setting in flagged.items():
        assert params[name].opts + params[name].secondary_opts == [setting.flag_name, *setting.aliases], name
        assert params[name].default == setting.default, name
    own = {"manifest_path", "out_dir", "fmt", "quiet", "log_json", "make_report", "cache_dir"}
    own |= {"contents", "styles", "pair"}  # the folder form's sources, which stand in for MANIFEST
    own |= {"serve_at"}  # --serve: watching a run changes nothing it computes (batchstyle.serve)
    assert set(params) - set(OPTIONS) - own == set(flagged)


def test_an_output_whose_done_never_reached_the_ledger_is_not_redone(three_rows: Path) -> None:
    """A kill between the rename and the ledger write leaves a finished file and a `running` row."""
    assert cli("run", three_rows, *FAST).exit_code == 0
    out = three_rows.parent / "night"
    before = {name: identity(out / name) for name in visible_files(out)}
    with sqlite3.connect(out / LEDGER_NAME) as conn:
        conn.execute("UPDATE rows SET status = 'running' WHERE row = 2")
    again = cli("run", three_rows, *FAST)
    assert again.exit_code == 0 and count(again, "skipped") == 3, again.output
    assert {name: identity(out / name) for name in visible_files(out)} == before
    assert ledger_by_row(out)[2].status == "done"


def test_help_states_each_options_default() -> None:
    """Options whose default depends on another say so in their own words, never a made-up one."""
    text = " ".join(cli("run", "--help").stdout.split())
    assert "[default: 512]" in text and "[default: relu4_2]" in text
    assert "(default: iterations / 4" in text and "(default: equal)" in text and "0.02 for Adam" in text
    assert "when there are several (0: as many as iterations). [default: 100]" in text
    assert "per optimizer" not in text and "[default: ]" not in text
