"""The content-addressed target cache on disk: safetensors files, each with a checksum of its tensors, and an SQLite
index of sizes and hits.

A module of its own, torch-free at import, so that `batchstyle cache info` and `cache clear` (light commands) read
the index without importing torch; only reading and writing entries (`get`, `put`) loads it. The keys (what a
target depends on) are made in `batchstyle.model.targets`.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchstyle.images import write_file_atomic

if TYPE_CHECKING:
    import torch


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


class TargetCache:
    """Targets on disk as safetensors, one file per key, each carrying a checksum of its own tensors.

    A file that is truncated, corrupt or fails its checksum is deleted and recomputed, never trusted. An SQLite
    index keeps sizes and hit counts for `batchstyle cache info`.
    """

    def __init__(self, root: Path, shared: str | None = None, warn: Callable[[str], None] = lambda text: None) -> None:
        self.root = Path(root) / "targets"
        # A store URL (`--cache-dir s3://bucket/cache/`): entries missing here are looked for there, and entries
        # made here are put there, so that nodes sharing no folder compute each target once between them. The
        # local folder stays the one read: an entry from the store is fetched into it and checked as any other.
        self.shared = None if shared is None else shared.rstrip("/") + "/targets"
        self.warn = warn
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = sqlite3.connect(self.root / "index.sqlite", timeout=30, isolation_level=None)
        self.index.execute("PRAGMA journal_mode=WAL")
        self.index.execute(
            "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, role TEXT, bytes INTEGER, created REAL, "
            "last_used REAL, hits INTEGER NOT NULL DEFAULT 0)"
        )

    def close(self) -> None:
        self.index.close()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def url(self, key: str) -> str | None:
        """Where the shared tier keeps `key`, laid out as the local folder is."""
        return None if self.shared is None else f"{self.shared}/{key[:2]}/{key}.safetensors"

    def get(self, key: str, share: bool = True) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None on a miss; the shared tier is asked too unless `share` is False (as `put`
        says). A shared tier that cannot be read (StoreError) is a miss too, never the row's failure: the targets
        are computed instead, as without a cache, and the tier is left alone from then on (`_give_up`)."""
        from safetensors import safe_open

        from batchstyle.store import StoreError, fetch

        path = self.path(key)
        url = self.url(key)
        fetched = False
        if not path.is_file() and url is not None and share:
            try:
                fetched = fetch(url, path)
            except StoreError as exc:
                self._give_up(exc)
                return None
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 - safe_open API
            if not tensors or meta.get("sha256") != _tensor_digest(tensors):
                raise ValueError("checksum mismatch")
        except Exception:  # noqa: BLE001 - any unreadable entry is discarded and recomputed
            path.unlink(missing_ok=True)
            self.index.execute("DELETE FROM entries WHERE key = ?", (key,))
            return None
        if fetched:
            self._index(key, meta.get("role", ""), path)
        self.index.execute("UPDATE entries SET hits = hits + 1, last_used = ? WHERE key = ?", (time.time(), key))
        return tensors

    def put(self, key: str, role: str, tensors: dict[str, torch.Tensor], share: bool = True) -> None:
        """The entry written here, and put to the shared tier unless `share` is False (a clip frame's content
        targets: no other row reads them, and a put each would cost every frame a request of megabytes)."""
        import torch
        from safetensors.torch import save

        cpu = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save(cpu, metadata={"sha256": _tensor_digest(cpu), "role": role})
        write_file_atomic(path, lambda handle: handle.write(data))
        self._index(key, role, path)
        url = self.url(key)
        if url is not None and share:
            from batchstyle.store import StoreError, put

            try:
                put(path, url)  # one put: another node finds the entry whole or not at all
            except StoreError as exc:
                self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        """The shared tier left alone for the rest of this process after its first failure: a store that is down
        would otherwise cost every target its retries and the client's timeouts; this node's cache goes on."""
        self.warn(f"the shared target cache is not used from here on ({exc}); targets are kept on this node")
        self.shared = None

    def _index(self, key: str, role: str, path: Path) -> None:
        now = time.time()
        self.index.execute(
            "INSERT OR REPLACE INTO entries (key, role, bytes, created, last_used, hits) VALUES (?, ?, ?, ?, ?, 0)",
            (key, role, path.stat().st_size, now, now),
        )

    def info(self) -> dict[str, Any]:
        rows = self.index.execute(
            "SELECT role, COUNT(*), COALESCE(SUM(bytes), 0), COALESCE(SUM(hits), 0) FROM entries GROUP BY role"
        )
        by_role = {role: {"entries": n, "bytes": size, "hits": hits} for role, n, size, hits in rows}
        return {
            "path": str(self.root),
            "entries": sum(r["entries"] for r in by_role.values()),
            "bytes": sum(r["bytes"] for r in by_role.values()),
            "hits": sum(r["hits"] for r in by_role.values()),
            "by_role": by_role,
        }

    def clear(self) -> int:
        removed = 0
        for path in self.root.glob("*/*.safetensors"):
            path.unlink(missing_ok=True)
            removed += 1
        self.index.execute("DELETE FROM entries")
        return removed
