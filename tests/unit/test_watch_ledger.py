"""File stability, back-off and the ledger, with an injected clock."""

from __future__ import annotations

import os

from monitor.intake.events import FileEvent
from monitor.intake.files import FileTracker, matches, scan
from monitor.intake.ledger import Ledger
from monitor.records import FrameKey


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_file_read_only_after_size_is_stable(tmp_path):
    clock = Clock()
    tr = FileTracker(stable_s=1.0, deadline_s=100, clock=clock)
    p = tmp_path / "a.tif"
    p.write_bytes(b"x" * 10)
    tr.see(p)
    assert tr.ready() == []
    clock.t = 0.5
    p.write_bytes(b"x" * 20)  # still growing
    assert tr.ready() == []
    clock.t = 1.2
    assert tr.ready() == []  # stability restarted at 0.5
    clock.t = 1.6
    assert tr.ready() == [p]


def test_backoff_then_give_up_at_deadline(tmp_path):
    clock = Clock()
    tr = FileTracker(stable_s=0, deadline_s=10, clock=clock)
    p = tmp_path / "a.tif"
    p.write_bytes(b"x")
    tr.see(p)
    ev = FileEvent("not_ready", (str(p),), "truncated")
    assert tr.ready() == [p]
    assert tr.not_ready(ev) is None
    assert tr.ready() == []  # backing off
    clock.t = 1.1
    assert tr.ready() == [p]
    clock.t = 11
    gave_up = tr.not_ready(ev)
    assert gave_up == FileEvent("bad", (str(p),), "still unreadable after 10s: truncated")
    assert p not in tr


def test_deleted_file_is_forgotten(tmp_path):
    tr = FileTracker(0, 10, Clock())
    p = tmp_path / "a.tif"
    p.write_bytes(b"x")
    tr.see(p)
    p.unlink()
    assert tr.ready() == [] and len(tr) == 0


def test_patterns_and_scan(tmp_path):
    (tmp_path / "sub").mkdir()
    for n in ("b.tif", "a.TIF", ".hidden.tif", "sub/c.png", "notes.txt"):
        (tmp_path / n).write_bytes(b"x")
    assert [p.name for p in scan(tmp_path, ["*.tif", "*.png"])] == ["a.TIF", "b.tif", "c.png"]
    assert not matches(tmp_path / "x.tif.part", ["*.tif"])


def test_ledger_knows_finished_files_until_they_change(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    p = tmp_path / "f.tif"
    p.write_bytes(b"abc")
    key = FrameKey("e", "A1", "1", 3)
    assert not led.is_known(p)
    led.mark_files([p], "read", key)
    assert not led.is_known(p) and not led.frame_done(key)
    led.mark_frame(key, [p], "done")
    assert led.is_known(p) and led.frame_done(key)
    p.write_bytes(b"abcd")  # rewritten by the instrument
    assert not led.is_known(p)
    assert led.counts()["frames_done"] == 1
    led.close()
    # durable across reopen, in WAL mode
    led2 = Ledger(tmp_path / "l.sqlite")
    assert led2.frame_done(key)
    assert led2._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    led2.close()
    assert os.path.exists(tmp_path / "l.sqlite")


def test_a_ledger_written_by_an_earlier_version_opens_and_migrates(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "l.sqlite")
    db.executescript("""
        CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, status TEXT NOT NULL,
                            frame TEXT, error TEXT, updated REAL NOT NULL);
        CREATE TABLE frames (frame TEXT PRIMARY KEY, status TEXT NOT NULL, error TEXT, updated REAL NOT NULL);
        INSERT INTO frames VALUES ('e/A1/1/t1', 'done', NULL, 0);
    """)
    db.commit()
    db.close()
    led = Ledger(tmp_path / "l.sqlite")
    key = FrameKey("e", "A1", "1", 2)
    p = tmp_path / "f.tif"
    p.write_bytes(b"x")
    led.mark_processing(key, [p])
    led.mark_processing(key, [p])
    assert [(s.key, s.attempts) for s in led.stale_frames()] == [("e/A1/1/t2", 2)]
    assert led.frame_done(FrameKey("e", "A1", "1", 1))
    led.close()


def test_non_utf8_and_control_characters_in_names_are_stored_and_found(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"bad\xffname\n_A1_t1.tif")
    with open(raw, "wb") as f:
        f.write(b"x")
    p = tmp_path / os.fsdecode(b"bad\xffname\n_A1_t1.tif")
    led = Ledger(tmp_path / "l.sqlite")
    led.mark_files([p], "quarantined", None, "not a TIFF")
    assert led.is_known(p)
    (stored,) = led._db.execute("SELECT path FROM files").fetchone()
    assert stored.endswith("bad\\xffname\\x0a_A1_t1.tif")
    led.close()
