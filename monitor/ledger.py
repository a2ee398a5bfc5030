"""Durable record of what has been processed: SQLite in WAL mode.

Every input file is recorded with its size and mtime. A frame is marked done
only after every sink has written it, so a crash between processing and the
commit reprocesses the frame on restart; the CSV sink ignores keys it already
holds, so each frame is recorded exactly once. At start-up the service
rescans the watch folder and queues every file the ledger does not know (or
whose size/mtime changed), which covers everything that arrived while it was
down.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from monitor.records import FrameKey

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    status TEXT NOT NULL,          -- read | done | quarantined
    frame TEXT,
    error TEXT,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS frames (
    frame TEXT PRIMARY KEY,
    status TEXT NOT NULL,          -- done | failed
    error TEXT,
    updated REAL NOT NULL
);
"""


class Ledger:
    """Thread-safe (one connection behind a lock; the worker is the only writer)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _stat(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    def is_known(self, path: Path) -> bool:
        """True when the file was finished (done or quarantined) with its current size and mtime."""
        try:
            size, mtime = self._stat(path)
        except OSError:
            return False
        with self._lock:
            row = self._db.execute("SELECT size, mtime_ns, status FROM files WHERE path = ?", (str(path),)).fetchone()
        return row is not None and row[2] in ("done", "quarantined") and row[0] == size and row[1] == mtime

    def frame_done(self, key: FrameKey) -> bool:
        with self._lock:
            row = self._db.execute("SELECT status FROM frames WHERE frame = ?", (str(key),)).fetchone()
        return row is not None and row[0] == "done"

    def mark_files(self, paths: Iterable[Path], status: str, frame: FrameKey | None = None, error: str | None = None) -> None:
        rows = []
        now = time.time()
        for p in paths:
            try:
                size, mtime = self._stat(Path(p))
            except OSError:
                size, mtime = -1, -1
            rows.append((str(p), size, mtime, status, str(frame) if frame else None, error, now))
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?)", rows)
            self._db.execute("COMMIT")

    def mark_frame(self, key: FrameKey, sources: Iterable[Path], status: str = "done", error: str | None = None) -> None:
        """Atomically mark a frame and its files."""
        now = time.time()
        rows = []
        for p in sources:
            try:
                size, mtime = self._stat(Path(p))
            except OSError:
                size, mtime = -1, -1
            rows.append((str(p), size, mtime, "done" if status == "done" else "quarantined", str(key), error, now))
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO frames VALUES (?,?,?,?)", (str(key), status, error, now))
            self._db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?)", rows)
            self._db.execute("COMMIT")

    def counts(self) -> dict[str, int]:
        with self._lock:
            files = dict(self._db.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
            frames = dict(self._db.execute("SELECT status, COUNT(*) FROM frames GROUP BY status").fetchall())
        return {**{f"files_{k}": v for k, v in files.items()}, **{f"frames_{k}": v for k, v in frames.items()}}
