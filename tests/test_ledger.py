"""Tests for batchstyle.run.ledger: the SQLite record of an output folder, its row states and its folder lock.

The lock tests use real second processes: an flock is only worth something if it holds against another process
and vanishes when that process is killed.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from batchstyle.run import ledger as ledger_module
from batchstyle.run.ledger import (
    LEDGER_NAME,
    LOCK_NAME,
    SCHEMA_VERSION,
    STATUSES,
    Ledger,
    LedgerBusy,
    LedgerError,
    Planned,
    pack_history,
    read_records,
    summarise,
    unpack_history,
)

# Holds the folder's ledger (and writes some rows) until killed; prints "ready" once the lock is held.
HOLDER = """
import sys, time
from pathlib import Path
from batchstyle.run.ledger import Ledger
out = Path(sys.argv[1])
ledger = Ledger(out)
run = ledger.start_run(out / "m.csv", [], "random", "w")
ledger.mark_pending(out / "a.png", row=1, content="c.png", styles="s.png", key="ka", run_id=run)
ledger.mark_running(out / "a.png", run_id=run, device="cpu", model="random", weights="w")
ledger.mark_finished(out / "a.png", status="done", iterations=3, total_loss=1.5)
ledger.mark_pending(out / "b.png", row=2, content="c.png", styles="s.png", key="kb", run_id=run)
ledger.mark_running(out / "b.png", run_id=run, device="cpu", model="random", weights="w")
print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A separate process holding tmp_path/out's ledger, killed (SIGKILL) at teardown if the test did not."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def start(ledger: Ledger, output: Path, key: str = "k1", row: int = 1) -> int:
    run_id = ledger.start_run(ledger.out_dir / "m.csv", ["batchstyle", "run"], "random", "random:w")
    ledger.mark_pending(output, row=row, content="in/c.png", styles="in/s.png", key=key, run_id=run_id)
    return run_id


def test_schema_is_created_with_its_version_and_the_lock_file_names_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    with Ledger(out) as ledger:
        assert (out / LEDGER_NAME).is_file()
        assert (out / LOCK_NAME).read_text() == str(os.getpid())
        tables = {r[0] for r in ledger.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"runs", "rows"} <= tables
        assert ledger.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert ledger.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert ledger.records() == []
    # Reopening keeps what is there.
    with Ledger(out) as ledger:
        assert ledger.records() == []


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    with Ledger(tmp_path):
        pass
    conn = sqlite3.connect(tmp_path / LEDGER_NAME)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerError, match="newer batchstyle"):
        Ledger(tmp_path)


def test_row_transitions_pending_running_done(tmp_path: Path) -> None:
    output = tmp_path / "sub" / "a.png"
    with Ledger(tmp_path) as ledger:
        run_id = start(ledger, output)
        record = ledger.get(output)
        assert record is not None
        assert (record.output, record.row, record.status, record.key, record.run_id) == (
            "sub/a.png",
            1,
            "pending",
            "k1",
            run_id,
        )
        assert (record.content, record.styles) == ("in/c.png", "in/s.png")

        ledger.mark_running(output, run_id=run_id, device="cpu", model="random", weights="random:w")
        record = ledger.get(output)
        assert record.status == "running"
        assert record.started is not None and record.finished is None
        assert (record.device, record.model, record.weights) == ("cpu", "random", "random:w")

        ledger.mark_finished(
            output,
            status="done",
            seconds=1.25,
            iterations=5,
            content_loss=0.5,
            style_loss=2.0,
            tv_loss=0.1,
            total_loss=2.6,
            params='{"size": 32}',
        )
        record = ledger.get(output)
        assert record.status == "done"
        assert record.finished >= record.started
        assert (record.seconds, record.iterations, record.total_loss, record.params) == (1.25, 5, 2.6, '{"size": 32}')
        assert record.error is None

        # Redoing it: pending again, but the last results stay visible until the row is actually redone.
        ledger.mark_pending(output, row=1, content="in/c.png", styles="in/s.png", key="k2", run_id=run_id)
        record = ledger.get(output)
        assert (record.status, record.key, record.total_loss, record.iterations) == ("pending", "k2", 2.6, 5)
        ledger.mark_running(output, run_id=run_id, device="cpu", model="random", weights="random:w")
        ledger.mark_finished(output, status="failed", error="row 1 (c.png): boom")
        record = ledger.get(output)
        assert (record.status, record.error) == ("failed", "row 1 (c.png): boom")

        # Running clears the last error.
        ledger.mark_running(output, run_id=run_id, device="cpu", model="random", weights="random:w")
        assert ledger.get(output).error is None
        assert [r.output for r in ledger.records()] == ["sub/a.png"]


def test_invalid_transitions(tmp_path: Path) -> None:
    with Ledger(tmp_path) as ledger:
        with pytest.raises(KeyError, match="no row"):
            ledger.mark_running(tmp_path / "never.png", run_id=1, device="cpu", model="m", weights="w")
        start(ledger, tmp_path / "a.png")
        with pytest.raises(ValueError):
            ledger.mark_finished(tmp_path / "a.png", status="running")
        with pytest.raises(ValueError):
            ledger.get(tmp_path.parent / "outside.png")


def test_failed_unstarted_row(tmp_path: Path) -> None:
    with Ledger(tmp_path) as ledger:
        run_id = ledger.start_run(tmp_path / "m.csv", [], "random", "w")
        ledger.mark_failed_unstarted(
            tmp_path / ".invalid-row3", row=3, content="", styles="", run_id=run_id, error="row 3: no such file"
        )
        (record,) = ledger.records()
        assert (record.row, record.status, record.key, record.error) == (3, "failed", "invalid", "row 3: no such file")
        assert not ledger.is_done(tmp_path / ".invalid-row3", "invalid")


def test_is_done_needs_matching_key_done_status_and_the_file(tmp_path: Path) -> None:
    output = tmp_path / "a.png"
    with Ledger(tmp_path) as ledger:
        assert not ledger.is_done(output, "k1")  # no record at all
        run_id = start(ledger, output)
        output.write_bytes(b"finished image")
        assert not ledger.is_done(output, "k1")  # pending
        ledger.mark_running(output, run_id=run_id, device="cpu", model="random", weights="w")
        assert not ledger.is_done(output, "k1")  # running
        ledger.mark_finished(output, status="done", iterations=1)
        assert ledger.is_done(output, "k1")
        assert not ledger.is_done(output, "k2")  # changed inputs or options
        output.unlink()
        assert not ledger.is_done(output, "k1")  # file gone
        output.write_bytes(b"back")
        assert ledger.is_done(output, "k1")
        ledger.mark_finished(output, status="failed", error="x")
        assert not ledger.is_done(output, "k1")


def test_runs_are_recorded(tmp_path: Path) -> None:
    with Ledger(tmp_path) as ledger:
        run_id = ledger.start_run(tmp_path / "m.csv", ["batchstyle", "run", "m.csv"], "random", "random:w")
        ledger.finish_run(run_id, {"done": 2, "skipped": 1, "failed": 0})
    _, last = read_records(tmp_path)
    assert last is not None
    assert last["id"] == run_id
    assert last["manifest"] == str(tmp_path / "m.csv")
    assert last["model"] == "random"
    assert last["finished"] >= last["started"]
    assert '"skipped": 1' in last["outcome"]
    assert '"m.csv"' in last["argv"]


def test_second_ledger_in_process_is_busy(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Ledger(out):
        with pytest.raises(LedgerBusy) as caught:
            Ledger(out)
        message = str(caught.value)
        assert str(out) in message
        assert f"pid {os.getpid()}" in message
        assert "another batchstyle run" in message
    # Released on close: the folder can be opened again.
    with Ledger(out) as again:
        assert again.records() == []


def test_other_process_holding_the_folder_makes_it_busy_until_killed(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    out = tmp_path / "out"
    with pytest.raises(LedgerBusy) as caught:
        Ledger(out)
    assert str(out) in str(caught.value)
    assert f"pid {holder.pid}" in str(caught.value)
    # Still busy on a second try: a refused attempt must not break the holder's lock.
    with pytest.raises(LedgerBusy):
        Ledger(out)

    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)

    # The OS dropped the lock with the process; what it committed before dying is all there.
    with Ledger(out) as ledger:
        records = {r.output: r for r in ledger.records()}
        assert set(records) == {"a.png", "b.png"}
        assert (records["a.png"].status, records["a.png"].iterations, records["a.png"].total_loss) == ("done", 3, 1.5)
        assert records["b.png"].status == "running"  # the next run redoes it
        assert (out / LOCK_NAME).read_text() == str(os.getpid())


def test_read_records_works_while_another_process_writes(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    records, last = read_records(tmp_path / "out")
    assert [(r.output, r.row, r.status) for r in records] == [("a.png", 1, "done"), ("b.png", 2, "running")]
    assert last is not None and last["finished"] is None
    assert holder.poll() is None


def test_read_records_is_read_only_while_a_ledger_is_open(tmp_path: Path) -> None:
    output = tmp_path / "a.png"
    with Ledger(tmp_path) as ledger:
        run_id = start(ledger, output)
        records, last = read_records(tmp_path)
        assert [(r.output, r.status) for r in records] == [("a.png", "pending")]
        assert last is not None and last["id"] == run_id
        # A later write by the holder is seen by the next read.
        ledger.mark_running(output, run_id=run_id, device="cpu", model="random", weights="w")
        assert read_records(tmp_path)[0][0].status == "running"
        # The reader cannot write.
        conn = sqlite3.connect(f"file:{tmp_path / LEDGER_NAME}?mode=ro", uri=True)
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("DELETE FROM rows")
        conn.close()
        assert records[0].as_dict()["output"] == "a.png"


def test_read_records_without_a_ledger(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no batchstyle run has written there"):
        read_records(tmp_path)
    # Reading must not create one.
    assert not (tmp_path / LEDGER_NAME).exists()


def test_summarise_counts_every_status(tmp_path: Path) -> None:
    with Ledger(tmp_path) as ledger:
        run_id = ledger.start_run(tmp_path / "m.csv", [], "random", "w")
        for i, status in enumerate(["done", "done", "failed", "running", "pending", "done"]):
            output = tmp_path / f"{i}.png"
            ledger.mark_pending(output, row=i + 1, content="c", styles="s", key=f"k{i}", run_id=run_id)
            if status != "pending":
                ledger.mark_running(output, run_id=run_id, device="cpu", model="m", weights="w")
            if status in ("done", "failed"):
                ledger.mark_finished(output, status=status)
        records = ledger.records()
    assert [r.row for r in records] == [1, 2, 3, 4, 5, 6]
    assert summarise(records) == {"pending": 1, "running": 1, "done": 3, "failed": 1}
    assert summarise([]) == dict.fromkeys(STATUSES, 0)


def test_a_version_1_ledger_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    """Output folders outlive batchstyle versions: opening an old ledger adds the new columns, loses nothing."""
    old = sqlite3.connect(tmp_path / LEDGER_NAME)
    old.executescript(
        """
        CREATE TABLE runs (id INTEGER PRIMARY KEY, started REAL NOT NULL, finished REAL, manifest TEXT, argv TEXT,
                           model TEXT, weights TEXT, outcome TEXT);
        CREATE TABLE rows (output TEXT PRIMARY KEY, row INTEGER, content TEXT, styles TEXT, key TEXT NOT NULL,
                           status TEXT NOT NULL, run_id INTEGER, started REAL, finished REAL, seconds REAL,
                           iterations INTEGER, content_loss REAL, style_loss REAL, tv_loss REAL, total_loss REAL,
                           device TEXT, model TEXT, weights TEXT, params TEXT, error TEXT);
        INSERT INTO runs (id, started) VALUES (1, 0);
        INSERT INTO rows (output, row, key, status, run_id, total_loss) VALUES ('old.png', 1, 'k', 'done', 1, 0.5);
        PRAGMA user_version = 1;
        """
    )
    old.close()
    with Ledger(tmp_path) as ledger:
        assert ledger.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        [record] = ledger.records()
        assert (record.output, record.status, record.total_loss) == ("old.png", "done", 0.5)
        assert record.targets is None and record.provider is None and record.precision is None
        columns = {r[1] for r in ledger.conn.execute("PRAGMA table_info(rows)")}
        assert {"targets", "provider", "history", "precision"} <= columns
        output = tmp_path / "old.png"
        ledger.mark_running(output, run_id=1, device="cpu", model="m", weights="w")
        ledger.mark_finished(output, status="done", precision="bf16")
        assert ledger.get(output).precision == "bf16"


def test_history_is_recorded_per_iteration_by_term_name(tmp_path: Path) -> None:
    """Whatever terms a row has, a video row's temporal among them, come back by name, as float32."""
    output = tmp_path / "clip.mp4"
    history = [
        {"content": 0.0, "style": 2.0, "tv": 0.1, "temporal": 0.3},
        {"content": 0.25, "style": 1.5, "tv": 0.09, "temporal": 0.2},
    ]
    with Ledger(tmp_path) as ledger:
        run_id = start(ledger, output)
        ledger.mark_running(output, run_id=run_id, device="cpu", model="m", weights="w")
        ledger.mark_finished(output, status="done", history=pack_history(history))
        stored = ledger.get(output)
    assert stored is not None
    got = unpack_history(stored.history)
    assert list(got) == ["content", "style", "tv", "temporal"]
    for name, values in got.items():
        assert values.dtype == np.float32
        assert values.tolist() == np.float32([h[name] for h in history]).tolist()
    [record], _ = read_records(tmp_path)
    assert record.as_dict(history=True)["history"]["temporal"] == pytest.approx([0.3, 0.2])
    # A term some iterations lack (added at some scales only) is NaN there, not a shifted column.
    ragged = unpack_history(pack_history([{"content": 1.0, "style": 2.0}, {"content": 1.0, "style": 2.0, "x": 3.0}]))
    assert np.isnan(ragged["x"][0]) and ragged["x"][1] == 3.0
    assert unpack_history(None) == {} and unpack_history(pack_history([])) == {}


# Schema 5, as batchstyle wrote it before loss terms were named: its history blobs are bare (iterations, 3) float32.
SCHEMA_5 = """
CREATE TABLE runs (id INTEGER PRIMARY KEY, started REAL NOT NULL, finished REAL, manifest TEXT, argv TEXT,
                   model TEXT, weights TEXT, outcome TEXT);
CREATE TABLE rows (output TEXT PRIMARY KEY, row INTEGER, content TEXT, styles TEXT, key TEXT NOT NULL,
                   status TEXT NOT NULL, run_id INTEGER, started REAL, finished REAL, seconds REAL,
                   iterations INTEGER, content_loss REAL, style_loss REAL, tv_loss REAL, total_loss REAL,
                   device TEXT, model TEXT, weights TEXT, params TEXT, error TEXT, targets TEXT, provider TEXT,
                   history BLOB, precision TEXT, frames INTEGER, frames_done INTEGER);
INSERT INTO runs (id, started) VALUES (1, 0);
PRAGMA user_version = 5;
"""
OLD_HISTORY = [[1e-13, 2.0, 0.1], [0.25, 1.5, 0.09], [0.3, 1.25, 0.08]]


def _schema_5_ledger(folder: Path) -> None:
    old = sqlite3.connect(folder / LEDGER_NAME)
    old.executescript(SCHEMA_5)
    blob = zlib.compress(np.asarray(OLD_HISTORY, dtype="<f4").tobytes(), 6)  # schema 5's pack_history
    old.execute(
        "INSERT INTO rows (output, row, key, status, run_id, total_loss, history) VALUES (?, ?, ?, ?, ?, ?, ?)",
        ("old.png", 1, "k", "done", 1, 2.5, blob),
    )
    old.execute("INSERT INTO rows (output, row, key, status, run_id) VALUES ('none.png', 2, 'k', 'done', 1)")
    old.commit()
    old.close()


def _old_terms(record_history: bytes | None) -> dict[str, list[float]]:
    return {name: values.tolist() for name, values in unpack_history(record_history).items()}


def test_a_schema_5_ledger_reads_and_migrates_its_unnamed_history(tmp_path: Path) -> None:
    """Ledgers written before loss terms had names: read as they are (status, report: read-only, never upgraded),
    and upgraded on open by a run, both giving the same values under the names content, style and tv."""
    _schema_5_ledger(tmp_path)
    expected = {
        name: np.float32(column).tolist() for name, column in zip(("content", "style", "tv"), zip(*OLD_HISTORY))
    }

    records, _ = read_records(tmp_path)
    assert [r.output for r in records] == ["old.png", "none.png"]
    assert _old_terms(records[0].history) == expected and records[1].history is None
    assert records[0].as_dict(history=True)["history"] == expected
    conn = sqlite3.connect(tmp_path / LEDGER_NAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 5  # reading changed nothing
    conn.close()

    with Ledger(tmp_path) as ledger:
        assert ledger.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        old, none = ledger.records()
        assert _old_terms(old.history) == expected and none.history is None
        assert (old.status, old.total_loss) == ("done", 2.5)
    with Ledger(tmp_path) as ledger:  # a second open finds nothing to upgrade: the blobs are not rewritten twice
        assert _old_terms(ledger.records()[0].history) == expected
    assert _old_terms(read_records(tmp_path)[0][0].history) == expected


def test_an_unreadable_old_history_is_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    """A history blob schema 5 could not read either costs that row its loss curve, not the folder its ledger."""
    _schema_5_ledger(tmp_path)
    conn = sqlite3.connect(tmp_path / LEDGER_NAME)
    conn.execute("INSERT INTO rows (output, row, key, status, history) VALUES ('bad.png', 3, 'k', 'done', x'00')")
    conn.commit()
    conn.close()
    assert [(r.output, r.history is None) for r in read_records(tmp_path, all_rows=True)[0]] == [
        ("old.png", False),
        ("none.png", True),
        ("bad.png", True),
    ]
    with Ledger(tmp_path) as ledger:
        assert [r.history is None for r in ledger.records()] == [False, True, True]


def test_a_failed_upgrade_leaves_the_old_ledger_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upgrade is one transaction: a step that fails after the blobs were rewritten leaves the ledger schema 5
    with every blob as it was, so the next open upgrades it from the start rather than renaming named blobs."""
    _schema_5_ledger(tmp_path)
    conn = sqlite3.connect(tmp_path / LEDGER_NAME)
    before = conn.execute("SELECT output, history FROM rows ORDER BY output").fetchall()
    conn.close()

    def interrupted(conn: sqlite3.Connection) -> None:
        raise KeyboardInterrupt

    steps = ledger_module._MIGRATIONS[SCHEMA_VERSION]
    monkeypatch.setitem(ledger_module._MIGRATIONS, SCHEMA_VERSION, [*steps, interrupted])
    with pytest.raises(KeyboardInterrupt):
        Ledger(tmp_path)
    conn = sqlite3.connect(tmp_path / LEDGER_NAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
    assert conn.execute("SELECT output, history FROM rows ORDER BY output").fetchall() == before
    conn.close()
    monkeypatch.undo()
    with Ledger(tmp_path) as ledger:  # the lock was let go, and the upgrade now runs whole
        assert ledger.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert list(unpack_history(ledger.records()[0].history)) == ["content", "style", "tv"]


def test_plan_rows_records_many_rows_as_mark_pending_does_in_batches(tmp_path: Path) -> None:
    """Planning writes PLAN_BATCH rows to a transaction (one commit per row made 200,000 rows take minutes): more
    rows than one batch all land, a row planned again keeps its last results, a skipped row joins the run, and a
    row found finished on disk is done with its old error cleared."""
    out = tmp_path / "out"
    count = ledger_module.PLAN_BATCH + 7
    rows = [Planned(out / f"sub/{i}.png", i + 1, "in/c.png", "in/s.png", f"k{i}") for i in range(count)]
    with Ledger(out) as ledger:
        first = ledger.start_run(tmp_path / "m.csv", [], "random", "w")
        ledger.plan_rows(first, rows)
        ledger.mark_running(rows[0].output, run_id=first, device="cpu", model="random", weights="w")
        ledger.mark_finished(rows[0].output, status="done", seconds=2.0)
        ledger.mark_finished(rows[1].output, status="failed", error="boom")
        second = ledger.start_run(tmp_path / "m.csv", [], "random", "w")
        ledger.plan_rows(second, rows[2:], seen=[rows[0].output], finished=[rows[1]])
        records = {record.output: record for record in ledger.records()}
        assert ledger.done_keys() == {"sub/0.png": "k0", "sub/1.png": "k1"}
    assert len(records) == count
    assert {r.run_id for r in records.values()} == {second}
    assert (records["sub/0.png"].status, records["sub/0.png"].seconds) == ("done", 2.0)
    assert (records["sub/1.png"].status, records["sub/1.png"].error) == ("done", None)
    last = records[f"sub/{count - 1}.png"]
    assert (last.status, last.row, last.key, last.content, last.styles) == (
        "pending",
        count,
        f"k{count - 1}",
        "in/c.png",
        "in/s.png",
    )


def test_a_row_named_too_long_for_its_folder_is_still_a_row(tmp_path: Path) -> None:
    """`relative` resolves the folder, never the name: a name past the file system's 255 bytes is recorded (its row
    fails when its file is written) rather than raising inside planning."""
    output = tmp_path / "out" / ("x" * 300 + ".png")
    with Ledger(tmp_path / "out") as ledger:
        run_id = ledger.start_run(tmp_path / "m.csv", [], "random", "w")
        ledger.plan_rows(run_id, [Planned(output, 1, "c.png", "s.png", "k")])
        assert [record.output for record in ledger.records()] == [output.name]
