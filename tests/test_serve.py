"""Tests for batchstyle.serve: the live page, its state and /metrics, read from ledgers real runs wrote.

The HTTP tests ask a real server (on a free port of 127.0.0.1) what a real small run recorded, and check each answer
against the ledger read directly; /metrics is read back with the Prometheus client's own parser. The browser test
opens the page in headless Chromium during a real `batchstyle run --serve` and watches the DOM the page's script
keeps up to date: a row seen running, then done, in one page that was never reloaded.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import cli, make_painting, make_photo, write_manifest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from batchstyle.run.ledger import Ledger, WorkerState, read_activity, read_records, summarise
from batchstyle.serve import LISTED_ROWS, ROW_SECONDS_BUCKETS, THUMB_PX, LiveServer, start_server, target_sources

FAST = ("--model", "random", "--device", "cpu", "--size", "32", "--iterations", "2", "-q")
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output folder a real run wrote: two rows done, one failed (its photo is missing), and files beside it
    that the server must never hand out."""
    root = tmp_path_factory.mktemp("night")
    make_photo(root / "in" / "photo.png")
    make_photo(root / "in" / "photo2.jpg", 40, 56, seed=3)
    make_painting(root / "in" / "painting.png")
    manifest = write_manifest(
        root / "night.csv",
        "content,style,output",
        "in/photo.png,in/painting.png,a.png",
        "in/photo2.jpg,in/painting.png,sub/b.png",
        "in/gone.png,in/painting.png,c.png",
    )
    result = cli("run", manifest, *FAST)
    assert result.exit_code == 1, result.output  # the missing photo's row failed, the others are done
    out = root / "night"
    (root / "secret.png").write_bytes((out / "a.png").read_bytes())  # an image outside the folder
    (out / "leak.png").symlink_to(root / "secret.png")  # a symlink inside it pointing out
    (out / "same.png").symlink_to(out / "a.png")  # one pointing in: allowed
    return out


@pytest.fixture
def served(night: Path) -> Iterator[LiveServer]:
    server = start_server(night, "127.0.0.1", 0, thread=True)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def get(server: LiveServer, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of GET path; a 404 is an answer, not an exception."""
    try:
        with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=30) as answer:
            return answer.status, answer.headers.get("Content-Type", ""), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def state(server: LiveServer) -> dict[str, Any]:
    status, kind, body = get(server, "/state.json")
    assert status == 200 and kind == "application/json"
    return json.loads(body)


def metrics(server: LiveServer) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """/metrics as the Prometheus client's parser reads it: sample name -> labels -> value."""
    status, kind, body = get(server, "/metrics")
    assert status == 200 and kind.startswith("text/plain")
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_the_page_is_one_self_contained_file(served: LiveServer) -> None:
    status, kind, body = get(served, "/")
    page = body.decode()
    assert status == 200 and kind.startswith("text/html")
    assert "<script>" in page and "/state.json" in page
    # Nothing is fetched from anywhere else: no external script, style sheet, font or image.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page


def test_the_state_lists_every_row_by_status_as_the_ledger_has_it(served: LiveServer, night: Path) -> None:
    records, last_run = read_records(night, history=False)
    seen = state(served)
    assert seen["waiting"] is None
    assert seen["counts"] == summarise(records) == {"pending": 0, "running": 0, "done": 2, "failed": 1}
    assert seen["total"] == 3 and seen["run"]["id"] == last_run["id"]
    assert seen["run"]["outcome"] == {"done": 2, "skipped": 0, "failed": 1}
    rows = {row["output"]: row for row in seen["rows"]}
    by_output = {record.output: record for record in records}
    assert set(rows) == set(by_output)
    for output, row in rows.items():
        assert row["status"] == by_output[output].status and row["seconds"] == by_output[output].seconds
    failed = next(row for row in seen["rows"] if row["status"] == "failed")
    assert failed["row"] == 3 and "gone.png" in failed["error"] and "no such file" in failed["error"]
    assert rows["sub/b.png"]["thumb"].startswith("/thumb?path=sub/b.png")
    assert "thumb" not in failed
    # The one worker finished the two rows it was handed (the failed row never reached it).
    [worker] = seen["workers"]
    assert (worker["device"], worker["state"], worker["rows_done"]) == ("cpu", "finished", 2)


def test_a_thumbnail_is_the_output_made_small(served: LiveServer, night: Path) -> None:
    status, kind, body = get(served, "/thumb?path=sub/b.png")
    assert status == 200 and kind == "image/jpeg"
    thumb = Image.open(io.BytesIO(body))
    full = Image.open(night / "sub" / "b.png")
    assert max(thumb.size) <= THUMB_PX
    assert abs(thumb.width / thumb.height - full.width / full.height) < 0.1
    # The same pixels, small: mean colour within a few levels of the output's.
    assert all(abs(a - b) < 8 for a, b in zip(_mean(thumb), _mean(full.convert("RGB"))))
    again = get(served, "/thumb?path=sub/b.png")
    assert again[2] == body  # kept, not made again (and identical)
    assert get(served, "/file?path=a.png")[2] == (night / "a.png").read_bytes()


def _mean(img: Image.Image) -> tuple[float, ...]:
    return tuple(np.asarray(img.convert("RGB"), np.float64).mean(axis=(0, 1)))


@pytest.mark.parametrize(
    "path",
    [
        "../secret.png",
        "sub/../../secret.png",
        "..%2Fsecret.png",
        "%2E%2E/secret.png",
        "leak.png",  # a symlink inside the folder that points out of it
        "SECRET_ABSOLUTE",  # the absolute path of the file outside
        "",
        "batchstyle-ledger.sqlite",  # inside, but not an output: /file refuses it, /thumb cannot read it
        "nothing-here.png",
        "sub",
    ],
)
def test_no_file_outside_the_output_folder_is_served(served: LiveServer, night: Path, path: str) -> None:
    secret = night.parent / "secret.png"
    path = path.replace("SECRET_ABSOLUTE", str(secret))
    for route in ("/thumb", "/file"):
        status, _, body = get(served, f"{route}?path={path}")
        assert status == 404, f"{route}?path={path}"
        assert body == b"not found\n"


def test_a_symlink_that_stays_inside_is_served(served: LiveServer) -> None:
    assert get(served, "/thumb?path=same.png")[0] == 200
    assert get(served, "/nowhere")[0] == 404


def test_metrics_parse_and_match_the_ledger(served: LiveServer, night: Path) -> None:
    records, _ = read_records(night, history=False)
    found = metrics(served)
    assert {labels[0][1]: value for labels, value in found["batchstyle_rows"].items()} == summarise(records)
    done = [r for r in records if r.status == "done"]
    histogram = found["batchstyle_row_seconds_bucket"]
    assert found["batchstyle_row_seconds_count"][()] == len(done) == 2
    assert found["batchstyle_row_seconds_sum"][()] == pytest.approx(sum(r.seconds or 0 for r in done))
    for bound in ROW_SECONDS_BUCKETS:
        expected = sum(1 for r in done if (r.seconds or 0) <= bound)
        assert histogram[(("le", str(bound)),)] == expected
    assert histogram[(("le", "+Inf"),)] == 2
    targets = {
        dict(labels)["role"] + " " + dict(labels)["source"]: v
        for labels, v in found["batchstyle_targets_total"].items()
    }
    expected_targets = {"content cache": 0, "content computed": 0, "style cache": 0, "style computed": 0}
    for record in done:
        assert record.targets  # each done row says where its targets came from
        for role, hit in target_sources(record.targets):
            expected_targets[f"{role} {'cache' if hit == 'hit' else 'computed'}"] += 1
    assert targets == expected_targets and sum(targets.values()) == 4  # a content and a style target per row
    assert found["batchstyle_workers_replaced_total"][()] == 0
    assert found["batchstyle_stalls_killed_total"][()] == 0
    assert found["batchstyle_iterations_per_second"] == {(("device", "cpu"),): 0.0}  # the run is over


def test_target_sources_reads_every_scale() -> None:
    text = "content=hit style=miss,hit | content=miss style=miss"
    assert list(target_sources(text)) == [
        ("content", "hit"),
        ("style", "miss"),
        ("style", "hit"),
        ("content", "miss"),
        ("style", "miss"),
    ]
    assert list(target_sources(None)) == []


def live_ledger(out: Path) -> Ledger:
    """A ledger mid-run, as `Execution` writes it, with two GPU workers: one holds rows 1 and 2 (a batch), 50 of
    200 iterations into them at 8 row iterations a second, the other was lost; three workers replaced, one hung."""
    ledger = Ledger(out)
    run_id = ledger.start_run(out / "m.csv", ["batchstyle", "run"], "random", "random:w")
    for number in (1, 2, 3):
        output = out / f"r{number}.png"
        ledger.mark_pending(output, row=number, content="c.png", styles="s.png", key=f"k{number}", run_id=run_id)
    for number in (1, 2):
        ledger.mark_running(
            out / f"r{number}.png", run_id=run_id, device="cuda:0", model="random", weights="w", planned=200
        )
    workers = [WorkerState(0, "cuda:0", since=time.time()), WorkerState(1, "cuda:1", since=time.time())]
    ledger.start_workers(run_id, workers)
    workers[0].state, workers[0].rows, workers[0].rate, workers[0].iterations = "running", "1,2", 8.0, 100
    workers[1].state, workers[1].detail = "lost", "died (exit code -9)"
    ledger.write_live(run_id, workers, {out / "r1.png": 50, out / "r2.png": 50})
    ledger.count_workers(run_id, 3, 1)
    return ledger


def test_a_running_rows_progress_and_eta_come_from_its_slots_rate(tmp_path: Path) -> None:
    out = tmp_path / "live"
    ledger = live_ledger(out)  # held open, as the run holds it: the server reads beside the writer
    server = start_server(out, "127.0.0.1", 0, thread=True)
    try:
        seen = state(server)
        rows = {row["output"]: row for row in seen["rows"]}
        assert seen["counts"] == {"pending": 1, "running": 2, "done": 0, "failed": 0}
        running = rows["r1.png"]
        assert running["progress"] == pytest.approx(0.25)
        assert (running["done_units"], running["total_units"], running["unit"]) == (50, 200, "iterations")
        assert running["rate"] == pytest.approx(4.0)  # the slot's 8 a second, shared by the batch's two rows
        assert running["eta"] == pytest.approx(150 / 4.0)
        assert rows["r3.png"]["status"] == "pending" and "progress" not in rows["r3.png"]
        lost = next(w for w in seen["workers"] if w["slot"] == 1)
        assert (lost["state"], lost["detail"]) == ("lost", "died (exit code -9)")
        assert (seen["workers_replaced"], seen["stalls_killed"]) == (3, 1)
        found = metrics(server)
        assert found["batchstyle_iterations_per_second"] == {(("device", "cuda:0"),): 8.0, (("device", "cuda:1"),): 0.0}
        assert found["batchstyle_workers_replaced_total"][()] == 3
        assert found["batchstyle_stalls_killed_total"][()] == 1
        assert found["batchstyle_workers"] == {(("state", "lost"),): 1, (("state", "running"),): 1}
        assert found["batchstyle_row_seconds_count"][()] == 0
    finally:
        server.shutdown()
        server.server_close()
        ledger.close()


def test_read_activity_sees_what_the_run_writes(tmp_path: Path) -> None:
    out = tmp_path / "live"
    live_ledger(out).close()
    activity = read_activity(out)
    assert [(w["slot"], w["device"], w["state"], w["rows"]) for w in activity.workers] == [
        (0, "cuda:0", "running", "1,2"),
        (1, "cuda:1", "lost", ""),
    ]
    assert (activity.workers_replaced, activity.stalls_killed) == (3, 1)
    records, _ = read_records(out, history=False)
    assert {r.output: (r.iteration, r.planned) for r in records} == {
        "r1.png": (50, 200),
        "r2.png": (50, 200),
        "r3.png": (None, None),
    }


def test_a_folder_no_run_has_written_waits(tmp_path: Path) -> None:
    server = start_server(tmp_path / "not-yet", "127.0.0.1", 0, thread=True)
    try:
        seen = state(server)
        assert "no run has written" in seen["waiting"] and seen["rows"] == [] and seen["total"] == 0
        assert metrics(server)["batchstyle_rows"] == {
            (("status", s),): 0 for s in ("pending", "running", "done", "failed")
        }
    finally:
        server.shutdown()
        server.server_close()


def test_the_listing_is_capped_but_the_counts_are_not(tmp_path: Path) -> None:
    out = tmp_path / "many"
    with Ledger(out) as ledger:
        run_id = ledger.start_run(out / "m.csv", [], "random", "w")
        for number in range(1, LISTED_ROWS + 51):
            ledger.mark_pending(out / f"r{number}.png", row=number, content="c", styles="s", key="k", run_id=run_id)
    server = start_server(out, "127.0.0.1", 0, thread=True)
    try:
        seen = state(server)
        assert seen["counts"]["pending"] == seen["total"] == LISTED_ROWS + 50
        assert len(seen["rows"]) == LISTED_ROWS and seen["rows"][0]["row"] == 1
    finally:
        server.shutdown()
        server.server_close()


def test_a_port_in_use_is_refused_with_the_fix(night: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", night, "--port", port)
        assert result.exit_code == 2
        assert f"port {port} on 127.0.0.1 is in use" in result.stderr and f"--port {port + 1}" in result.stderr
        manifest = night.parent / "night.csv"
        ran = cli("run", manifest, *FAST, "--serve", port)
        assert ran.exit_code == 2 and "is in use" in ran.stderr
    assert cli("run", manifest, *FAST, "--serve", "http").exit_code == 2


def test_serve_takes_a_manifest_for_its_folder_and_imports_no_torch(night: Path) -> None:
    """`batchstyle serve night.csv` in a fresh interpreter: it serves night/, and answering the page, the state,
    the metrics and a thumbnail leaves torch and onnxruntime unimported."""
    probe = """
import json, sys, threading, urllib.request
from batchstyle import cli
from batchstyle import serve
started = {}
real = serve.LiveServer.serve_forever
def serve_forever(self, poll_interval=0.5):
    started["url"] = self.url
    threading.Thread(target=ask, args=(self,)).start()
    real(self, poll_interval)
def ask(server):
    for path in ("", "state.json", "metrics", "thumb?path=a.png"):
        started[path] = urllib.request.urlopen(server.url + path, timeout=30).status
    started["rows"] = json.load(urllib.request.urlopen(server.url + "state.json"))["total"]
    server.shutdown()
serve.LiveServer.serve_forever = serve_forever
try:
    cli.main(["serve", sys.argv[1], "--port", "0"], prog_name="batchstyle")
except SystemExit as exc:
    started["code"] = exc.code
started["heavy"] = [m for m in ("torch", "onnxruntime") if m in sys.modules]
print(json.dumps(started))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", probe, "night.csv"],
        cwd=night.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["heavy"] == [], f"batchstyle serve imported {seen['heavy']}"
    assert [seen[p] for p in ("", "state.json", "metrics", "thumb?path=a.png")] == [200] * 4
    assert seen["rows"] == 3 and seen.get("code") in (None, 0)
    assert f"serving {night}" in proc.stderr and seen["url"] in proc.stderr


# -- the page in a real browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's headless Chromium: installed here when missing and this process may (CI runs as root)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "chromium"]
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:  # a fresh image has no package lists yet
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"apt-get install chromium failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        found = shutil.which("chromium")
    if found is None:
        pytest.skip(
            "headless Chromium is not installed (apt-get install chromium) and this process, not root, "
            "cannot install it"
        )
    return found


class Browser:
    """Headless Chromium driven by its DevTools protocol over a pipe (`--remote-debugging-pipe`: JSON messages, each
    ended by a NUL byte, on the browser's fds 3 and 4), so no WebSocket client is needed."""

    def __init__(self, chromium: str, profile: Path) -> None:
        to_browser, self._in = os.pipe()
        self._out, from_browser = os.pipe()
        # Above 9, so that putting them on 3 and 4 in the browser can never overwrite one with the other.
        for low in (to_browser, from_browser):
            high = fcntl.fcntl(low, fcntl.F_DUPFD, 10)
            os.close(low)
            to_browser, from_browser = (high, from_browser) if low == to_browser else (to_browser, high)
        args = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--window-size=1280,900",
            "about:blank",
        ]
        self.log = profile.parent / "chromium.log"

        def onto_3_and_4() -> None:  # in the child: dup2's copies are inheritable, and close_fds=False keeps them
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                args,
                preexec_fn=onto_3_and_4,
                close_fds=False,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        os.close(to_browser)
        os.close(from_browser)
        self._reader = os.fdopen(self._out, "rb")
        self._next = 0
        self._buffer = b""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._in, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = self._reader.read1(65536)
                assert chunk, "Chromium closed its DevTools pipe:\n" + self.log.read_text(errors="replace")[-3000:]
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next:
                assert "error" not in answer, answer
                return answer["result"]

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, self.session, **params)

    def evaluate(self, expression: str) -> Any:
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._in)
        self._reader.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)


# The rows the page's table shows, as the browser rendered it, and whether this is still the first page it loaded.
ROWS_SEEN = (
    "JSON.stringify({kept: window.kept === 1, rows: [...document.querySelectorAll('#rows tr[data-output]')]"
    ".map(tr => [tr.dataset.output, tr.dataset.status, (tr.querySelector('.bar span') || {style: {}}).style.width"
    " || ''])})"
)


def test_the_page_in_chromium_sees_a_row_go_from_running_to_done(
    chromium: str, tmp_path: Path, isolated_cache: Path
) -> None:
    """A real run with --serve, its page open in headless Chromium from before the first row: the page's script
    shows a row running (with its progress bar), then done, without the page ever being reloaded.
    BATCHSTYLE_SHOTS=DIR also writes screenshots of the page mid-run and of the run's report.html there."""
    make_photo(tmp_path / "in" / "photo.png")
    make_photo(tmp_path / "in" / "photo2.png", seed=3)
    make_painting(tmp_path / "in" / "painting.png")
    manifest = write_manifest(
        tmp_path / "night.csv",
        "content,style,output",
        "in/photo.png,in/painting.png,a.png",
        "in/photo2.png,in/painting.png,b.png",
        "in/gone.png,in/painting.png,c.png",  # fails at once: the page lists it with its error
    )
    shots = Path(os.environ["BATCHSTYLE_SHOTS"]) if os.environ.get("BATCHSTYLE_SHOTS") else None
    # Rows of seconds on a fast CPU too (stop_tolerance 0: none stops early); torch targets and fp32 spare the run
    # an ONNX export and a precision probe in this session's fresh cache.
    args = ["--model", "random", "--device", "cpu", "--size", "32", "--iterations", "120", "--stop-tolerance", "0"]
    args += ["--targets", "torch", "--precision", "fp32", "-q", "--serve", "0", *(["--report"] if shots else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BATCHSTYLE_CACHE": str(isolated_cache)}
    run = subprocess.Popen(
        [sys.executable, "-m", "batchstyle", "run", str(manifest), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    browser = None
    try:
        assert run.stderr is not None
        said = ""
        while (found := re.search(r"live page: (http://\S+/)", said)) is None:
            line = run.stderr.readline()
            assert line, said + run.stderr.read()
            said += line
        browser = Browser(chromium, tmp_path / "profile")
        browser.page("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        browser.page("Page.navigate", url=found.group(1))
        deadline = time.monotonic() + 20
        while browser.evaluate("document.readyState") != "complete":
            assert time.monotonic() < deadline, "the page did not load"
            time.sleep(0.1)
        browser.evaluate("window.kept = 1")
        history: dict[str, list[str]] = {}
        best_shot = 0  # 1: a row running with its bar moved; 2: that beside a finished row's thumbnail
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            seen = json.loads(browser.evaluate(ROWS_SEEN))
            assert seen["kept"], "the page was reloaded: the test must see its script update it"
            for output, status, _ in seen["rows"]:
                if not history.get(output) or history[output][-1] != status:
                    history.setdefault(output, []).append(status)
            if shots:
                moving = any(
                    status == "running" and float(width.rstrip("%") or 0) > 0 for _, status, width in seen["rows"]
                )
                quality = 2 if moving and any(status == "done" for _, status, _ in seen["rows"]) else int(moving)
                if quality > best_shot:
                    browser.screenshot(shots / "serve-mid-run.png")
                    best_shot = quality
            changed = [output for output, seen_as in history.items() if _in_order(seen_as, "running", "done")]
            # Once the run is over its server is gone, and the page can show nothing newer.
            if run.poll() is not None or (changed and not shots):
                break
            time.sleep(0.25)
        assert changed, f"no row was seen running then done: {history}"
        assert history[".invalid-row3"] == ["failed"]  # refused before work: the ledger names it by its row
        assert run.wait(timeout=120) == 1, run.stderr.read()  # the missing photo's row failed, the others are done
        if shots:
            browser.page("Page.navigate", url=(tmp_path / "night" / "report.html").as_uri())
            time.sleep(1.0)
            browser.screenshot(shots / "report.png")
    finally:
        if browser is not None:
            browser.close()
        if run.poll() is None:
            run.kill()
        run.wait(timeout=30)
        for stream in (run.stdout, run.stderr):
            if stream:
                stream.close()


def _in_order(seen: list[str], first: str, then: str) -> bool:
    return first in seen and then in seen[seen.index(first) + 1 :]
