"""The run ledger: an SQLite file in the output folder recording what each manifest row produced.

It is what makes a nightly job resumable: a row is `done` only after its output file was renamed into place, so a
run killed at any moment leaves rows `running` (or `pending`) that the next run simply does again. One process (the
parent of a run) writes it; a lock file keeps a second run off the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from batchstyle.errors import UnusableInput, free_space

LEDGER_NAME = "batchstyle-ledger.sqlite"
LOCK_NAME = ".batchstyle.lock"
SCHEMA_VERSION = 7
STATUSES = ("pending", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    finished REAL,
    manifest TEXT,
    argv TEXT,
    model TEXT,
    weights TEXT,
    outcome TEXT,
    workers_replaced INTEGER,         -- worker processes or Ray actors that died or hung and were started afresh
    stalls_killed INTEGER             -- of those, killed as hung (silent past the stall timeout)
);
CREATE TABLE IF NOT EXISTS rows (
    output TEXT PRIMARY KEY,          -- relative to the output folder: the row's identity across runs
    row INTEGER,
    content TEXT,
    styles TEXT,
    key TEXT NOT NULL,                -- hash of everything that determines the output
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    run_id INTEGER REFERENCES runs(id),
    started REAL,
    finished REAL,
    seconds REAL,
    iterations INTEGER,
    content_loss REAL,
    style_loss REAL,
    tv_loss REAL,
    total_loss REAL,
    device TEXT,
    model TEXT,
    weights TEXT,
    params TEXT,
    error TEXT,
    targets TEXT,                     -- where the row's targets came from: "content=hit style=miss,hit"
    provider TEXT,                    -- what computed them: an ONNX Runtime provider or torch:<device>
    history BLOB,                     -- per-iteration losses by term name, see pack_history
    precision TEXT,                   -- what the network ran in: fp32, tf32 or bf16 (Grams and losses are fp32)
    frames INTEGER,                   -- a clip: frames to stylize (chunks' lead-ins included)
    frames_done INTEGER,              -- a clip: of those, finished (written as each frame is)
    iteration INTEGER,                -- live: iterations done so far by the attempt under way, about 1/s
    planned INTEGER                   -- the iterations that attempt will run, every scale's together
);
"""
# Live state for `batchstyle serve` and /metrics, which see a run only through its ledger; one row per worker slot.
_WORKERS = """
CREATE TABLE IF NOT EXISTS workers (  -- live: what each worker slot of the latest run is doing
    slot INTEGER PRIMARY KEY,
    run_id INTEGER REFERENCES runs(id),
    device TEXT,
    state TEXT,                       -- starting, running, idle, lost, taken out, finished
    detail TEXT,                      -- why it was lost or taken out
    rows TEXT,                        -- the row numbers it holds: "3,4"
    since REAL,                       -- when it entered its state
    rows_done INTEGER,                -- rows it settled this run, done or failed
    iterations INTEGER,               -- row iterations it ran this run (a batch of 4 rows: 4 per step)
    rate REAL                         -- row iterations per second over its last LIVE_INTERVAL or more
);
"""
_SCHEMA += _WORKERS

HISTORY_VERSION = 6  # the schema whose history blobs name their terms; before it, always (content, style, tv)
_UNNAMED_TERMS = ("content", "style", "tv")


def pack_history(history: Sequence[Mapping[str, float]]) -> bytes:
    """Per-iteration losses, each iteration's terms by name (a `Losses`, or any mapping), zlib-compressed: the term
    names as a JSON list on the first line, then (iterations, terms) float32: 500 iterations of four terms are
    8 KB before compression. The blob names its own terms, so a new one (a video row's temporal, a term added
    later) needs no new column; a term that some iterations lack is NaN there."""
    names = list(dict.fromkeys(name for losses in history for name in losses))
    array = np.array([[losses.get(name, np.nan) for name in names] for losses in history], dtype="<f4")
    return zlib.compress(json.dumps(names).encode() + b"\n" + array.tobytes(), 6)


def unpack_history(blob: bytes | None) -> dict[str, np.ndarray]:
    """Each recorded term's per-iteration losses, (iterations,) float32 by name in the order recorded; empty when
    the row recorded none."""
    if not blob:
        return {}
    head, _, body = zlib.decompress(blob).partition(b"\n")
    names = json.loads(head)
    if not names:
        return {}
    array = np.frombuffer(body, dtype="<f4").reshape(-1, len(names))
    return {name: array[:, column] for column, name in enumerate(names)}


def _named_history(blob: bytes | None) -> bytes | None:
    """A history blob of a ledger before HISTORY_VERSION ((iterations, 3) float32 of content, style, tv, nothing
    else) as `pack_history` writes it now: the same float32 values, under their names. One that cannot be read
    (never readable before either) becomes none: a row's loss curve is not worth refusing its ledger over."""
    if not blob:
        return blob
    try:
        array = np.frombuffer(zlib.decompress(blob), dtype="<f4").reshape(-1, len(_UNNAMED_TERMS))
    except (zlib.error, ValueError):
        return None
    return pack_history([dict(zip(_UNNAMED_TERMS, row)) for row in array.tolist()])


def _name_history_terms(conn: sqlite3.Connection) -> None:
    rows = conn.execute("SELECT output, history FROM rows WHERE history IS NOT NULL").fetchall()
    conn.executemany(
        "UPDATE rows SET history = ? WHERE output = ?", [(_named_history(r["history"]), r["output"]) for r in rows]
    )


# Each entry upgrades a ledger from the version before it; an old output folder keeps its history. An entry is SQL,
# or a function of the connection for what SQL cannot do (rewriting blobs).
_MIGRATIONS: dict[int, list[str | Callable[[sqlite3.Connection], None]]] = {
    2: ["ALTER TABLE rows ADD COLUMN targets TEXT", "ALTER TABLE rows ADD COLUMN provider TEXT"],
    3: ["ALTER TABLE rows ADD COLUMN history BLOB"],
    4: ["ALTER TABLE rows ADD COLUMN precision TEXT"],
    5: ["ALTER TABLE rows ADD COLUMN frames INTEGER", "ALTER TABLE rows ADD COLUMN frames_done INTEGER"],
    HISTORY_VERSION: [_name_history_terms],
    7: [
        "ALTER TABLE runs ADD COLUMN workers_replaced INTEGER",
        "ALTER TABLE runs ADD COLUMN stalls_killed INTEGER",
        "ALTER TABLE rows ADD COLUMN iteration INTEGER",
        "ALTER TABLE rows ADD COLUMN planned INTEGER",
        _WORKERS,
    ],
}


class LedgerError(UnusableInput):
    """The output folder's ledger cannot be used; the message says why and what to do."""


class LedgerBusy(LedgerError):
    """Another run holds the output folder."""


class LedgerWriteError(Exception):
    """The ledger could not be written mid-run (a full disk, an I/O error): the run stops, its finished outputs and
    the rows the ledger holds stay, and the same command resumes once the cause is fixed. Not an `UnusableInput`:
    work was done."""


def ledger_trouble(path: Path, exc: BaseException) -> str:
    """One message for a ledger that cannot be written: the file, what went wrong, the room left, and the fix.
    SQLite says "database or disk is full" where the OS said ENOSPC, with no errno."""
    folder = path.parent
    what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or exc.__class__.__name__
    full = isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)
    full = full or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))
    fix = "free space there or give the run another --out" if full else "make sure that folder can be written"
    return (
        f"cannot write the ledger {path}: {what} ({free_space(folder)} in {folder}); {fix}, then run the same "
        "command again: finished outputs are kept and the run resumes"
    )


@dataclass(frozen=True)
class Record:
    output: str
    row: int | None
    content: str | None
    styles: str | None
    key: str
    status: str
    run_id: int | None
    started: float | None
    finished: float | None
    seconds: float | None
    iterations: int | None
    content_loss: float | None
    style_loss: float | None
    tv_loss: float | None
    total_loss: float | None
    device: str | None
    model: str | None
    weights: str | None
    params: str | None
    error: str | None
    targets: str | None = None
    provider: str | None = None
    history: bytes | None = None
    precision: str | None = None  # fp32 | tf32 | bf16: the network's precision (None: written before schema 4)
    frames: int | None = None  # a clip row: frames to stylize, and how many are finished
    frames_done: int | None = None
    iteration: int | None = None  # live, while running: iterations done so far, of `planned`
    planned: int | None = None
    ledger: str = LEDGER_NAME  # the file it was read from: shards of one run each keep their own

    def as_dict(self, history: bool = False) -> dict[str, Any]:
        """JSON-ready; the per-iteration losses (lists, not bytes) only when asked for, as they dwarf the rest."""
        data = dict(self.__dict__)
        data.pop("history")
        data.pop("ledger")
        if history:
            data["history"] = {name: values.tolist() for name, values in unpack_history(self.history).items()}
        return data


@dataclass
class WorkerState:
    """What one worker slot is doing, as the `workers` table holds it: the parent's view (rows handed out, progress
    reported, losses), written by `Execution` for `batchstyle serve` and /metrics."""

    slot: int
    device: str
    state: str = "starting"  # starting, running, idle, lost, taken out, finished
    since: float = 0.0
    detail: str | None = None
    rows: str = ""
    rows_done: int = 0
    iterations: int = 0
    rate: float | None = None

    def as_row(self, run_id: int) -> tuple[Any, ...]:
        return (
            self.slot,
            run_id,
            self.device,
            self.state,
            self.detail,
            self.rows,
            self.since,
            self.rows_done,
            self.iterations,
            self.rate,
        )


@dataclass(frozen=True)
class Activity:
    """The live side of an output folder's latest run (every shard's ledger together), beside its rows."""

    workers: list[dict[str, Any]]  # the `workers` table's rows, each with the `ledger` it came from
    workers_replaced: int
    stalls_killed: int
    runs: list[dict[str, Any]]  # each ledger's latest run


def _lock(handle: IO[str], shared: bool = False) -> bool:
    # By sys.platform, not by a failed import: the checker then checks each branch against its platform's stubs.
    if sys.platform == "win32":  # pragma: no cover - Windows: no shared locks, so shards there exclude each other
        import msvcrt

        try:
            handle.seek(0)  # "a+" starts at the end: every process must lock the same byte
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    else:
        import fcntl

        try:
            fcntl.flock(handle.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return True
        except OSError:
            return False


def _busy(handle: IO[str], shared: bool = False) -> str | None:
    """None once the lock is held; else the pid the holder wrote in the file, and the handle is closed."""
    if _lock(handle, shared):
        return None
    handle.seek(0)
    holder = handle.read().strip() or "unknown"
    handle.close()
    return holder


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.row_factory = sqlite3.Row
    # WAL + FULL: every commit survives a SIGKILL or power cut; one commit per row costs nothing next to a row.
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def ledger_name(shard: str | None = None) -> str:
    """`batchstyle-ledger.sqlite`, or `batchstyle-ledger.shard-0-of-4.sqlite` for one shard of a run."""
    return LEDGER_NAME if not shard else LEDGER_NAME.replace(".sqlite", f".{shard}.sqlite")


def ledger_files(out_dir: Path) -> list[Path]:
    """Every ledger in an output folder: the unsharded one first, then the shards' in name order."""
    found = sorted(Path(out_dir).glob(LEDGER_NAME.replace(".sqlite", ".*.sqlite")))
    plain = Path(out_dir) / LEDGER_NAME
    return ([plain] if plain.is_file() else []) + found


class Ledger:
    """The writable ledger of one output folder, held under an exclusive lock for the life of a run.

    Shards (`run --shard I/N`) run at the same time into the same folder, so each has a ledger and a lock of its
    own: they never wait on each other, and `read_records` merges them.
    """

    def __init__(self, out_dir: Path, shard: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.name = ledger_name(shard)
        lock_name = LOCK_NAME if not shard else LOCK_NAME.replace(".lock", f".{shard}.lock")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # The OS drops an flock when its process dies, however it dies: a killed run never leaves it locked.
            self._lock_file = open(self.out_dir / lock_name, "a+")  # noqa: SIM115 - held until close()
        except OSError as exc:
            raise LedgerError(
                f"cannot write to the output folder {self.out_dir}: {exc.strerror}; choose another --out"
            ) from exc
        holder = _busy(self._lock_file)
        if holder is not None:
            what = f"shard {shard.removeprefix('shard-').replace('-of-', ' of ')} of " if shard else ""
            who = f"another batchstyle run (pid {holder}{'' if shard else ', or shards of one'})"
            raise LedgerBusy(
                f"{who} is writing {what}{self.out_dir}; wait for it to finish, or give this run another --out folder"
            )
        try:
            self._lock_file.truncate(0)
            self._lock_file.write(str(os.getpid()))
            self._lock_file.flush()
        except OSError as exc:
            self._lock_file.close()
            raise LedgerError(ledger_trouble(self.out_dir / lock_name, exc)) from None
        # Shards share the folder with each other, never with an unsharded run (which would redo their rows and
        # remove their temp files): they hold the folder's lock shared, an unsharded run holds it exclusively.
        self._folder_lock: IO[str] | None = None
        if shard:
            self._folder_lock = open(self.out_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held until close()
            holder = _busy(self._folder_lock, shared=True)
            if holder is not None:
                self._lock_file.close()
                raise LedgerBusy(
                    f"an unsharded batchstyle run (pid {holder}) is writing to {self.out_dir}; wait for it to "
                    "finish before running shards there"
                )
        # Names resolved once per folder, not per row (`relative`): a system call per path part made 200,000 rows
        # spend 30 s resolving names while planning.
        self._root = self.out_dir.resolve()
        self._folders: dict[str, str] = {}  # an output's folder as given -> its name in the ledger
        try:
            self.conn = _connect(self.out_dir / self.name)
        except (sqlite3.Error, OSError) as exc:
            self._release()
            raise LedgerError(ledger_trouble(self.out_dir / self.name, exc)) from None
        try:
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LedgerError(
                    f"{self.out_dir / self.name} was written by a newer batchstyle (schema {version}); upgrade "
                    "batchstyle"
                )
            fresh = self.conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'rows'").fetchone()[0] == 0
            if fresh:
                self.conn.executescript(_SCHEMA)
                self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version < SCHEMA_VERSION:
                self._migrate(version)
        except (sqlite3.Error, OSError) as exc:
            # A full disk at the start: nothing was run, so it is the output folder that cannot be used (exit 2).
            self.close()
            raise LedgerError(ledger_trouble(self.out_dir / self.name, exc)) from None
        except BaseException:
            self.close()
            raise

    def _migrate(self, version: int) -> None:
        """Every step and the new version in one transaction: a run killed mid-upgrade leaves the old ledger as it
        was, never history blobs rewritten under the old version number (the next open would rewrite them again)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for target in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                for step in _MIGRATIONS[target]:
                    if isinstance(step, str):
                        self.conn.execute(step)
                    else:
                        step(self.conn)
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # closing a ledger on a full disk: what was committed stays
            self.conn.close()
        self._release()

    def _release(self) -> None:
        self._lock_file.close()
        if self._folder_lock is not None:
            self._folder_lock.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def relative(self, output: Path) -> str:
        """The output's name in the ledger: relative to the output folder, its folder's symlinks resolved. The name
        itself is not: no system call touches it, so a name the file system cannot hold (too long) is still a row,
        which fails alone when its file is written. Strings, not paths: it is asked for every row a run plans, and
        three Paths made per row were 1.3 s of the 7.4 s profiled planning 50,000 rows."""
        folder_text, name = os.path.split(output)
        if name in ("", ".", ".."):
            return Path(output).resolve().relative_to(self._root).as_posix()
        folder = self._folders.get(folder_text)
        if folder is None:
            folder = self._folders[folder_text] = Path(folder_text).resolve().relative_to(self._root).as_posix()
        return name if folder == "." else f"{folder}/{name}"

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """The connection, with what SQLite or the OS says about the ledger turned into one `LedgerWriteError`."""
        try:
            yield self.conn
        except (sqlite3.Error, OSError) as exc:
            raise LedgerWriteError(ledger_trouble(self.out_dir / self.name, exc)) from exc

    def start_run(self, manifest: Path | str, argv: list[str], model: str, weights: str) -> int:
        with self._writing() as conn:
            cur = conn.execute(
                "INSERT INTO runs (started, manifest, argv, model, weights) VALUES (?, ?, ?, ?, ?)",
                (time.time(), str(manifest), json.dumps(argv), model, weights),
            )
        assert cur.lastrowid is not None  # set by every INSERT
        return cur.lastrowid

    def finish_run(self, run_id: int, outcome: dict[str, int]) -> None:
        with self._writing() as conn:
            conn.execute(
                "UPDATE runs SET finished = ?, outcome = ? WHERE id = ?", (time.time(), json.dumps(outcome), run_id)
            )

    def get(self, output: Path) -> Record | None:
        with self._writing() as conn:
            found = conn.execute("SELECT * FROM rows WHERE output = ?", (self.relative(output),)).fetchone()
        return Record(**dict(found)) if found else None

    def done_keys(self) -> dict[str, str]:
        """The key of every row done, by its name in the ledger: what planning needs from it, in one query rather
        than one per row."""
        with self._writing() as conn:
            return dict(conn.execute("SELECT output, key FROM rows WHERE status = 'done'").fetchall())

    def plan_rows(
        self, run_id: int, pending: Iterable[Planned], seen: Iterable[Path] = (), finished: Iterable[Planned] = ()
    ) -> None:
        """Records, PLAN_BATCH rows to a transaction, the rows this run will do (`pending`), those it skips as done
        (`seen`: they still belong to its manifest) and those found finished on disk with no `done` in the ledger
        (`finished`). One commit per row, each waiting for the disk (synchronous=FULL), made a 200,000-row manifest
        spend minutes before its first row; a run killed mid-plan loses nothing, as the next one plans again."""
        now = time.time()
        columns = "output, row, content, styles, key, status, run_id, finished, error"
        upsert = (
            f"INSERT INTO rows ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL) ON CONFLICT(output) DO UPDATE SET "
            "row = excluded.row, content = excluded.content, styles = excluded.styles, key = excluded.key, "
            "status = excluded.status, run_id = excluded.run_id"
        )
        # A row found finished also gets its finish time and loses an old error, as `mark_finished` would set them.
        done = upsert + ", finished = excluded.finished, error = NULL"
        writes: list[tuple[str, Iterable[tuple[Any, ...]]]] = [
            (upsert, ((self.relative(p.output), *p[1:], "pending", run_id, None) for p in pending)),
            (done, ((self.relative(p.output), *p[1:], "done", run_id, now) for p in finished)),
            ("UPDATE rows SET run_id = ? WHERE output = ?", ((run_id, self.relative(out)) for out in seen)),
        ]
        with self._writing() as conn:
            for sql, rows in writes:
                for chunk in _chunks(rows, PLAN_BATCH):
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        conn.executemany(sql, chunk)
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                    conn.execute("COMMIT")

    def is_done(self, output: Path, key: str) -> bool:
        """Done means: same inputs and options as now, finished, and its file still there."""
        record = self.get(output)
        return record is not None and record.status == "done" and record.key == key and Path(output).is_file()

    def _upsert(self, output: Path, fields: dict[str, Any]) -> None:
        fields = {"output": self.relative(output), **fields}
        names = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        updates = ", ".join(f"{name} = excluded.{name}" for name in fields if name != "output")
        with self._writing() as conn:
            conn.execute(
                f"INSERT INTO rows ({names}) VALUES ({marks}) ON CONFLICT(output) DO UPDATE SET {updates}",
                tuple(fields.values()),
            )

    def _update(self, output: Path, fields: dict[str, Any]) -> None:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._writing() as conn:
            cur = conn.execute(
                f"UPDATE rows SET {assignments} WHERE output = ?", (*fields.values(), self.relative(output))
            )
        if cur.rowcount != 1:
            raise KeyError(f"the ledger has no row for {output}")

    def mark_pending(self, output: Path, *, row: int, content: str, styles: str, key: str, run_id: int) -> None:
        """Records a row this run will do; its last results stay visible until it is actually redone."""
        self._upsert(
            output,
            {"row": row, "content": content, "styles": styles, "key": key, "status": "pending", "run_id": run_id},
        )

    def mark_running(
        self, output: Path, *, run_id: int, device: str, model: str, weights: str, planned: int | None = None
    ) -> None:
        """`planned`: the iterations the row will run (none for a clip, which counts frames), for the live page's
        progress and ETA."""
        self._update(
            output,
            {
                "status": "running",
                "run_id": run_id,
                "started": time.time(),
                "finished": None,
                "seconds": None,
                "device": device,
                "model": model,
                "weights": weights,
                "error": None,
                # A redo starts clean: a failure must not leave the previous success's results beside it.
                "iterations": None,
                "content_loss": None,
                "style_loss": None,
                "tv_loss": None,
                "total_loss": None,
                "params": None,
                "targets": None,
                "provider": None,
                "history": None,
                "precision": None,
                "iteration": 0 if planned else None,
                "planned": planned,
            },
        )

    def mark_finished(self, output: Path, *, status: str, **fields: Any) -> None:
        if status not in ("done", "failed", "pending"):
            raise ValueError(status)
        self._update(output, {"status": status, "finished": time.time(), **fields})

    def mark_frames(self, output: Path, done: int, total: int) -> None:
        """A clip's frames finished so far: per-frame progress, written as each frame file is renamed into place."""
        self._update(output, {"frames": total, "frames_done": done})

    def start_workers(self, run_id: int, workers: Sequence[WorkerState]) -> None:
        """The run's worker slots, replacing an earlier run's: the table says what this run's workers are doing."""
        with self._writing() as conn, _transaction(conn):
            conn.execute("DELETE FROM workers")
            conn.executemany(_WORKER_UPSERT, [worker.as_row(run_id) for worker in workers])

    def write_live(
        self, run_id: int, workers: Sequence[WorkerState], iterations: Mapping[Path, int] | None = None
    ) -> None:
        """Workers' states and running rows' iterations so far, in one transaction: the parent calls it as things
        happen, and for progress at most once a second a slot (`execution.LIVE_INTERVAL`)."""
        with self._writing() as conn, _transaction(conn):
            conn.executemany(_WORKER_UPSERT, [worker.as_row(run_id) for worker in workers])
            conn.executemany(
                "UPDATE rows SET iteration = ? WHERE output = ?",
                [(iteration, self.relative(output)) for output, iteration in (iterations or {}).items()],
            )

    def count_workers(self, run_id: int, replaced: int, stalls_killed: int) -> None:
        """The run's workers replaced so far, and of those killed as hung."""
        with self._writing() as conn:
            conn.execute(
                "UPDATE runs SET workers_replaced = ?, stalls_killed = ? WHERE id = ?",
                (replaced, stalls_killed, run_id),
            )

    def forget_invalid_rows(self) -> None:
        """Validation failures belong to the run that found them: the next run re-validates the manifest."""
        with self._writing() as conn:
            conn.execute("DELETE FROM rows WHERE key = 'invalid'")

    def mark_failed_unstarted(
        self, output: Path, *, row: int, content: str, styles: str, run_id: int, error: str
    ) -> None:
        """A row that failed validation: recorded so `status` shows it, with a key that never matches a real one."""
        self._upsert(
            output,
            {
                "row": row,
                "content": content,
                "styles": styles,
                "key": "invalid",
                "status": "failed",
                "run_id": run_id,
                "started": None,
                "finished": time.time(),
                "error": error,
            },
        )

    def records(self) -> list[Record]:
        with self._writing() as conn:
            return [Record(**dict(r)) for r in conn.execute("SELECT * FROM rows ORDER BY row, output")]


_WORKER_UPSERT = (
    "INSERT OR REPLACE INTO workers (slot, run_id, device, state, detail, rows, since, rows_done, iterations, rate) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


PLAN_BATCH = 10_000  # rows per transaction while planning: 20 commits for 200,000 rows, each chunk's rows in memory


class Planned(NamedTuple):
    """A row as planning records it: what `mark_pending` takes, for many rows at once (`Ledger.plan_rows`)."""

    output: Path
    row: int
    content: str
    styles: str
    key: str


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def read_records(
    out_dir: Path, all_rows: bool = False, history: bool = True
) -> tuple[list[Record], dict[str, Any] | None]:
    """Read-only view for `batchstyle status` and reports: works while runs hold the folder (WAL readers never block).

    Merges every ledger in the folder (one per shard); where two hold the same output, the one touched last wins.
    By default only the rows of each ledger's latest run: rows since dropped from the manifest keep their history
    in the ledger but no longer count as its state. The run returned is the latest to start. `history=False` leaves
    the per-iteration losses unread: the live page reads the ledger every second, and they are most of its bytes.
    """
    files = ledger_files(out_dir)
    if not files:
        raise FileNotFoundError(f"{out_dir} has no {LEDGER_NAME}: no batchstyle run has written there")
    merged: dict[str, Record] = {}
    latest: dict[str, Any] | None = None
    read = [(path, *_read_one(path, all_rows, history)) for path in files]
    # Only the ledgers of the latest way of running the folder: after moving from 4 shards to 8, or from shards to
    # one run, the old ledgers keep their history (--all) but no longer count as the folder's state.
    if not all_rows:
        read = _latest_layout(read, lambda item: item[2])
    for _path, records, last in read:
        for record in records:
            seen = merged.get(record.output)
            if seen is None or _touched(record) >= _touched(seen):
                merged[record.output] = record
        if last is not None and (latest is None or last["started"] >= latest["started"]):
            latest = last
    records = sorted(merged.values(), key=lambda r: (r.row is None, r.row or 0, r.output))
    return records, latest


def _latest_layout(read: list[Any], last: Callable[[Any], dict[str, Any] | None]) -> list[Any]:
    """Of what was read from each ledger (`item[0]` its path, `last(item)` its latest run), that of the ledgers laid
    out as the latest run was: as many shards as it had."""
    newest = max(read, key=lambda item: (last(item) or {}).get("started", -1.0))[0]
    return [item for item in read if _shard_count(item[0]) == _shard_count(newest)]


def _shard_count(path: Path) -> int:
    """N of a `...shard-I-of-N.sqlite` ledger; 1 for the unsharded one."""
    stem = path.name.removeprefix(LEDGER_NAME.removesuffix(".sqlite")).removesuffix(".sqlite")
    return int(stem.rsplit("-of-", 1)[1]) if "-of-" in stem else 1


def _touched(record: Record) -> float:
    return max(record.finished or 0.0, record.started or 0.0)


def _connect_read_only(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def _read_one(path: Path, all_rows: bool, history: bool = True) -> tuple[list[Record], dict[str, Any] | None]:
    conn = _connect_read_only(path)
    try:
        conn.execute("BEGIN")  # one snapshot: the version read is the version of the rows read, even mid-upgrade
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        columns = "*"
        if not history:
            names = [r["name"] for r in conn.execute("PRAGMA table_info(rows)") if r["name"] != "history"]
            columns = ", ".join(names)
        query = f"SELECT {columns} FROM rows ORDER BY row, output"
        records = [Record(**dict(r), ledger=path.name) for r in conn.execute(query)]
        if version < HISTORY_VERSION:  # read-only, so not upgraded: its histories are named here as the upgrade would
            records = [replace(r, history=_named_history(r.history)) for r in records]
        last = conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        if last is not None and not all_rows:
            records = [r for r in records if r.run_id == last["id"]]
        return records, {**dict(last), "ledger": path.name} if last else None
    finally:
        conn.close()


def read_runs(out_dir: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Every run of every ledger in the folder, by (ledger file name, run id)."""
    runs = {}
    for path in ledger_files(out_dir):
        conn = _connect_read_only(path)
        try:
            runs.update({(path.name, int(r["id"])): dict(r) for r in conn.execute("SELECT * FROM runs")})
        finally:
            conn.close()
    return runs


def read_activity(out_dir: Path) -> Activity:
    """What the latest run's workers are doing and how many were replaced, read-only like `read_records`, every
    shard's ledger together. A ledger older than schema 7 has none of it: no workers, nothing replaced."""
    read = []
    for path in ledger_files(out_dir):
        conn = _connect_read_only(path)
        try:
            conn.execute("BEGIN")
            found = conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
            last = {**dict(found), "ledger": path.name} if found else None
            has_workers = conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'workers'").fetchone()[0]
            workers = []
            if last is not None and has_workers:
                query = "SELECT * FROM workers WHERE run_id = ? ORDER BY slot"
                workers = [{**dict(w), "ledger": path.name} for w in conn.execute(query, (last["id"],))]
        finally:
            conn.close()
        read.append((path, last, workers))
    read = _latest_layout(read, lambda item: item[1]) if read else []
    runs = [last for _, last, _ in read if last is not None]
    return Activity(
        workers=[worker for _, _, workers in read for worker in workers],
        workers_replaced=sum(run.get("workers_replaced") or 0 for run in runs),
        stalls_killed=sum(run.get("stalls_killed") or 0 for run in runs),
        runs=runs,
    )


def summarise(records: list[Record]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for record in records:
        counts[record.status] = counts.get(record.status, 0) + 1
    return counts
