"""Failures a run meets mid-way, each the failure of its own row or a clean stop (issue 26), with real files:
a loss that goes non-finite, an output the file system will not take (a name too long), a full disk under the
ledger, and inputs deleted while the run goes on."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, make_painting, make_photo, write_manifest
from PIL import Image

from batchstyle.manifest import read_manifest
from batchstyle.options import option_values
from batchstyle.run.config import RunConfig
from batchstyle.run.engine import run
from batchstyle.run.ledger import read_records
from batchstyle.run.progress import Silent

FAST = ("--model", "random", "--device", "cpu", "--size", "32", "--iterations", "2", "-q")


def records(out: Path) -> dict[int | None, tuple[str, str | None]]:
    return {record.row: (record.status, record.error) for record in read_records(out)[0]}


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_photo(tmp_path / "v.png")
    make_painting(tmp_path / "s.png")
    # A flat black style is far from any photo: its style loss at the start is ~350 times the painting's (201 to
    # 0.58 with the seeded random network at 32 px), so one weight can overflow float32 for it alone.
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "black.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- a non-finite loss --------------------------------------------------------------------------------------------


def test_a_loss_that_overflows_float32_fails_its_row_and_the_other_of_its_batch_is_done(here: Path) -> None:
    """style_weight 1e37 x the black style's loss (~201) is past float32's 3.4e38, x the painting's (~0.6) is not.
    Both rows share a batch (same settings, same size); the black one fails at its first iteration, naming the
    term and its weight, and writes nothing; the painting's row is done (Adam: its overflowing second moments
    stop its steps, its losses stay finite). Before, the black row was 'done' with an infinite loss and the photo
    unchanged as its output."""
    write_manifest(here / "m.csv", "content,style,output", "v.png,s.png,good.png", "v.png,black.png,bad.png")
    result = cli(
        "run", "m.csv", "--out", "out", *FAST, "--style-weight", "1e37", "--batch-size", "2", "--optimizer", "adam"
    )
    assert result.exit_code == 1, result.output
    found = records(here / "out")
    assert found[1] == ("done", None)
    status, error = found[2]
    assert status == "failed"
    assert error is not None
    assert "the loss is not finite at iteration 1 of 2 at 32 px: style_weight 1e+37 x style 201 overflows" in error
    assert (here / "out" / "good.png").is_file()
    assert not (here / "out" / "bad.png").exists()
    record = next(r for r in read_records(here / "out")[0] if r.row == 1)
    assert record.total_loss is not None and np.isfinite(record.total_loss)


def test_an_lbfgs_run_whose_steps_overflow_fails_at_the_iteration_it_went_nan(here: Path) -> None:
    """With the painting alone, style_weight 1e37 keeps the first losses finite, but L-BFGS's curvature pairs
    (y.y of gradients ~1e33) overflow and its step makes the pixels NaN: the row fails at the first NaN iterate,
    every term named. Before, it was 'done' with its best finite iterate, the optimisation long dead."""
    write_manifest(here / "m.csv", "content,style,output", "v.png,s.png,a.png")
    result = cli("run", "m.csv", "--out", "out", *FAST[:-3], "--iterations", "4", "-q", "--style-weight", "1e37")
    assert result.exit_code == 1, result.output
    status, error = records(here / "out")[1]
    assert status == "failed"
    assert re.search(r"the loss is not finite at iteration [2-4] of 4 at 32 px: content is nan, style is nan", error)
    assert not (here / "out" / "a.png").exists()


# --- an output the file system will not take ----------------------------------------------------------------------


def test_an_output_name_too_long_fails_its_row_alone_and_the_good_row_is_done_on_every_run(here: Path) -> None:
    """Its file cannot be written (the name is past the folder's 255), so its row fails with the fix; the row
    beside it (in the same batch) is done. The rerun, with the output folder there, fails it again rather than
    crashing in the resume scan (OSError: File name too long), and skips the good row. With --save-every, its
    iterates cannot be written either: the row fails, the other's iterates are written."""
    long_name = "x" * 300 + ".png"
    write_manifest(here / "m.csv", "content,style,output", f"v.png,s.png,{long_name}", "v.png,s.png,good.png")
    for attempt in range(2):
        result = cli("run", "m.csv", "--out", "out", *FAST, "--save-every", "1")
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        found = records(here / "out")
        assert found[1][0] == "failed"
        # its iterates folder is the first thing it writes: x * 300 + ".iterates"
        assert "file name too long (a name of 309 characters; names there hold at most 255)" in (found[1][1] or "")
        assert "give the row a shorter output name" in (found[1][1] or "")
        assert found[2] == ("done", None)
        assert (here / "out" / "good.png").is_file()
        assert any((here / "out" / "good.iterates").iterdir())
        assert re.search(rf"skipped +{attempt}\n", result.output), result.output  # the good row, on the rerun


# --- a full disk under the ledger ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real file system of 256 KB (tmpfs, mounted here), unmounted however the test ends."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_stops_the_run_with_one_message_and_a_rerun_with_space_resumes(
    here: Path, small_disk: Path
) -> None:
    """The ledger's journal fills 256 KB after a dozen rows: the run stops with one line naming the ledger, the
    room left and the fix, exit 1, no traceback (there were three, chained). Every output written before stays,
    whole; remounted larger, the same command records them as done (their metadata carries their keys) and does
    only the rest."""
    rows = [f"v.png,s.png,o{i:02d}.png" for i in range(40)]
    write_manifest(here / "m.csv", "content,style,output", *rows)
    out = small_disk / "out"
    result = cli("run", "m.csv", "--out", str(out), *FAST, "--batch-size", "1")
    assert result.exit_code == 1
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert f"cannot write the ledger {out / 'batchstyle-ledger.sqlite'}: database or disk is full" in lines[0]
    assert f"bytes free in {out}); free space there or give the run another --out" in lines[0]
    written = sorted(p.name for p in out.glob("o*.png"))
    assert 0 < len(written) < len(rows)
    before = {name: (out / name).read_bytes() for name in written}
    for name in before:
        assert Image.open(out / name).size == (32, 24), name  # complete files, never a torn write

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = cli("run", "m.csv", "--out", str(out), *FAST, "--batch-size", "1")
    assert again.exit_code == 0, again.output
    assert re.search(rf"skipped +{len(written)}\n", again.output), again.output
    assert {record.status for record in read_records(out)[0]} == {"done"}
    assert {name: (out / name).read_bytes() for name in written} == before


# --- inputs deleted mid-run ---------------------------------------------------------------------------------------


class DeleteWhenPlanned(Silent):
    """Deletes files once the run has planned (keyed) every row and before it hands out the first."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def run_started(self, total: int, to_do: int, model: str, reason: str, device: str) -> None:
        for file in self.files:
            file.unlink()


@pytest.mark.parametrize("when", ["mid-run", "before the run"])
def test_inputs_deleted_fail_their_rows_and_the_only_slot_runs_the_rest(tmp_path: Path, when: str) -> None:
    """Rows 1-3's photos are deleted after the manifest was checked. Mid-run, the worker's three failures in a row
    were taken for its slot's (its view of the disk): the only CPU slot was taken out of the run and rows 4 and 5
    failed with it. This process cannot read those photos either, so they are the rows' failures; rows 4 and 5
    are done. Deleted before the run, they failed the whole run while it hashed the inputs."""
    for i in range(5):
        make_photo(tmp_path / f"c{i}.png", seed=i)
    make_painting(tmp_path / "s.png")
    path = write_manifest(tmp_path / "m.csv", "content,style,output", *[f"c{i}.png,s.png,o{i}.png" for i in range(5)])
    manifest = read_manifest(path, option_values({"size": 32, "iterations": 2}), tmp_path / "out")
    gone = [tmp_path / f"c{i}.png" for i in range(3)]
    if when == "before the run":
        for file in gone:
            file.unlink()
    summary = run(
        manifest,
        RunConfig(model="random", devices="cpu", batch_size=1),
        DeleteWhenPlanned(gone if when == "mid-run" else []),
    )
    assert sorted(summary.done) == [4, 5]
    assert sorted(summary.failed) == [1, 2, 3]
    for number in (1, 2, 3):
        assert f"c{number - 1}.png" in summary.failed[number]
        assert "taken out" not in summary.failed[number]
    assert (tmp_path / "out" / "o3.png").is_file() and (tmp_path / "out" / "o4.png").is_file()
