"""Throughput machinery on CPU, for real: worker processes, a worker killed mid-row, a hung worker, a slot that fails
every row, SIGTERM and Ctrl-C, batches, shards and the Ray backend. The rows are tiny (32 px, seeded random VGG-16)
so only the plumbing costs time.

Kills and signals go to real processes started with `python -m batchstyle run`, watched through `--log-json`.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import USER_CACHE, cli, make_painting, make_photo, write_manifest
from PIL import Image

from batchstyle.images import ImageError, is_temp_file, load_image, read_metadata
from batchstyle.manifest import read_manifest
from batchstyle.model.weights import SOURCES
from batchstyle.options import default_values
from batchstyle.run.config import RunConfig
from batchstyle.run.engine import RunSummary, run
from batchstyle.run.execution import SLOT_FAILURES, Execution, mark_pending
from batchstyle.run.hooks import TEST_HANG_ROW
from batchstyle.run.ledger import Ledger, ledger_files, read_records
from batchstyle.run.messages import Result as RowResult
from batchstyle.run.plan import plan
from batchstyle.run.progress import Silent
from batchstyle.run.scheduler import Scheduler
from batchstyle.run.signals import Stop
from batchstyle.run.worker import failure_cause, full_folder

TINY = ("--model", "random", "--size", "32", "-q")


@pytest.fixture
def rows6(tmp_path: Path) -> Path:
    """Six rows, three contents of one size and two styles, so batches and style affinity both have work."""
    folder = tmp_path / "in"
    for k in range(3):
        make_photo(folder / f"c{k}.png", 48, 36, seed=k)
    make_painting(folder / "s0.png", seed=1)
    make_painting(folder / "s1.png", seed=7)
    cells = [f"in/c{k}.png,in/s{s}.png" for s in range(2) for k in range(3)]
    return write_manifest(tmp_path / "m.csv", "content,style", *cells)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def outputs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: pixels(p) for p in sorted(folder.glob("*.png")) if not is_temp_file(p)}


def assert_same_outputs(a: Path, b: Path, tolerance: int) -> None:
    first, second = outputs(a), outputs(b)
    assert first.keys() == second.keys() and len(first) > 0
    worst = {name: int(np.abs(first[name] - second[name]).max()) for name in first}
    assert max(worst.values()) <= tolerance, worst


# --- workers ---------------------------------------------------------------------------------------------------


def test_two_worker_processes_make_the_same_outputs_as_one(rows6: Path, tmp_path: Path) -> None:
    one = cli("run", rows6, *TINY, "--iterations", "4", "--devices", "cpu", "--out", tmp_path / "one")
    two = cli("run", rows6, *TINY, "--iterations", "4", "--devices", "cpu,cpu", "--out", tmp_path / "two")
    assert one.exit_code == 0 and two.exit_code == 0, two.output
    assert_same_outputs(tmp_path / "one", tmp_path / "two", tolerance=0)
    records = read_records(tmp_path / "two")[0]
    assert [r.status for r in records] == ["done"] * 6
    # Both workers did rows: the device column says which slot ran each (both "cpu"), the pids differ.
    assert {read_metadata(tmp_path / "two" / r.output)["batchstyle:device"] for r in records} == {"cpu"}


@pytest.fixture
def hed_cache(tmp_path: Path, hed_weights: object) -> Path:
    """A cache holding the real vgg16-hed weights (fetched once into the user cache) and nothing else."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "weights").symlink_to(USER_CACHE / "weights")
    return cache


def mean_difference(a: Path, b: Path) -> dict[str, float]:
    first, second = outputs(a), outputs(b)
    assert first.keys() == second.keys() and len(first) > 0
    return {name: float(np.abs(first[name] - second[name]).mean()) for name in first}


def test_batched_rows_match_rows_run_alone(rows6: Path, tmp_path: Path, hed_cache: Path) -> None:
    # The real weights: a tiny random network turns the rounding differences of a batched convolution into visible
    # ones. Targets with torch, so no ONNX export is needed in this fresh cache.
    common = (*TINY, "--model", "vgg16-hed", "--iterations", "8", "--devices", "cpu", "--targets", "torch")
    for optimizer in ("lbfgs", "adam"):
        alone, batched = tmp_path / f"{optimizer}-alone", tmp_path / f"{optimizer}-batched"
        args = (*common, "--optimizer", optimizer, "--cache-dir", hed_cache)
        assert cli("run", rows6, *args, "--out", alone).exit_code == 0
        result = cli("run", rows6, *args, "--batch-size", "3", "--out", batched)
        assert result.exit_code == 0, result.output
        assert {json.loads(r.params or "{}")["batch"] for r in read_records(batched)[0]} == {3}
        if optimizer == "lbfgs":
            assert_same_outputs(alone, batched, tolerance=2)
        else:
            # Adam's first steps are +-lr whatever the gradient's size, so where a gradient is at rounding level its
            # sign, and a pixel's path, can differ: equal on average (a row given another row's targets would be
            # off by ~20 levels). Exact per-image equality is checked in float64 in tests/test_optimize.py.
            differences = mean_difference(alone, batched)
            assert max(differences.values()) < 2.0, differences


def test_bad_batch_size_and_devices_are_refused_before_any_work(rows6: Path, tmp_path: Path) -> None:
    bad = cli("run", rows6, *TINY, "--batch-size", "many")
    assert bad.exit_code == 2 and "--batch-size" in bad.output
    gpu = cli("run", rows6, *TINY, "--devices", "cuda:7")
    assert gpu.exit_code == 2 and "GPU" in gpu.output
    assert not (tmp_path / "m").exists()


# --- whose failure -------------------------------------------------------------------------------------------


def _raised(call: Callable[[], object]) -> BaseException:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the exception is what is tested
        return exc
    raise AssertionError("nothing was raised")


def test_a_failure_is_the_rows_own_unless_any_row_would_fail_there_too(
    rows6: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs, _ = plan(read_manifest(rows6, default_values() | {"size": 32}), SOURCES["random"])
    job, other = jobs[0], jobs[4]
    folder = job.row.content.parent
    # The row's own: a corrupt or truncated file, a decompression bomb, out of memory at its size, a bad value, an
    # output name too long for its folder.
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    (folder / "truncated.png").write_bytes(job.row.content.read_bytes()[:200])
    assert failure_cause(job, _raised(lambda: load_image(folder / "corrupt.png"))) is None
    assert failure_cause(job, _raised(lambda: load_image(folder / "truncated.png"))) is None
    with monkeypatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
        bomb = _raised(lambda: load_image(job.row.content))
        assert "decompression-bomb" in str(bomb) and failure_cause(job, bomb) is None
    assert failure_cause(job, MemoryError()) is None
    assert failure_cause(job, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) is None
    assert failure_cause(job, ValueError("could not convert string to float: 'lots'")) is None
    assert failure_cause(job, OSError(errno.ENAMETOOLONG, "File name too long", str(job.output))) is None
    assert failure_cause(job, RuntimeError(f"shapes do not match in {job.row.content}")) is None

    # Not the row's: the parent read every input while checking the manifest, so a worker that cannot open one,
    # or cannot import, or whose device library fails, would fail any row. The row's paths are left out, so the
    # same cause on two rows is one cause.
    def refused(path: object, *args: object, **kwargs: object) -> None:
        # The worker is refused the folder the parent read (as root, permissions refuse nothing: said here).
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    with monkeypatch.context() as patch:
        patch.setattr(Image, "open", refused)
        denied = [_raised(lambda j=j: load_image(j.row.content)) for j in (job, other)]
    assert all(isinstance(exc, ImageError) for exc in denied)
    assert (
        failure_cause(job, denied[0])
        == failure_cause(other, denied[1])
        == "PermissionError: [Errno 13] Permission denied"
    )
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (0, limit[1]))  # no descriptor left in this process
    try:
        starved = _raised(lambda: load_image(job.row.content))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limit)
    assert failure_cause(job, starved) == "OSError: [Errno 24] Too many open files"
    gone = tmp_path / "gone.png"
    gone.write_bytes(job.row.content.read_bytes())
    gone.unlink()
    missing = failure_cause(job, _raised(lambda: load_image(gone)))
    assert missing == "FileNotFoundError: [Errno 2] No such file or directory"
    assert failure_cause(job, ModuleNotFoundError("No module named 'onnxruntime'")) == (
        "ModuleNotFoundError: No module named 'onnxruntime'"
    )
    cudnn = failure_cause(job, RuntimeError(f"cuDNN error: CUDNN_STATUS_NOT_INITIALIZED ({job.row.content})"))
    assert cudnn == "RuntimeError: cuDNN error: CUDNN_STATUS_NOT_INITIALIZED (<file>)"
    # Nor a full disk, which is the folder's: the run stops (tests/test_failures.py), its rows still to do.
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / ".x.png"))
    assert failure_cause(job, full) is None and full_folder(job, full) == tmp_path / "out"


class _Messages(Silent):
    def __init__(self) -> None:
        self.texts: list[str] = []

    def message(self, text: str) -> None:
        self.texts.append(text)


class _TwoSlots:
    """The pool as the engine sees it when taking slots out: two CPU slots, and which were retired."""

    def __init__(self) -> None:
        self.slots = ["cpu", "cpu"]
        self.retired: dict[int, str] = {}

    def retire(self, slot: int, reason: str) -> None:
        self.retired[slot] = reason

    def usable(self) -> bool:
        return len(self.retired) < len(self.slots)


def test_a_slot_is_taken_out_after_failures_in_a_row_for_one_cause_not_the_rows(rows6: Path, tmp_path: Path) -> None:
    manifest = read_manifest(rows6, default_values() | {"size": 32}, tmp_path / "out")
    jobs, _ = plan(manifest, SOURCES["random"])
    events = _Messages()
    with Ledger(manifest.out_dir) as ledger:
        run_id = ledger.start_run(rows6, [], "random", "")
        for job in jobs:
            mark_pending(ledger, job, run_id)
        execution = Execution(
            ledger, run_id, SOURCES["random"], RunConfig(), events, RunSummary(manifest.out_dir, "random"), Stop()
        )
        pool = execution.pool = _TwoSlots()
        execution.scheduler = Scheduler([])

        def finish(slot: int, job_index: int, cause: str | None, status: str = "failed") -> None:
            job = jobs[job_index]
            execution.in_flight[slot] = [job]
            execution.results(
                slot, [RowResult(job.row.number, status, 0.1, error=f"row {job.row.number}: x", cause=cause)]
            )

        emfile, ort = "OSError: [Errno 24] Too many open files", "Fail: Load model failed: system error number 24"
        # Slot 1: failures not the rows' own, then a corrupt image (its own), then a done row: nothing taken out,
        # and the held failures stand once the slot did something else.
        finish(1, 0, emfile)
        finish(1, 1, emfile)
        finish(1, 2, None)
        finish(1, 3, None, "done")
        assert not pool.retired and sorted(execution.summary.failed) == [1, 2, 3]
        # Slot 0: one cause shows two faces, then SLOT_FAILURES in a row of one: out, and every held row goes back.
        assert SLOT_FAILURES == 3
        finish(0, 4, ort)
        finish(0, 5, emfile)
        finish(0, 0, emfile)
        assert not pool.retired
        finish(0, 1, emfile)
        assert list(pool.retired) == [0] and emfile in pool.retired[0]
        assert sorted(execution.scheduler.rows()) == [1, 2, 5, 6]
        assert sorted(execution.summary.failed) == [1, 2, 3]  # their failures on slot 1 stood; slot 0's do not
        records = {r.row: r for r in read_records(manifest.out_dir, all_rows=True)[0]}
        assert {records[n].status for n in (1, 2, 5, 6)} == {"pending"}
        assert f"worker on cpu taken out ({emfile}); retried" == records[5].error
        out = [t for t in events.texts if "taken out" in t]
        assert out == [
            f"worker on cpu taken out of the run: its rows failed 3 times in a row with {emfile}, which is not about "
            "the rows; its rows go to the other workers"
        ]


# --- killed workers, signals -----------------------------------------------------------------------------------


def _start(manifest: Path, log: Path, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "batchstyle", "run", str(manifest), *TINY, "--log-json", str(log), *options]
    # PYTHONFAULTHANDLER: a run that outlasts its test prints every thread's stack on the SIGABRT `_finish` sends.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)


def _events(log: Path) -> list[dict]:
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _wait_for(
    proc: subprocess.Popen[bytes], log: Path, ready: Callable[[list[dict]], bool], limit: float = 120
) -> None:
    deadline = time.monotonic() + limit
    while not ready(_events(log)):
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; events: {_events(log)[-5:]}")
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == pid and b"spawn_main" in cmdline:
                found.append(int(entry.name))
    return found


def _finish(proc: subprocess.Popen[bytes], timeout: float = 180) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGABRT)  # the fault handler prints where each of its threads is
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        os.killpg(proc.pid, signal.SIGKILL)  # its workers hold the stderr pipe open too
        stacks = proc.stderr.read().decode()[-8000:] if proc.stderr else ""
        raise AssertionError(f"the run did not end within {timeout} s; its threads:\n{stacks}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """A test that outlasts `seconds` prints every thread's stack (shown with its failure, if it fails), and one that
    outlasts three times that ends the test process, so a hang never stalls the whole suite. Ending it at `seconds`
    was too soon: with four CPU burners and a second test session on 2 cores the healthy Ray hang test passed 600 s,
    and the whole session ended with exit 1 and no summary."""
    soft = threading.Timer(seconds, faulthandler.dump_traceback, kwargs={"all_threads": True})
    soft.daemon = True
    soft.start()
    faulthandler.dump_traceback_later(3 * seconds, exit=True)
    try:
        yield
    finally:
        soft.cancel()
        faulthandler.cancel_dump_traceback_later()


def _count(events: list[dict], name: str, **match: object) -> int:
    return sum(1 for e in events if e["event"] == name and all(e.get(k) == v for k, v in match.items()))


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker processes through /proc")
def test_a_worker_killed_mid_row_has_its_row_retried(rows6: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    # Rows of a few seconds each, so that the kill lands mid-row.
    proc = _start(rows6, log, "--iterations", "600", "--devices", "cpu,cpu")
    try:
        # Both workers hold a row (started, not finished) and rows are iterating.
        _wait_for(
            proc,
            log,
            lambda ev: _count(ev, "row_started") - _count(ev, "row_finished") == 2 and _count(ev, "iteration") >= 2,
        )
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
    finally:
        code = _finish(proc)
    events = _events(log)
    assert code == 0, proc.stderr.read().decode()[-2000:]
    retried = [e for e in events if e["event"] == "message" and "SIGKILL" in e["text"] and "retrying" in e["text"]]
    assert len(retried) == 1, [e for e in events if e["event"] == "message"]
    records = read_records(rows6.parent / "m")[0]
    assert [r.status for r in records] == ["done"] * 6
    assert all(r.error is None for r in records)
    assert events[-1]["event"] == "run_finished" and events[-1]["done"] == 6


def _gone(pid: int) -> bool:
    """No such process any more, or only its exit status is left (a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _messages(events: list[dict], *words: str) -> list[str]:
    return [e["text"] for e in events if e["event"] == "message" and all(w in e["text"] for w in words)]


# The row the test hook blocks its worker on (BATCHSTYLE_TEST_HANG_ROW), every time it is handed out. The stall
# timeout is generous next to a healthy worker's silence. A worker reports every iteration, but not while it computes
# a style's first targets (opening an ONNX Runtime session for the graph): with two CPU burners and a second test
# session beside the suite on 2 cores, that silence passed 30 s and a healthy Ray actor was killed as hung (the
# 30 s this test first had), and with a whole suite beside it, past 90 s; that phase now has SESSION_ALLOWANCE
# (pools.stall_limit), and the hook blocks before it, where the stall timeout holds.
HANG_ROW = 3
STALL = 90
HUNG = re.compile(r"hung: no sign of life for (\d+) s; killed and replaced")


@pytest.mark.slow
def test_a_hung_worker_is_killed_and_replaced_and_its_row_retried_then_failed(rows6: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    with _deadline(900):
        options = ("--iterations", "4", "--devices", "cpu,cpu", "--stall-timeout", str(STALL), "--retries", "1")
        proc = _start(rows6, log, *options, env={TEST_HANG_ROW: str(HANG_ROW)})
        code = _finish(proc, timeout=600)
    events = _events(log)
    assert code == 1, proc.stderr.read().decode()[-2000:] if proc.stderr else code
    # Hung once: killed, replaced, the row retried; hung again on its retry: failed, saying what to do about it.
    retried = _messages(events, "hung")
    assert len(retried) == 1 and retried[0].startswith(f"row {HANG_ROW}: worker on cpu hung"), retried
    assert "; retrying (1 of 1)" in retried[0]
    outcomes = [e["status"] for e in events if e["event"] == "row_finished" and e["row"] == HANG_ROW]
    assert outcomes == ["retry", "failed"]
    records = read_records(rows6.parent / "m")[0]
    assert [r.status for r in records] == ["done", "done", "failed", "done", "done", "done"]
    error = records[HANG_ROW - 1].error or ""
    assert error.startswith(f"row {HANG_ROW}: its worker hung 2 times (") and error.endswith("raise --stall-timeout")
    # Killed only once silent past the timeout, never before: the seconds it names are at least the timeout.
    silences = [int(m.group(1)) for text in (retried[0], error) for m in [HUNG.search(text)] if m]
    assert len(silences) == 2 and all(s >= STALL for s in silences), silences
    assert events[-1]["event"] == "run_finished" and events[-1]["done"] == 5 and events[-1]["failed"] == 1


def _starve(pid: int) -> None:
    """The process can open no more files from now on (EMFILE), as in a worker that leaked every descriptor."""
    hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (0, hard))


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="sets a worker's file limit with prlimit")
def test_a_slot_failing_every_row_for_a_cause_not_theirs_is_taken_out(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    for k in range(5):
        make_photo(folder / f"c{k}.png", 48, 36, seed=k)
    make_painting(folder / "s0.png", seed=1)
    make_painting(folder / "s1.png", seed=7)
    manifest = write_manifest(
        tmp_path / "m.csv", "content,style", *(f"in/c{k}.png,in/s{s}.png" for s in (0, 1) for k in range(5))
    )
    log = tmp_path / "log.jsonl"
    proc = _start(manifest, log, "--iterations", "40", "--devices", "cpu,cpu")
    try:
        # The first two rows went one to each worker: once both are done, each worker is past its start-up and
        # its first targets, and four rows or more are still queued.
        _wait_for(proc, log, lambda ev: _count(ev, "row_finished", status="done") >= 2)
        first = [e["row"] for e in _events(log) if e["event"] == "row_started"][:2]
        _wait_for(proc, log, lambda ev: {e["row"] for e in ev if e["event"] == "row_finished"} >= set(first))
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        # One worker, and only it, can no longer open the inputs (nor write its output): every row it gets fails
        # for a reason that is its own, not the row's. The other worker is untouched and does every row.
        _starve(workers[0])
    finally:
        code = _finish(proc)
    events = _events(log)
    assert code == 0, proc.stderr.read().decode()[-2000:]
    out = _messages(events, "taken out of the run")
    assert len(out) == 1, _messages(events)
    assert "worker on cpu taken out" in out[0] and "OSError: [Errno 24] Too many open files" in out[0]
    assert "its rows go to the other workers" in out[0]
    records = read_records(tmp_path / "m")[0]
    assert [r.status for r in records] == ["done"] * 10
    assert all(r.error is None for r in records)
    assert len(outputs(tmp_path / "m")) == 10
    assert _gone(workers[0])


class _StarvedAfterFirstRow(_Messages):
    """The run's own process (the single CPU slot runs in it) can open no file once the first row is done."""

    def __init__(self) -> None:
        super().__init__()
        self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)

    def row_finished(self, row: int, output: str, status: str, info: dict) -> None:
        if status == "done" and resource.getrlimit(resource.RLIMIT_NOFILE) == self.limit:
            resource.setrlimit(resource.RLIMIT_NOFILE, (0, self.limit[1]))


def test_with_its_only_slot_taken_out_the_remaining_rows_fail_with_the_cause(rows6: Path, tmp_path: Path) -> None:
    manifest = read_manifest(rows6, default_values() | {"size": 32, "iterations": 2}, tmp_path / "one")
    events = _StarvedAfterFirstRow()
    try:
        summary = run(manifest, RunConfig(model="random", devices="cpu"), events)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, events.limit)
    assert summary.exit_code == 1 and summary.done == [1]
    assert sorted(summary.failed) == [2, 3, 4, 5, 6]
    out = [t for t in events.texts if "taken out of the run" in t]
    assert len(out) == 1 and "no worker is left" in out[0] and "Too many open files" in out[0], events.texts
    records = {r.row: r for r in read_records(tmp_path / "one")[0]}
    assert records[1].status == "done"
    for number in range(2, 7):
        error = records[number].error or ""
        assert records[number].status == "failed"
        assert error.startswith(f"row {number}: not done: every worker was taken out of the run"), error
        assert "worker on cpu: OSError: [Errno 24] Too many open files" in error


def _consistent_after_stop(out: Path) -> set[int]:
    """No row left `running`, every `done` row's file complete, no temp files: what a stop must leave."""
    records = read_records(out)[0]
    assert all(r.status in ("done", "pending") for r in records), [(r.row, r.status) for r in records]
    done = {r.row for r in records if r.status == "done"}
    for r in records:
        if r.status == "done":
            assert pixels(out / r.output).shape[2] == 3
    assert not [p for p in out.rglob("*") if is_temp_file(p)]
    return done


def test_sigterm_stops_at_once_and_a_rerun_loses_nothing(rows6: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    options = ("--iterations", "120", "--devices", "cpu,cpu")
    proc = _start(rows6, log, *options)
    try:
        _wait_for(proc, log, lambda ev: _count(ev, "row_finished", status="done") >= 1)
        proc.send_signal(signal.SIGTERM)
    finally:
        code = _finish(proc)
    assert code == 128 + signal.SIGTERM
    out = rows6.parent / "m"
    done = _consistent_after_stop(out)
    assert 1 <= len(done) < 6
    assert not _children(proc.pid)
    names = {r.row: r.output for r in read_records(out)[0]}
    before = {row: (out / names[row]).stat().st_ino for row in done}
    again = cli("run", rows6, *TINY, *options)
    assert again.exit_code == 0, again.output
    assert [r.status for r in read_records(out)[0]] == ["done"] * 6
    # Finished rows were not redone: the same files (an atomic save makes a new inode).
    assert {row: (out / names[row]).stat().st_ino for row in done} == before
    skipped = int(next(line.split()[-1] for line in again.output.splitlines() if line.startswith("skipped")))
    assert skipped == len(done)


def test_first_ctrl_c_lets_running_rows_finish(rows6: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    proc = _start(rows6, log, "--iterations", "60", "--devices", "cpu")
    try:
        _wait_for(proc, log, lambda ev: _count(ev, "iteration") >= 1)
        proc.send_signal(signal.SIGINT)
    finally:
        code = _finish(proc)
    assert code == 130, proc.stderr.read().decode()[-2000:]
    events = _events(log)
    started = {e["row"] for e in events if e["event"] == "row_started"}
    finished = {e["row"] for e in events if e["event"] == "row_finished" and e["status"] == "done"}
    # The row that was running when Ctrl-C came finished; no row started after it.
    assert started == finished and len(started) == 1
    assert events[-1]["event"] == "run_finished" and events[-1]["interrupted"] == 5
    assert _consistent_after_stop(rows6.parent / "m") == finished


# --- shards ----------------------------------------------------------------------------------------------------


def test_shards_together_do_every_row_once_and_status_merges_them(rows6: Path, tmp_path: Path) -> None:
    a = cli("run", rows6, *TINY, "--iterations", "2", "--shard", "0/2")
    # The second shard takes its index from SLURM's variables, as a job array would give them.
    b = cli("run", rows6, *TINY, "--iterations", "2", env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"})
    assert a.exit_code == 0 and b.exit_code == 0, b.output
    out = rows6.parent / "m"
    assert [p.name for p in ledger_files(out)] == [
        "batchstyle-ledger.shard-0-of-2.sqlite",
        "batchstyle-ledger.shard-1-of-2.sqlite",
    ]
    by_ledger: dict[str, set[int]] = {}
    records = read_records(out)[0]
    for r in records:
        by_ledger.setdefault(r.ledger, set()).add(r.row or 0)
    assert by_ledger == {
        "batchstyle-ledger.shard-0-of-2.sqlite": {1, 3, 5},
        "batchstyle-ledger.shard-1-of-2.sqlite": {2, 4, 6},
    }
    assert len(outputs(out)) == 6
    status = cli("status", out)
    assert status.output.startswith(f"{out}: 0 pending, 0 running, 6 done, 0 failed")
    again = cli("run", rows6, *TINY, "--iterations", "2", "--shard", "1/2")
    assert re.search(r"^skipped\s+3$", again.output, re.MULTILINE), again.output
    report = cli("report", out)
    assert report.exit_code == 0 and (out / "report.html").is_file()


# --- Ray -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray() -> Iterator[object]:
    ray = pytest.importorskip("ray")
    import logging
    import tempfile

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # A short temp dir: Ray's sockets live there and AF_UNIX paths stop at 107 bytes.
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        object_store_memory=80 * 1024**2,
        _temp_dir=temp,
    )
    yield ray
    ray.shutdown()


def test_ray_backend_completes_a_manifest_like_a_local_run(
    local_ray: object, rows6: Path, tmp_path: Path, isolated_cache: Path
) -> None:
    values = default_values() | {"size": 32, "iterations": 3}
    manifest = read_manifest(rows6, values, tmp_path / "ray")
    # fp32 on both sides: an actor computes with other threads than this process, and on an AMX Xeon the bf16
    # convolutions' sums split by thread count differ enough for L-BFGS to carry one row 4 levels away.
    summary = run(manifest, RunConfig(model="random", backend="ray", cache_dir=isolated_cache, precision="fp32"))
    assert summary.exit_code == 0 and sorted(summary.done) == [1, 2, 3, 4, 5, 6]
    records = read_records(tmp_path / "ray")[0]
    assert all((r.device or "").startswith("ray:") for r in records), [r.device for r in records]
    local_config = RunConfig(model="random", devices="cpu", precision="fp32")
    local = run(read_manifest(rows6, values, tmp_path / "local"), local_config)
    assert local.exit_code == 0
    assert_same_outputs(tmp_path / "ray", tmp_path / "local", tolerance=2)


class _Rows(Silent):
    def __init__(self) -> None:
        self.finished: list[tuple[int, str]] = []

    def row_finished(self, row: int, output: str, status: str, info: dict) -> None:
        self.finished.append((row, status))


@pytest.mark.slow
def test_a_hung_ray_actor_is_killed_and_replaced(
    local_ray: object, rows6: Path, tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_HANG_ROW, str(HANG_ROW))  # RayPool hands it on to its actors
    values = default_values() | {"size": 32, "iterations": 4, "min_size": 0}
    manifest = read_manifest(rows6, values, tmp_path / "ray")
    events = _Rows()
    config = RunConfig(model="random", backend="ray", cache_dir=isolated_cache, stall_timeout=STALL, retries=0)
    with _deadline(600):
        summary = run(manifest, config, events)
    # One actor (one node, no GPU): the rows after the hung one were done by its replacement.
    assert summary.exit_code == 1 and sorted(summary.done) == [1, 2, 4, 5, 6] and list(summary.failed) == [HANG_ROW]
    assert [status for row, status in events.finished if row == HANG_ROW] == ["failed"]
    records = read_records(tmp_path / "ray")[0]
    assert [r.status for r in records] == ["done", "done", "failed", "done", "done", "done"]
    error = records[HANG_ROW - 1].error or ""
    assert error.startswith(f"row {HANG_ROW}: its worker hung once (") and error.endswith("raise --stall-timeout")
    silence = HUNG.search(error)
    assert silence is not None and int(silence.group(1)) >= STALL, error


def test_bench_plan_plans_every_row_and_optimises_none(tmp_path: Path) -> None:
    """`batchstyle bench plan`'s figures come from the real run up to its first row handed out: every row is in
    the ledger, none was optimised (the first, handed out and stopped, is pending again), no output was written."""
    from batchstyle.bench_plan import plan_figures

    fig = plan_figures(300, tmp_path, cache_dir=tmp_path / "cache")
    assert fig.rows == 300
    assert fig.read_seconds > 0 and fig.plan_seconds > 0
    assert fig.read_peak_mb > 0 and fig.plan_peak_mb > 0
    records = read_records(tmp_path / "out")[0]
    assert len(records) == 300
    assert {record.status for record in records} == {"pending"}
    assert not list((tmp_path / "out").glob("*.png"))
