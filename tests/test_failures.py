"""Failures a run meets mid-way, each the failure of its own row or a clean stop (issue 26), with real files:
a loss that goes non-finite, a full disk under the ledger or under the outputs, and inputs deleted while the run
goes on. (A name too long for its folder is refused before any work: tests/test_safety.py.)"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
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


# --- a full disk under the ledger ---------------------------------------------------------------------------------


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], Path]]:
    """Mounts a real file system of a given size (tmpfs) at a folder; unmounted however the test ends."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(folder: Path, size: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if made.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    try:
        yield mount
    finally:
        for folder in reversed(mounted):
            subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path, tmpfs: Callable[[Path, str], Path]) -> Path:
    """A real file system of 256 KB."""
    return tmpfs(tmp_path / "small", "256k")


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


def test_a_full_disk_under_the_outputs_stops_the_run_and_leaves_the_rest_to_do(
    here: Path, tmpfs: Callable[[Path, str], Path]
) -> None:
    """The outputs go to a 64 KB tmpfs, the ledger beside it on the test's disk: after a dozen rows no output fits.
    Every row then failed with 'no space left', and three in a row took the only slot out of the run, so the rows
    left failed with 'every worker was taken out'. A full disk is its folder's: the run stops handing out rows,
    says so once, naming the folder and the room left (exit 1); no row fails, the rows left stay to do, and the
    same command with room does them."""
    rows = [f"v.png,s.png,full/o{i:02d}.png" for i in range(30)]
    write_manifest(here / "m.csv", "content,style,output", *rows)
    out = here / "out"
    full = tmpfs(out / "full", "64k")
    result = cli("run", "m.csv", "--out", str(out), *FAST, "--batch-size", "1")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "taken out" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert re.search(
        rf"no room left in {re.escape(str(full))} \([0-9,]+ bytes free\): the run stopped with \d+ rows", lines[0]
    )
    assert "free space there or give the run another --out, then run the same command again" in lines[0]
    written = sorted(p.name for p in full.glob("o*.png"))
    assert 0 < len(written) < len(rows)
    found = records(out)
    assert sorted(number for number, (status, _) in found.items() if status == "done") == list(
        range(1, len(written) + 1)
    )
    assert {status for status, _ in found.values()} == {"done", "pending"}
    assert any("no space left on device" in (error or "") for _, error in found.values())
    before = {name: (full / name).read_bytes() for name in written}

    subprocess.run(["mount", "-o", "remount,size=1m", str(full)], check=True)
    again = cli("run", "m.csv", "--out", str(out), *FAST, "--batch-size", "1")
    assert again.exit_code == 0, again.output
    assert re.search(rf"skipped +{len(written)}\n", again.output), again.output
    assert {status for status, _ in records(out).values()} == {"done"}
    assert {name: (full / name).read_bytes() for name in written} == before
    assert len(list(full.glob("o*.png"))) == len(rows)


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
