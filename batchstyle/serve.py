"""The live page and /metrics of an output folder: `batchstyle serve OUT`, and `batchstyle run --serve PORT`.

A night's run is watched through its ledger alone, opened read-only on every look (WAL readers never block the
run), so the page works the same from the run's own process, from another shell, and after the run ended. The
parent writes each slot's progress about once a second (`execution.LIVE_INTERVAL`); the page asks for the state
once a second, and each answer is a fresh read of the ledger no older than READ_INTERVAL.

Torch-free and stdlib-served (ThreadingHTTPServer, no web framework): a `run --serve` must not slow the run it
watches, and `serve` must start in a second on a box where the run's process holds every core. The page is one
self-contained HTML file (inline CSS and script, nothing from a CDN), so it works on an air-gapped cluster.

Only files inside the output folder are ever served: a requested path is resolved (symlinks followed) and must
still lie inside the folder, else the answer is 404, whatever the path looked like.
"""

from __future__ import annotations

import errno
import json
import mimetypes
import socket
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from PIL import Image
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from batchstyle.errors import UnusableInput
from batchstyle.images import ImageError, load_image
from batchstyle.reserved import HTML_NAME
from batchstyle.run.ledger import STATUSES, Activity, Record, read_activity, read_records, summarise
from batchstyle.video import frames_folder, is_clip_output

__all__ = ["Folder", "LiveServer", "ServeError", "start_server"]

# A look at the ledger serves every client and scrape within this many seconds: ten open pages and a Prometheus
# scraping every 5 s then cost the run one read a half second, not one per request.
READ_INTERVAL = 0.5
# ... and within this many times the last read's own duration: a 200,000-row ledger took 5 s to read (2 loaded
# cores), and a page open beside the run would otherwise have kept a core reading it; this way it costs a tenth.
READ_COST_FACTOR = 10
# Rows of each status the page lists (all are counted): a 200,000-row night would otherwise send megabytes of JSON
# every second. Running rows are always listed in full: there are only as many as the workers hold.
LISTED_ROWS = 200
THUMB_PX = 160  # the long side of a finished output's thumbnail
THUMBS_KEPT = 1000  # thumbnails kept in memory (about 5 KB each as JPEG)
# Seconds a finished row may take, as the histogram's buckets: small previews take seconds, 4096 px prints hours.
ROW_SECONDS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
# What /file serves from the output folder: the outputs a run writes (images, clips) and its report; never the
# ledger or its locks.
SERVED_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".avif", ".gif", ".mp4", ".webm", ".mov", ".mkv", ".html"}
)


class ServeError(UnusableInput):
    """The server cannot start (the port is taken, the host is not this machine's); the message says the fix."""


@dataclass(frozen=True)
class Look:
    """One read of the folder's ledgers: its rows, its latest run, what its workers do; `waiting` says why there
    is nothing yet (no run has written the folder, or the first is creating its ledger)."""

    at: float
    records: list[Record]
    run: dict[str, Any] | None
    activity: Activity | None
    waiting: str | None = None


class Folder:
    """An output folder being watched: the ledger read at most every READ_INTERVAL, thumbnails of its outputs."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.root = self.out_dir.resolve()
        self._lock = threading.Lock()
        self._look: Look | None = None
        self._read_cost = 0.0  # seconds the last read of the ledger took
        self._thumbs: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()

    def look(self) -> Look:
        with self._lock:
            now = time.time()
            if self._look is None or now - self._look.at >= max(READ_INTERVAL, READ_COST_FACTOR * self._read_cost):
                began = time.monotonic()
                self._look = self._read(now)
                self._read_cost = time.monotonic() - began
            return self._look

    def _read(self, now: float) -> Look:
        try:
            records, run = read_records(self.out_dir, history=False)
            activity = read_activity(self.out_dir)
        except FileNotFoundError:
            return Look(now, [], None, None, f"no run has written {self.out_dir} yet: waiting for its ledger")
        except sqlite3.Error as exc:
            # A ledger being created (no table yet) or upgraded by the run that just started: the next look sees it.
            if self._look is not None and self._look.waiting is None:
                return Look(now, self._look.records, self._look.run, self._look.activity)
            return Look(now, [], None, None, f"the ledger cannot be read yet ({exc}); trying again")
        return Look(now, records, run, activity)

    def state(self) -> dict[str, Any]:
        """What the page shows, JSON-ready: the counts, the rows listed with progress and ETA, the workers."""
        look = self.look()
        now = time.time()
        workers = look.activity.workers if look.activity else []
        holders = _row_holders(workers)
        records = look.records
        counts = summarise(records)
        by_status: dict[str, list[Record]] = {status: [] for status in STATUSES}
        for record in records:
            by_status.setdefault(record.status, []).append(record)
        listed = (
            by_status["running"]
            + _newest(by_status["failed"])[:LISTED_ROWS]
            + _newest(by_status["done"])[:LISTED_ROWS]
            + by_status["pending"][:LISTED_ROWS]
        )
        run = look.run or {}
        return {
            "folder": str(self.root),
            "now": now,
            "waiting": look.waiting,
            "run": {key: run.get(key) for key in ("id", "started", "finished", "model", "manifest")}
            | {"outcome": _outcome(run.get("outcome"))},
            "counts": counts,
            "total": len(records),
            "rows": [self._row(record, holders, now) for record in listed],
            "workers": [
                {key: worker.get(key) for key in ("slot", "device", "state", "detail", "rows", "since", "rate")}
                | {"rows_done": worker.get("rows_done") or 0}
                for worker in workers
            ],
            "workers_replaced": look.activity.workers_replaced if look.activity else 0,
            "stalls_killed": look.activity.stalls_killed if look.activity else 0,
            "report": (self.out_dir / HTML_NAME).is_file(),
        }

    def _row(self, record: Record, holders: dict[int, tuple[dict[str, Any], int]], now: float) -> dict[str, Any]:
        row: dict[str, Any] = {
            key: getattr(record, key)
            for key in ("row", "output", "status", "device", "started", "seconds", "total_loss", "error", "iterations")
        }
        row["finished"] = record.finished
        if record.status == "running":
            row.update(_progress(record, holders.get(record.row) if record.row is not None else None, now))
        if record.status == "done" or (record.frames_done and record.status == "running"):
            row["thumb"] = f"/thumb?path={quote(record.output)}&v={int(record.finished or record.started or 0)}"
            row["file"] = f"/file?path={quote(record.output)}"
        return row

    def contained(self, relative: str) -> Path | None:
        """The file `relative` names inside the output folder, or None: absolute paths, `..` and symlinks are
        resolved first, so nothing that lands outside the folder (or is not a file) is ever returned."""
        if not relative or "\0" in relative:
            return None
        try:
            resolved = (self.root / relative).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symlink loop
            return None
        if not resolved.is_relative_to(self.root) or not resolved.is_file():
            return None
        return resolved

    def thumbnail(self, relative: str) -> bytes | None:
        """A JPEG of at most THUMB_PX of the output `relative` (a clip's: its latest finished frame), made once per
        version of the file and kept; None where there is no image to show."""
        found = self._thumb_source(relative)
        if found is None:
            return None
        stat = found.stat()
        key = (str(found), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        try:
            img = load_image(found)
        except ImageError:
            return None
        img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
        buffer = BytesIO()
        img.save(buffer, "JPEG", quality=85)
        data = buffer.getvalue()
        with self._lock:
            self._thumbs[key] = data
            while len(self._thumbs) > THUMBS_KEPT:
                self._thumbs.popitem(last=False)
        return data

    def _thumb_source(self, relative: str) -> Path | None:
        output = self.contained(relative)
        if output is not None and not is_clip_output(output):
            return output
        if not relative or not is_clip_output(Path(relative)):
            return None
        folder = frames_folder(self.root / relative)
        frames = sorted(folder.glob("frame-*.png")) if folder.is_dir() else []
        return self.contained(str(frames[-1].relative_to(self.root))) if frames else None


def _outcome(text: str | None) -> dict[str, Any] | None:
    """A finished run's counts ({"done": 2, "failed": 1}); the ledger keeps them as JSON text."""
    try:
        found = json.loads(text) if text else None
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _newest(records: Sequence[Record]) -> list[Record]:
    return sorted(records, key=lambda r: r.finished or 0.0, reverse=True)


def _row_holders(workers: Iterable[dict[str, Any]]) -> dict[int, tuple[dict[str, Any], int]]:
    """Row number -> (the running worker that holds it, how many rows it holds)."""
    holders = {}
    for worker in workers:
        if worker.get("state") != "running" or not worker.get("rows"):
            continue
        numbers = [int(n) for n in str(worker["rows"]).split(",") if n.strip().isdigit()]
        for number in numbers:
            holders[number] = (worker, len(numbers))
    return holders


def _progress(record: Record, holder: tuple[dict[str, Any], int] | None, now: float) -> dict[str, Any]:
    """A running row's fraction done, its rate and its ETA in seconds. The rate is its slot's (row iterations a
    second over the last LIVE_INTERVAL, shared by the rows of its batch) where the slot has one, else the row's own
    average since it started; a clip counts frames."""
    elapsed = max(now - record.started, 1e-3) if record.started else None
    if record.frames:
        done, total, rate = record.frames_done or 0, record.frames, None
        unit = "frames"
    elif record.planned:
        done, total, unit = record.iteration or 0, record.planned, "iterations"
        worker_rate = holder[0].get("rate") if holder else None
        rate = worker_rate / holder[1] if holder and worker_rate else None
    else:
        return {"progress": None, "eta": None, "rate": None}
    if rate is None and elapsed and done:
        rate = done / elapsed
    left = max(total - done, 0)
    return {
        "progress": min(done / total, 1.0) if total else None,
        "done_units": done,
        "total_units": total,
        "unit": unit,
        "rate": rate,
        "eta": left / rate if rate else None,
    }


def _this_run(look: Look) -> list[Record]:
    """The rows the latest run itself started (each ledger's run, for shards): what counters and the histogram count.
    Rows it skipped as done keep an earlier run's times and targets."""
    started = {run["ledger"]: run["started"] for run in (look.activity.runs if look.activity else [])}
    return [r for r in look.records if r.started is not None and r.started >= started.get(r.ledger, float("inf"))]


def target_sources(text: str | None) -> Iterator[tuple[str, str]]:
    """(role, hit or miss) for every target a row's `targets` records: "content=hit style=miss,hit | content=miss
    style=miss" (one part per scale) is content hit, style miss, style hit, content miss, style miss."""
    for scale in (text or "").split("|"):
        for part in scale.split():
            role, _, found = part.partition("=")
            for one in found.split(","):
                if one in ("hit", "miss"):
                    yield role, one


class LedgerCollector(Collector):
    """/metrics from the ledger, built afresh on each scrape: Prometheus keeps the history, the ledger the state."""

    def __init__(self, folder: Folder) -> None:
        self.folder = folder

    def collect(self) -> Iterator[Metric]:
        look = self.folder.look()
        rows = GaugeMetricFamily(
            "batchstyle_rows", "Rows of the output folder's latest run, by status.", labels=["status"]
        )
        for status, count in summarise(look.records).items():
            rows.add_metric([status], count)
        yield rows
        workers = look.activity.workers if look.activity else []
        rates = GaugeMetricFamily(
            "batchstyle_iterations_per_second",
            "Row iterations per second on each device over its workers' last second or more (0 while idle).",
            labels=["device"],
        )
        per_device: dict[str, float] = {}
        for worker in workers:
            device = str(worker.get("device") or "?")
            running = worker.get("state") == "running"
            per_device[device] = per_device.get(device, 0.0) + (float(worker.get("rate") or 0.0) if running else 0.0)
        for device, rate in sorted(per_device.items()):
            rates.add_metric([device], rate)
        yield rates
        states = GaugeMetricFamily("batchstyle_workers", "Worker slots of the latest run, by state.", labels=["state"])
        for state in sorted({str(w.get("state")) for w in workers}):
            states.add_metric([state], sum(1 for w in workers if str(w.get("state")) == state))
        yield states
        this_run = _this_run(look)
        seconds = sorted(r.seconds for r in this_run if r.status == "done" and r.seconds is not None)
        buckets = [(str(bound), sum(1 for s in seconds if s <= bound)) for bound in ROW_SECONDS_BUCKETS]
        yield HistogramMetricFamily(
            "batchstyle_row_seconds",
            "Seconds each row done by the latest run took, from handing it out to its output in place.",
            buckets=[*buckets, ("+Inf", len(seconds))],
            sum_value=sum(seconds),
        )
        activity = look.activity
        yield CounterMetricFamily(
            "batchstyle_workers_replaced",
            "Worker processes or Ray actors of the latest run that died or hung and were started afresh.",
            value=activity.workers_replaced if activity else 0,
        )
        yield CounterMetricFamily(
            "batchstyle_stalls_killed",
            "Of the workers replaced, those killed as hung (silent past the stall timeout).",
            value=activity.stalls_killed if activity else 0,
        )
        targets = CounterMetricFamily(
            "batchstyle_targets",
            "Content and style targets of the rows the latest run did, from the target cache or computed.",
            labels=["role", "source"],
        )
        counted = {(role, source): 0 for role in ("content", "style") for source in ("cache", "computed")}
        for record in this_run:
            for role, found in target_sources(record.targets):
                key = (role, "cache" if found == "hit" else "computed")
                counted[key] = counted.get(key, 0) + 1
        for (role, source), count in sorted(counted.items()):
            targets.add_metric([role, source], count)
        yield targets


class _Handler(BaseHTTPRequestHandler):
    server: LiveServer
    server_version = "batchstyle"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Silent: the run's terminal is the run's, and a page polling every second would fill it."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        folder = self.server.folder
        try:
            if parts.path == "/":
                self._send(PAGE.encode(), "text/html; charset=utf-8")
            elif parts.path == "/state.json":
                self._send(json.dumps(folder.state()).encode(), "application/json")
            elif parts.path == "/metrics":
                self._send(generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
            elif parts.path == "/thumb":
                data = folder.thumbnail(query.get("path", [""])[0])
                self._send(data, "image/jpeg", cache=True) if data is not None else self._not_found()
            elif parts.path == "/file":
                self._file(query.get("path", [""])[0])
            else:
                self._not_found()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page was closed mid-answer

    def _file(self, relative: str) -> None:
        found = self.server.folder.contained(relative)
        if found is None or found.suffix.lower() not in SERVED_SUFFIXES:
            self._not_found()
            return
        kind = mimetypes.guess_type(found.name)[0] or "application/octet-stream"
        self._send(found.read_bytes(), kind)

    def _send(self, body: bytes, kind: str, cache: bool = False) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        # A thumbnail's URL names its version; everything else is live.
        self.send_header("Cache-Control", "max-age=86400" if cache else "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _not_found(self) -> None:
        body = b"not found\n"
        self.send_response(HTTPStatus.NOT_FOUND)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class LiveServer(ThreadingHTTPServer):
    """The page, its state and /metrics of one output folder, one thread per request."""

    daemon_threads = True  # a page left open never holds the process at exit

    def __init__(self, folder: Folder, host: str, port: int) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.folder = folder
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(LedgerCollector(folder))
        try:
            super().__init__((host, port), _Handler)
        except socket.gaierror:
            raise ServeError(
                f"cannot serve on {host}: no such host here; give --host an address of this machine"
            ) from None
        except OSError as exc:
            raise ServeError(_bind_trouble(host, port, exc)) from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"


def _bind_trouble(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is in use (another batchstyle serve, or another server): give another port "
            f"(--port {port + 1}), or stop what holds it"
        )
    if exc.errno == errno.EACCES:
        return f"port {port} on {host} needs privileges this user lacks: give a port above 1023"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine: give --host one of its addresses, or 0.0.0.0 for all"
    return f"cannot serve on {host}:{port}: {exc.strerror or exc}"


def start_server(out_dir: Path, host: str = "127.0.0.1", port: int = 8080, thread: bool = False) -> LiveServer:
    """The server of `out_dir`, bound (port 0: any free port, see `.url`); with `thread` it already serves from a
    daemon thread (`run --serve`), else the caller calls `serve_forever`. Raises `ServeError` when it cannot bind."""
    server = LiveServer(Folder(out_dir), host, port)
    if thread:
        threading.Thread(target=server.serve_forever, name="batchstyle-serve", daemon=True).start()
    return server


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>batchstyle</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#f6f6f4}
header{background:#223;color:#eee;padding:10px 18px}header h1{font-size:17px;margin:0 0 2px}
header .sub{font-size:12px;color:#bbc}main{padding:12px 18px}
.counts{display:flex;gap:10px;margin:6px 0 12px;flex-wrap:wrap}
.count{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 12px;cursor:pointer;min-width:78px}
.count b{font-size:20px;display:block}.count.on{outline:2px solid #446}
.s-done{color:#1e823c}.s-failed{color:#be2828}.s-pending{color:#a87800}.s-running{color:#285ab4}
.all{height:8px;background:#ddd;border-radius:4px;overflow:hidden;margin-bottom:12px;display:flex}
.all span{display:block;height:100%}
table{border-collapse:collapse;width:100%;background:#fff;margin-bottom:14px}
th,td{border-bottom:1px solid #eee;padding:4px 8px;text-align:left;vertical-align:middle;font-size:13px}
th{background:#eee;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{width:160px;height:10px;background:#e4e4ec;border-radius:5px;overflow:hidden;display:inline-block;
vertical-align:middle}.bar span{display:block;height:100%;background:#285ab4}
.thumb{height:48px;max-width:96px;display:block}.err{color:#be2828;white-space:pre-wrap;max-width:520px}
h2{font-size:15px;margin:14px 0 6px}.muted{color:#888}.waiting{padding:18px;color:#a87800}
.badge{font-weight:600}
</style></head><body>
<header><h1>batchstyle <span id="folder"></span></h1><div class="sub" id="run"></div></header>
<main>
<div class="waiting" id="waiting" hidden></div>
<div class="counts" id="counts"></div>
<div class="all" id="all"></div>
<h2>Devices</h2>
<table id="workers"><thead><tr><th>slot</th><th>device</th><th>state</th><th>rows</th><th>it/s</th>
<th>rows settled</th><th>for</th><th>detail</th></tr></thead><tbody></tbody></table>
<div id="failures-box" hidden><h2>Failures</h2><table id="failures"><thead><tr><th>row</th><th>output</th>
<th>error</th></tr></thead><tbody></tbody></table></div>
<h2>Rows <span class="muted" id="shown"></span></h2>
<table id="rows"><thead><tr><th>row</th><th>status</th><th></th><th>output</th><th>progress</th>
<th>ETA / seconds</th><th>device</th><th>loss</th></tr></thead><tbody></tbody></table>
</main>
<script>
"use strict";
const STATUSES = ["running", "failed", "done", "pending"];
let filter = null;
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text; return e; };
const secs = s => { if (s === null || s === undefined || !isFinite(s)) return "";
  s = Math.round(s); if (s < 60) return s + " s"; if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min"; };
const when = t => t ? new Date(t * 1000).toLocaleTimeString() : "";
function cells(tr, values) {
  while (tr.children.length < values.length) tr.appendChild(el("td"));
  values.forEach((v, i) => { const td = tr.children[i];
    if (v instanceof Node) { if (td.firstChild !== v) { td.replaceChildren(v); } }
    else if (td.textContent !== String(v ?? "")) td.textContent = v ?? ""; });
}
function keyed(tbody, items, key, fill) {
  const old = new Map([...tbody.children].map(tr => [tr.dataset.key, tr]));
  items.forEach(item => { const k = key(item); let tr = old.get(k);
    if (!tr) { tr = el("tr"); tr.dataset.key = k; } old.delete(k); fill(tr, item); tbody.appendChild(tr); });
  old.forEach(tr => tr.remove());
}
function progressCell(tr, r) {
  let box = tr.querySelector(".bar");
  if (r.status !== "running" || r.progress === null || r.progress === undefined) return r.status === "done" ? "" : "";
  if (!box) { box = el("span", "bar"); box.appendChild(el("span")); }
  box.firstChild.style.width = (100 * r.progress).toFixed(1) + "%";
  const wrap = el("span"); wrap.appendChild(box);
  wrap.appendChild(document.createTextNode(" " + r.done_units + "/" + r.total_units + " " + r.unit));
  return wrap;
}
function thumbCell(tr, r) {
  if (!r.thumb) return "";
  let img = tr.querySelector("img.thumb");
  if (!img) { img = el("img", "thumb"); img.alt = r.output; }
  if (img.getAttribute("src") !== r.thumb) img.setAttribute("src", r.thumb);
  let a = img.parentNode && img.parentNode.tagName === "A" ? img.parentNode : el("a");
  a.href = r.file; a.target = "_blank"; if (img.parentNode !== a) a.appendChild(img); return a;
}
// A row refused before work has no output yet; the ledger keeps it under a placeholder name.
const shownOutput = r => r.output.startsWith(".invalid-row") ? "(refused before work)" : r.output;
function render(s) {
  const waiting = document.getElementById("waiting");
  waiting.hidden = !s.waiting; waiting.textContent = s.waiting || "";
  document.getElementById("folder").textContent = s.folder;
  const run = s.run || {};
  let line = run.id ? "run " + run.id + " started " + when(run.started) : "";
  if (run.model) line += ", model " + run.model;
  const outcome = Object.entries(run.outcome || {}).map(([k, v]) => k + " " + v).join(", ");
  if (run.id) line += run.finished ? ", ended " + when(run.finished) + (outcome ? " (" + outcome + ")" : "")
    : ", running for " + secs(s.now - run.started);
  if (s.workers_replaced) line += "; workers replaced " + s.workers_replaced + " (hung " + s.stalls_killed + ")";
  const runBox = document.getElementById("run"); runBox.replaceChildren(document.createTextNode(line));
  if (s.report) { runBox.appendChild(document.createTextNode(" · ")); const a = el("a", null, "report.html");
    a.href = "/file?path=report.html"; a.style.color = "#cdf"; runBox.appendChild(a); }
  const counts = document.getElementById("counts"); counts.replaceChildren();
  const all = document.getElementById("all"); all.replaceChildren();
  const colours = {done: "#1e823c", failed: "#be2828", running: "#285ab4", pending: "#ddd"};
  STATUSES.forEach(st => { const n = s.counts[st] || 0;
    const box = el("div", "count s-" + st + (filter === st ? " on" : "")); box.id = "count-" + st;
    box.appendChild(el("b", null, n)); box.appendChild(document.createTextNode(st));
    box.onclick = () => { filter = filter === st ? null : st; render(s); }; counts.appendChild(box);
    if (s.total) { const part = el("span"); part.style.width = (100 * n / s.total) + "%";
      part.style.background = colours[st]; all.appendChild(part); } });
  keyed(document.querySelector("#workers tbody"), s.workers, w => String(w.slot), (tr, w) => {
    tr.dataset.state = w.state;
    cells(tr, [w.slot, w.device, w.state, w.rows || "", w.rate ? w.rate.toFixed(2) : "", w.rows_done,
      w.since ? secs(s.now - w.since) : "", w.detail || ""]); });
  const failed = s.rows.filter(r => r.status === "failed");
  document.getElementById("failures-box").hidden = !failed.length;
  keyed(document.querySelector("#failures tbody"), failed, r => r.output, (tr, r) => {
    cells(tr, [r.row ?? "", shownOutput(r), r.error || ""]); tr.children[2].className = "err"; });
  const rows = s.rows.filter(r => !filter || r.status === filter);
  const listed = filter ? (s.counts[filter] || 0) : s.total;
  document.getElementById("shown").textContent = rows.length < listed
    ? "(" + rows.length + " of " + listed + " listed)" : "";
  keyed(document.querySelector("#rows tbody"), rows, r => r.output, (tr, r) => {
    tr.dataset.output = r.output; tr.dataset.status = r.status;
    const known = v => v !== null && v !== undefined;
    const timing = r.status === "running" ? (known(r.eta) ? "about " + secs(r.eta) + " left" : "")
      : known(r.seconds) ? r.seconds.toFixed(1) + " s" : "";
    cells(tr, [r.row ?? "", r.status, thumbCell(tr, r), shownOutput(r), progressCell(tr, r), timing, r.device || "",
      r.total_loss !== null && r.total_loss !== undefined ? r.total_loss.toPrecision(4) : ""]);
    tr.children[1].className = "badge s-" + r.status; tr.children[0].className = "num"; });
}
async function poll() {
  try { const answer = await fetch("/state.json", {cache: "no-store"}); if (answer.ok) render(await answer.json()); }
  catch (e) { document.getElementById("waiting").hidden = false;
    document.getElementById("waiting").textContent = "the server does not answer (the run ended?); retrying"; }
  setTimeout(poll, 1000);
}
poll();
</script></body></html>
"""
