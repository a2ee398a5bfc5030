"""Durable record of what has been processed: SQLite in WAL mode.

Every input file is recorded with its size and mtime. A frame is marked
``processing`` before the pipeline runs and ``done`` only after every
record-of-truth sink has written it, so a crash between processing and the
commit reprocesses the frame on restart; the CSV sink ignores keys it already
holds, so each frame is recorded exactly once. At start-up the service
rescans the watch folder and queues every file the ledger does not know (or
whose size/mtime changed), which covers everything that arrived while it was
down.

Statuses
--------
files: ``read`` (decoded, waiting for its frame), ``done`` (its frame is
counted), ``quarantined`` (will never become a count), ``skipped`` (not a
frame this configuration counts: an unconfigured channel). ``done``,
``quarantined`` and ``skipped`` are final: the file is not read again unless
its size or mtime changes.

frames: ``pending`` (taken once, released unrecorded on a clean stop), ``processing`` (the worker took it; a frame still ``processing`` at
start-up was in flight when the previous run died), ``done``, ``failed``,
``hung`` (over ``frame_timeout_s``). ``attempts`` counts how often a frame
was taken.

Per-timepoint counts are kept in ``timepoints`` and ``timepoint_states``,
written in the same transaction that marks the frame done: a queryable time
course by acquisition time (Grafana's SQLite datasource reads it), which a
catch-up after downtime fills in full.

File names that are not valid UTF-8 (Linux allows any bytes) are stored as
their bytes decoded with backslash escapes (:func:`path_text`), the same
text every log line and CSV shows.

Disk full (or any write error) on the ledger raises
:class:`~monitor.errors.StateWriteError` (exit 74): the service stops
cleanly; SQLite rolls the transaction back, so nothing is half-marked.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.errors import StateWriteError, Unavailable
from monitor.records import Counts, FrameKey

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    status TEXT NOT NULL,          -- read | done | quarantined | skipped
    frame TEXT,
    error TEXT,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS frames (
    frame TEXT PRIMARY KEY,
    status TEXT NOT NULL,          -- pending | processing | done | failed | hung
    error TEXT,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS timepoints (
    experiment TEXT NOT NULL,
    well TEXT NOT NULL,
    field TEXT NOT NULL,
    timepoint INTEGER NOT NULL,
    instrument TEXT NOT NULL,
    time_s REAL NOT NULL,          -- acquisition time (unix s); processing time when the file has none
    time_source TEXT NOT NULL,     -- acquired | processed
    n_cells INTEGER NOT NULL,
    n_uncertain INTEGER NOT NULL,
    control_area_fraction REAL,
    processed_s REAL NOT NULL,
    PRIMARY KEY (experiment, well, field, timepoint)
);
CREATE TABLE IF NOT EXISTS timepoint_states (
    experiment TEXT NOT NULL,
    well TEXT NOT NULL,
    field TEXT NOT NULL,
    timepoint INTEGER NOT NULL,
    class TEXT NOT NULL,           -- the reference index's class name
    state TEXT NOT NULL,           -- canonical: live | apoptotic | necrotic | dead | other
    count INTEGER NOT NULL,
    PRIMARY KEY (experiment, well, field, timepoint, class)
);
CREATE INDEX IF NOT EXISTS timepoints_time ON timepoints (time_s);
"""

FINISHED = ("done", "quarantined", "skipped")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def path_text(path: str | bytes | os.PathLike[str]) -> str:
    """A path as text that any UTF-8 sink accepts, on one line: undecodable bytes and
    control characters become ``\\xNN``."""
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        raw = os.fspath(path).encode("utf-8", "backslashreplace")  # type: ignore[union-attr]
    text = raw.decode("utf-8", "backslashreplace")
    # a newline or other control character in a name must not split a log line or a CSV row
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text) if _CONTROL.search(text) else text


def safe_text(s: str) -> str:
    """Text parsed from a file name (a well, an experiment) made valid UTF-8 the same way."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return path_text(s)


@dataclass(frozen=True)
class Stale:
    """A frame left ``processing`` (or ``hung``) by a previous run."""

    key: str
    status: str
    attempts: int
    paths: tuple[str, ...]


class StateLock:
    """An exclusive ``flock`` on ``<state_dir>/cellmonitor.lock`` holding the owner's pid.

    A second service on the same state folder gets :class:`Unavailable`
    (exit 69) naming the holder's pid. The kernel drops the lock when the
    process dies, so a crash never leaves a stale lock.
    """

    def __init__(self, state_dir: Path):
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "cellmonitor.lock"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise Unavailable(f"{state_dir}: state folder is in use by another cellmonitor (pid {holder})") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Release the state-folder lock."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


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
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            if "attempts" not in {r[1] for r in self._db.execute("PRAGMA table_info(frames)")}:
                self._db.execute("ALTER TABLE frames ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
            rows = self._db.execute("SELECT path, size, mtime_ns FROM files WHERE status IN (?, ?, ?)", FINISHED).fetchall()
        except sqlite3.DatabaseError as e:
            raise StateWriteError(f"{path}: cannot open the ledger ({e})") from None
        self._finished: dict[str, tuple[int, int]] = {p: (size, mtime) for p, size, mtime in rows}

    def close(self) -> None:
        """Close the database (the state-folder lock is :class:`StateLock`'s to release)."""
        with self._lock:
            self._db.close()

    @staticmethod
    def _stat(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a write error rolls back and becomes :class:`StateWriteError`."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise StateWriteError(f"{self.path}: cannot write the ledger ({e})") from None

    def is_known(self, path: Path) -> bool:
        """True when the file was finished (done, quarantined, skipped) with its current size and mtime."""
        known = self._finished.get(path_text(path))
        if known is None:
            return False
        try:
            return self._stat(path) == known
        except OSError:
            return False

    def was_finished(self, path: Path) -> bool:
        """True when the ledger finished this path, whatever its size and mtime now."""
        return path_text(path) in self._finished

    def _frame_status(self, key: FrameKey) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT status FROM frames WHERE frame = ?", (safe_text(str(key)),)).fetchone()
        return None if row is None else str(row[0])

    def frame_done(self, key: FrameKey) -> bool:
        """Whether this frame is recorded (its counts are in the record of truth)."""
        return self._frame_status(key) == "done"

    def _file_rows(self, paths: Iterable[Path], status: str, frame: FrameKey | str | None, error: str | None, now: float) -> list[tuple[Any, ...]]:
        rows = []
        for p in paths:
            try:
                size, mtime = self._stat(Path(p))
            except OSError:
                size, mtime = -1, -1
            rows.append((path_text(p), size, mtime, status, safe_text(str(frame)) if frame else None, error and safe_text(error), now))
        return rows

    def _write(self, rows: list[tuple[Any, ...]], frame_row: tuple[Any, ...] | None = None, counts: tuple[Counts, Mapping[str, str]] | None = None) -> None:
        with self._tx() as db:
            if frame_row is not None:
                db.execute(
                    "INSERT INTO frames (frame, status, error, updated, attempts) VALUES (?,?,?,?,?) "
                    "ON CONFLICT(frame) DO UPDATE SET status=excluded.status, error=excluded.error, "
                    "updated=excluded.updated, attempts=frames.attempts + excluded.attempts",
                    frame_row,
                )
            db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?)", rows)
            if counts is not None:
                _insert_timepoint(db, *counts)
        for path, size, mtime, status, *_ in rows:
            if status in FINISHED:
                self._finished[path] = (size, mtime)
            else:
                self._finished.pop(path, None)

    def mark_files(self, paths: Iterable[Path], status: str, frame: FrameKey | None = None, error: str | None = None) -> None:
        """Record files with a status (``read``, ``done``, ``quarantined``, ``skipped``); raises StateWriteError when the state folder cannot be written."""
        self._write(self._file_rows(paths, status, frame, error, time.time()))

    def mark_processing(self, key: FrameKey, sources: Iterable[Path]) -> None:
        """The worker takes this frame now (``attempts`` + 1); its files stay ``read``."""
        now = time.time()
        self._write(self._file_rows(sources, "read", key, None, now), (safe_text(str(key)), "processing", None, now, 1))

    def release_processing(self, key: FrameKey) -> bool:
        """Undo :meth:`mark_processing` (the frame was not recorded through no fault of its own).

        Best effort, for a clean stop on a full disk: False when even this
        write failed (the frame then counts as one attempt at the next start).
        """
        try:
            with self._tx() as db:
                db.execute("UPDATE frames SET status = 'pending', attempts = MAX(attempts - 1, 0) WHERE frame = ? AND status = 'processing'", (safe_text(str(key)),))
        except StateWriteError:
            return False
        return True

    def mark_frame(self, key: FrameKey | str, sources: Iterable[Path], status: str = "done", error: str | None = None) -> None:
        """Atomically mark a frame (``done``, ``failed`` or ``hung``) and its files."""
        now = time.time()
        rows = self._file_rows(sources, "done" if status == "done" else "quarantined", key, error, now)
        self._write(rows, (safe_text(str(key)), status, error and safe_text(error), now, 0))

    def mark_counted(self, counts: Counts, sources: Iterable[Path], roles: Mapping[str, str]) -> None:
        """Mark the frame done and store its per-timepoint counts, in one transaction."""
        now = time.time()
        rows = self._file_rows(sources, "done", counts.key, None, now)
        self._write(rows, (safe_text(str(counts.key)), "done", None, now, 0), (counts, roles))

    def stale_frames(self) -> list[Stale]:
        """Frames a previous run left ``processing`` or ``hung``, with their files."""
        with self._lock:
            frames = self._db.execute("SELECT frame, status, attempts FROM frames WHERE status IN ('processing', 'hung')").fetchall()
            out = []
            for key, status, attempts in frames:
                paths = tuple(r[0] for r in self._db.execute("SELECT path FROM files WHERE frame = ? ORDER BY path", (key,)))
                out.append(Stale(key, status, int(attempts), paths))
        return out

    def counts(self) -> dict[str, int]:
        """Files per status (for logs and tests)."""
        with self._lock:
            files = dict(self._db.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
            frames = dict(self._db.execute("SELECT status, COUNT(*) FROM frames GROUP BY status").fetchall())
        return {**{f"files_{k}": v for k, v in files.items()}, **{f"frames_{k}": v for k, v in frames.items()}}


def _insert_timepoint(db: sqlite3.Connection, c: Counts, roles: Mapping[str, str]) -> None:
    k = c.key
    exp, well, fld = safe_text(k.experiment), safe_text(k.well), safe_text(k.field)
    now = time.time()
    acquired = c.acquired_at.timestamp() if c.acquired_at is not None else None
    db.execute(
        "INSERT OR REPLACE INTO timepoints VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (exp, well, fld, k.timepoint, safe_text(c.instrument), acquired if acquired is not None else now,
         "acquired" if acquired is not None else "processed", c.n_cells, c.n_uncertain,
         c.control.area_fraction if c.control is not None else None, now),
    )
    db.executemany(
        "INSERT OR REPLACE INTO timepoint_states VALUES (?,?,?,?,?,?,?)",
        [(exp, well, fld, k.timepoint, cls, roles.get(cls, "other"), int(n)) for cls, n in c.counts.items()],
    )
