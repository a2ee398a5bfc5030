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


FINISHED = ("done", "quarantined")


class Ledger:
    """Thread-safe (one connection behind a lock; the worker is the only writer).

    The (size, mtime) of every finished file is also kept in memory, so the
    periodic rescan of a large export folder costs one ``stat`` per file and
    no database query.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        rows = self._db.execute("SELECT path, size, mtime_ns FROM files WHERE status IN (?, ?)", FINISHED).fetchall()
        self._finished: dict[str, tuple[int, int]] = {p: (size, mtime) for p, size, mtime in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _stat(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    def is_known(self, path: Path) -> bool:
        """True when the file was finished (done or quarantined) with its current size and mtime."""
        known = self._finished.get(str(path))
        if known is None:
            return False
        try:
            return self._stat(path) == known
        except OSError:
            return False

    def frame_done(self, key: FrameKey) -> bool:
        with self._lock:
            row = self._db.execute("SELECT status FROM frames WHERE frame = ?", (str(key),)).fetchone()
        return row is not None and row[0] == "done"

    def _file_rows(self, paths: Iterable[Path], status: str, frame: FrameKey | None, error: str | None, now: float) -> list[tuple]:
        rows = []
        for p in paths:
            try:
                size, mtime = self._stat(Path(p))
            except OSError:
                size, mtime = -1, -1
            rows.append((str(p), size, mtime, status, str(frame) if frame else None, error, now))
        return rows

    def _write(self, rows: list[tuple], frame_row: tuple | None = None) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            if frame_row is not None:
                self._db.execute("INSERT OR REPLACE INTO frames VALUES (?,?,?,?)", frame_row)
            self._db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?)", rows)
            self._db.execute("COMMIT")
            for path, size, mtime, status, *_ in rows:
                if status in FINISHED:
                    self._finished[path] = (size, mtime)
                else:
                    self._finished.pop(path, None)

    def mark_files(self, paths: Iterable[Path], status: str, frame: FrameKey | None = None, error: str | None = None) -> None:
        self._write(self._file_rows(paths, status, frame, error, time.time()))

    def mark_frame(self, key: FrameKey, sources: Iterable[Path], status: str = "done", error: str | None = None) -> None:
        """Atomically mark a frame and its files."""
        now = time.time()
        rows = self._file_rows(sources, "done" if status == "done" else "quarantined", key, error, now)
        self._write(rows, (str(key), status, error, now))

    def counts(self) -> dict[str, int]:
        with self._lock:
            files = dict(self._db.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
            frames = dict(self._db.execute("SELECT status, COUNT(*) FROM frames GROUP BY status").fetchall())
        return {**{f"files_{k}": v for k, v in files.items()}, **{f"frames_{k}": v for k, v in frames.items()}}
