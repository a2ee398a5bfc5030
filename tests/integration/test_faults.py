"""The service under faults: frames that hang or crash the worker, a record of truth that
cannot be written, torn rows, odd names, unconfigured channels, a second instance."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
from fixtures.faultkit import csv_rows, fault_service, frame_keys, run_idle
from fixtures.service import blobs, drop
from fixtures.waiting import TIMEOUT_S, wait_for
from prometheus_client import generate_latest

from monitor.errors import StateWriteError, Unavailable
from monitor.records import FrameKey


def ledger_rows(svc, sql, *args):
    with svc.recorder.ledger._lock:
        return svc.recorder.ledger._db.execute(sql, args).fetchall()


def sample(svc, name, **labels):
    return svc.metrics.registry.get_sample_value(name, labels)


# ---- frames that hang or crash the worker ---------------------------------------------

def test_frame_left_processing_by_a_dead_run_is_retried_then_quarantined(tmp_path, caplog):
    svc = fault_service(tmp_path)
    p = drop(svc.settings.watch_dir, "A1_t1_phase.npy", blobs(2, 0.3))
    drop(svc.settings.watch_dir, "A1_t2_phase.npy", blobs(3, 0.3))
    key = FrameKey("test", "A1", "1", 1)
    svc.recorder.ledger.mark_processing(key, [p])  # a run died during this frame (SIGKILL, OOM kill, segfault)
    svc.close()

    svc = fault_service(tmp_path)
    run_idle(svc)  # attempt 2 succeeds: a kill at a random moment costs no frame
    svc.close()
    assert frame_keys(csv_rows(tmp_path)) == [("A1", "1"), ("A1", "2")]
    assert any("processing it again, alone (attempt 2 of 3)" in r.getMessage() for r in caplog.records)

    # a frame that takes down three runs in a row: quarantined, never retried forever
    p3 = drop(svc.settings.watch_dir, "A1_t3_phase.npy", blobs(2, 0.3))
    k3 = FrameKey("test", "A1", "1", 3)
    svc = fault_service(tmp_path)
    for _ in range(3):
        svc.recorder.ledger.mark_processing(k3, [p3])
    svc.close()
    caplog.clear()
    svc = fault_service(tmp_path)
    run_idle(svc)
    status = ledger_rows(svc, "SELECT status FROM frames WHERE frame = ?", str(k3))
    svc.close()
    assert status == [("failed",)]
    assert frame_keys(csv_rows(tmp_path)) == [("A1", "1"), ("A1", "2")]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lines) == 1 and "A1_t3_phase.npy" in lines[0] and "hung or crashed the worker in a previous run (3 attempts)" in lines[0]
    q = (tmp_path / "state" / "quarantine.csv").read_text().splitlines()
    assert len(q) == 2 and "A1_t3_phase.npy" in q[1]


class SlowSegmenter:
    """Hangs on frames whose primary image is all zeros (a stand-in for a hanging stage) until
    ``released()`` is true (at most ``cap_s``), then segments as usual."""

    name = "slow"

    def __init__(self, released, cap_s: float = TIMEOUT_S):
        from monitor.testing import DiscSegmenter

        self.released = released
        self.cap_s = cap_s
        self.inner = DiscSegmenter()

    def segment(self, frame):
        if not np.any(frame.image):
            t0 = time.monotonic()
            while not self.released() and time.monotonic() - t0 < self.cap_s:
                time.sleep(0.02)
        return self.inner.segment(frame)


@pytest.mark.parametrize("frames_per_call", [1, 8])
def test_frame_over_the_time_limit_is_logged_counted_and_not_retried(tmp_path, caplog, frames_per_call):
    """One frame per call: the guard names and quarantines it. Frames sharing a call: which one
    is slow cannot be told, so none is quarantined for it and both finish and are counted."""

    def guard_acted() -> bool:  # what is asserted: the guard's count and its line (written by the guard thread)
        return bool(sample(svc, "cellmonitor_frames_total", result="over_time_limit")) and any(
            "frame_timeout_s" in r.getMessage() for r in list(caplog.records))

    # the stage runs until the guard has acted (a fixed 1 s let a guard thread scheduled late on a
    # loaded machine find the frame finished, and count nothing)
    # stable_s = 0: both files (seen by the start-up scan) are due in the first step, so with 8 frames
    # per call they do share one call; with 0.05 s each became due when its own clock ran out, and a
    # step between the two (a slow ledger look-up on a loaded machine) processed t1 alone
    svc = fault_service(tmp_path, service={"frame_timeout_s": 0.2, "stable_s": 0.0}, segmenter=SlowSegmenter(guard_acted))
    svc.pipeline.frames_per_call = frames_per_call
    drop(svc.settings.watch_dir, "A1_t1_phase.npy", np.zeros((64, 64), np.float32))
    drop(svc.settings.watch_dir, "A1_t2_phase.npy", blobs(3, 0.3))
    run_idle(svc)
    over = sample(svc, "cellmonitor_frames_total", result="over_time_limit")
    svc.close()
    assert over == 1.0
    lines = [r.getMessage() for r in caplog.records if "frame_timeout_s" in r.getMessage()]
    assert len(lines) == 1 and "still processing after" in lines[0]
    if frames_per_call == 1:
        assert "A1_t1_phase.npy" in lines[0]
    else:
        assert "processed together" in lines[0] and "none is blamed" in lines[0]
        assert not (tmp_path / "state" / "quarantine.csv").exists()
        assert frame_keys(csv_rows(tmp_path)) == [("A1", "1"), ("A1", "2")]


def test_frame_marked_hung_is_quarantined_at_start(tmp_path):
    svc = fault_service(tmp_path)
    p = drop(svc.settings.watch_dir, "A1_t1_phase.npy", blobs(2, 0.3))
    key = FrameKey("test", "A1", "1", 1)
    svc.recorder.ledger.mark_processing(key, [p])
    svc.recorder.ledger.mark_frame(key, [p], "hung", "over the limit")  # what the guard writes before exit 75
    svc.close()
    svc = fault_service(tmp_path)
    run_idle(svc)
    svc.close()
    assert csv_rows(tmp_path) == []
    assert "ran past service.frame_timeout_s" in (tmp_path / "state" / "quarantine.csv").read_text()


def test_empty_and_constant_fields_are_zero_cells(tmp_path):
    svc = fault_service(tmp_path)
    drop(svc.settings.watch_dir, "A1_t1_phase.npy", np.zeros((64, 64), np.float32))
    drop(svc.settings.watch_dir, "A1_t2_phase.npy", np.full((64, 64), 0.8, np.float32))
    run_idle(svc)
    svc.close()
    rows = csv_rows(tmp_path)
    assert [(r["timepoint"], r["n_cells"]) for r in rows] == [("1", "0"), ("2", "0")]


# ---- the record of truth fails safe --------------------------------------------------

def test_disk_full_on_the_csv_stops_cleanly_and_loses_nothing(tmp_path, monkeypatch):
    import cellmonitor_plugins.sinks.csv as csvmod

    svc = fault_service(tmp_path)
    for t in range(1, 6):
        drop(svc.settings.watch_dir, f"A1_t{t}_phase.npy", blobs(t % 3 + 1, 0.3))
    real_write = os.write
    writes = {"n": 0}

    def full_disk(fd, data):  # the third row: half of it reaches the disk, then ENOSPC
        writes["n"] += 1
        if writes["n"] >= 3:
            real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(csvmod.os, "write", full_disk)
    with pytest.raises(StateWriteError) as e:
        run_idle(svc)
    svc.close()
    assert e.value.exit_status == 74 and "No space left on device" in str(e.value)
    text = (tmp_path / "state" / "counts.csv").read_bytes()
    assert text.endswith(b"\n") and len(csv_rows(tmp_path)) == 2  # no torn line, nothing half-written
    assert not (tmp_path / "state" / "quarantine.csv").exists()  # nothing quarantined as 'late'
    monkeypatch.setattr(csvmod.os, "write", real_write)  # space returns
    svc = fault_service(tmp_path)
    run_idle(svc)
    svc.close()
    assert frame_keys(csv_rows(tmp_path)) == [("A1", str(t)) for t in range(1, 6)]


def test_disk_full_on_the_ledger_stops_cleanly(tmp_path, monkeypatch):
    from monitor.intake.ledger import Ledger

    svc = fault_service(tmp_path)
    for t in range(1, 4):
        drop(svc.settings.watch_dir, f"A1_t{t}_phase.npy", blobs(2, 0.3))
    real = Ledger.mark_counted
    calls = {"n": 0}

    def full(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            import sqlite3

            with self._tx() as db:  # the commit fails the way SQLite reports a full disk
                db.execute("SELECT 1")
                raise sqlite3.OperationalError("database or disk is full")
        return real(self, *a, **k)

    monkeypatch.setattr(Ledger, "mark_counted", full)
    with pytest.raises(StateWriteError) as e:
        run_idle(svc)
    svc.close()
    assert "database or disk is full" in str(e.value) and e.value.exit_status == 74
    monkeypatch.setattr(Ledger, "mark_counted", real)
    svc = fault_service(tmp_path)
    run_idle(svc)
    svc.close()
    # the CSV had t2 before the ledger failed: recorded once, never doubled
    assert frame_keys(csv_rows(tmp_path)) == [("A1", "1"), ("A1", "2"), ("A1", "3")]


def _can_mount_tmpfs(path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_real_disk_full_under_the_state_folder(tmp_path):
    """A real 8 MB tmpfs as the state folder, filled up: clean stop; nothing lost or doubled after space returns."""
    state = tmp_path / "state"
    if not _can_mount_tmpfs(state):
        pytest.skip("needs root and tmpfs to mount a tiny file system")
    try:
        svc = fault_service(tmp_path)
        for t in range(1, 41):
            drop(svc.settings.watch_dir, f"A1_t{t}_phase.npy", blobs(t % 4 + 1, 0.3))
        run_idle(svc)
        svc.close()
        n_before = len(csv_rows(tmp_path))
        assert n_before == 40
        for t in range(41, 81):
            drop(svc.settings.watch_dir, f"A1_t{t}_phase.npy", blobs(t % 4 + 1, 0.3))
        filler = state / "filler"

        def fill() -> None:
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:  # fill the file system to the last block
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)

        svc = fault_service(tmp_path)  # running when the disk fills up
        fill()
        with pytest.raises(StateWriteError) as e:
            run_idle(svc)
        svc.close()
        assert e.value.exit_status == 74
        assert (state / "counts.csv").read_bytes().endswith(b"\n")
        assert 40 <= len(csv_rows(tmp_path)) < 80  # stopped part-way
        fill()
        with pytest.raises(StateWriteError):  # starting on a full disk: the same clean one-line stop
            fault_service(tmp_path).close()
        filler.unlink()  # space returns
        svc = fault_service(tmp_path)
        run_idle(svc)
        svc.close()
        assert frame_keys(csv_rows(tmp_path)) == sorted(("A1", str(t)) for t in range(1, 81))
        import sqlite3

        db = sqlite3.connect(state / "ledger.sqlite")
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT COUNT(*) FROM frames WHERE status = 'done'").fetchone() == (80,)
        db.close()
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


def test_torn_last_row_is_cut_with_one_warning_and_its_frame_redone(tmp_path, caplog):
    svc = fault_service(tmp_path)
    drop(svc.settings.watch_dir, "A1_t1_phase.npy", blobs(2, 0.3))
    run_idle(svc)
    svc.close()
    path = tmp_path / "state" / "counts.csv"
    good = path.read_bytes()
    torn_row = good.splitlines()[1][:25]
    path.write_bytes(good + torn_row)  # killed in the middle of writing t2's row (the ledger never marked t2)
    drop(svc.settings.watch_dir, "A1_t2_phase.npy", blobs(3, 0.3))
    caplog.clear()
    svc = fault_service(tmp_path)
    run_idle(svc)
    svc.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "incomplete" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0]
    assert frame_keys(csv_rows(tmp_path)) == [("A1", "1"), ("A1", "2")]
    assert all(line.count(b",") == good.splitlines()[0].count(b",") for line in path.read_bytes().splitlines())


# ---- odd inputs ------------------------------------------------------------------------

def test_non_utf8_file_names_neither_crash_the_ledger_nor_the_metrics(tmp_path, caplog):
    svc = fault_service(tmp_path)
    watch = os.fsencode(svc.settings.watch_dir)
    for raw, arr in ((b"A\xff1_t1_phase.npy", blobs(2, 0.3)), (b"bad\xffname_A1_t1_phase.npy", blobs(2, 0.3))):
        with open(os.path.join(watch, raw), "wb") as f:
            np.save(f, arr)
    drop(svc.settings.watch_dir, "A2_t1_phase.npy", blobs(3, 0.3))
    run_idle(svc)
    text = generate_latest(svc.metrics.registry).decode()
    files = ledger_rows(svc, "SELECT path, status FROM files ORDER BY path")
    svc.close()
    assert [(os.path.basename(p), s) for p, s in files] == [
        ("A2_t1_phase.npy", "done"), ("A\\xff1_t1_phase.npy", "done"), ("bad\\xffname_A1_t1_phase.npy", "done")]
    rows = csv_rows(tmp_path)
    assert sorted(r["well"] for r in rows) == ["A2", "A\\xff1", "bad\\xffname"]
    assert 'well="A\\\\xff1"' in text or 'well="A\\xff1"' in text
    # a restart reads neither again (the ledger found them by the same text)
    caplog.clear()
    svc = fault_service(tmp_path)
    run_idle(svc)
    svc.close()
    assert len(csv_rows(tmp_path)) == 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_unconfigured_channel_is_skipped_once_and_never_read_again(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    asm = {"channels": ["phase", "apo15"], "wait_s": 0.2}
    svc = fault_service(tmp_path, assembly=asm)
    drop(svc.settings.watch_dir, "A1_t1_dapi.npy", blobs(2, 0.3))
    drop(svc.settings.watch_dir, "A1_t1_phase.npy", blobs(2, 0.3))
    drop(svc.settings.watch_dir, "A1_t1_apo15.npy", blobs(1, 0.9))
    run_idle(svc)
    skipped = sample(svc, "cellmonitor_files_total", result="skipped")
    status = ledger_rows(svc, "SELECT status, error FROM files WHERE path LIKE '%dapi%'")
    svc.close()
    assert skipped == 1.0
    assert status == [("skipped", "channel 'dapi' is not in assembly.channels")]
    assert len([r for r in caplog.records if "A1_t1_dapi.npy: skipped" in r.getMessage()]) == 1
    caplog.clear()
    svc = fault_service(tmp_path, assembly=asm)
    run_idle(svc)
    read = sample(svc, "cellmonitor_files_total", result="read")
    svc.close()
    assert read is None  # nothing decoded again after a restart
    assert not [r for r in caplog.records if "dapi" in r.getMessage()]


def test_file_first_found_not_ready_gets_one_info_line(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    svc = fault_service(tmp_path, service={"ready_deadline_s": 0.6})
    full = tmp_path / "full.npy"
    np.save(full, blobs(3, 0.3))
    (svc.settings.watch_dir / "A1_t1_phase.npy").write_bytes(full.read_bytes()[:60])  # never completed
    run_idle(svc)
    svc.close()
    waiting = [r for r in caplog.records if "waiting up to 1 s" in r.getMessage()]
    assert len(waiting) == 1 and waiting[0].levelno == logging.INFO and "A1_t1_phase.npy" in waiting[0].getMessage()
    assert "still unreadable after" in (tmp_path / "state" / "quarantine.csv").read_text()


def test_error_while_assembling_channels_quarantines_the_frame_not_the_service(tmp_path):
    svc = fault_service(tmp_path, assembly={"channels": ["phase", "apo15"], "wait_s": 30})
    drop(svc.settings.watch_dir, "A1_t1_phase.npy", blobs(2, 0.3))
    drop(svc.settings.watch_dir, "A1_t1_apo15.npy", np.zeros((7,), np.float32))  # cannot be put on the phase grid
    drop(svc.settings.watch_dir, "A1_t2_phase.npy", blobs(3, 0.3))
    drop(svc.settings.watch_dir, "A1_t2_apo15.npy", np.zeros((128, 128), np.float32))
    run_idle(svc)
    svc.close()
    assert frame_keys(csv_rows(tmp_path)) == [("A1", "2")]
    q = (tmp_path / "state" / "quarantine.csv").read_text()
    assert "A1_t1_phase.npy" in q and "A1_t1_apo15.npy" in q


# ---- operators --------------------------------------------------------------------------

def test_second_instance_on_the_same_state_folder_exits_69_naming_the_pid(tmp_path):
    svc = fault_service(tmp_path)
    with pytest.raises(Unavailable) as e:
        fault_service(tmp_path)
    assert e.value.exit_status == 69 and f"(pid {os.getpid()})" in str(e.value) and "in use by another cellmonitor" in str(e.value)
    svc.close()
    fault_service(tmp_path).close()  # released on close


def test_gauges_are_restored_from_the_record_of_truth_at_start(tmp_path):
    svc = fault_service(tmp_path)
    drop(svc.settings.watch_dir, "A1_t1_phase.npy", blobs(2, 0.3))
    drop(svc.settings.watch_dir, "A1_t2_phase.npy", blobs(3, 0.9))
    drop(svc.settings.watch_dir, "B2_t1_phase.npy", blobs(4, 0.3))
    run_idle(svc)
    svc.close()
    svc = fault_service(tmp_path)  # fresh registry, no frame processed yet
    got = {w: (sample(svc, "cellmonitor_latest_cells", instrument="test", experiment="test", well=w, state=s),
               sample(svc, "cellmonitor_latest_timepoint", instrument="test", experiment="test", well=w))
           for w, s in (("A1", "dead"), ("B2", "live"))}
    svc.close()
    assert got == {"A1": (3.0, 2.0), "B2": (4.0, 1.0)}


def test_class_roles_map_lab_classes_to_canonical_states(tmp_path):
    classes = ("Living Cell", "Dead Cell")
    roles = {"living cell": "live", "Dead Cell": "dead"}
    svc = fault_service(tmp_path, classes=classes, classifier={"roles": roles})
    drop(svc.settings.watch_dir, "A1_t1_phase.npy", blobs(2, 0.9))
    run_idle(svc)
    dead = sample(svc, "cellmonitor_state_fraction", instrument="test", experiment="test", well="A1", state="dead")
    other = sample(svc, "cellmonitor_state_fraction", instrument="test", experiment="test", well="A1", state="Dead Cell")
    states = ledger_rows(svc, "SELECT class, state, count FROM timepoint_states ORDER BY class")
    svc.close()
    assert dead == 1.0 and other is None
    (row,) = csv_rows(tmp_path)
    assert row["n_Dead Cell"] == "2" and row["state_dead"] == "2" and row["state_live"] == "0"  # the CSV keeps both
    assert states == [("Dead Cell", "dead", 2), ("Living Cell", "live", 0)]
    # without roles, names that are not canonical states are 'other'; canonical ones map to themselves
    from monitor.service.rows import class_roles

    assert class_roles(["Live", "DEAD", "Debris"]) == {"Live": "live", "DEAD": "dead", "Debris": "other"}


def test_roles_naming_an_unknown_class_is_a_config_error(tmp_path):
    from monitor.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        fault_service(tmp_path, classifier={"roles": {"Zombie": "dead"}})
    assert "classifier.roles" in str(e.value) and "'Zombie'" in str(e.value) and e.value.exit_status == 78


def test_errors_counter_covers_every_file_that_did_not_become_a_count(tmp_path):
    svc = fault_service(tmp_path, assembly={"channels": ["phase", "apo15"], "wait_s": 0.1})
    w = svc.settings.watch_dir
    (w / "A1_t1_phase.npy").write_bytes(b"not an array at all")  # quarantined (read)
    drop(w, "A1_t2_dapi.npy", blobs(1, 0.3))  # skipped (channel)
    drop(w, "A1_t3_apo15.npy", blobs(1, 0.3))  # dropped (no primary) -> quarantined
    drop(w, "A1_t4_phase.npy", blobs(1, 0.3))  # counted (released incomplete)
    run_idle(svc)
    q = sample(svc, "cellmonitor_files_total", result="quarantined")
    s = sample(svc, "cellmonitor_files_total", result="skipped")
    svc.close()
    assert (q, s) == (2.0, 1.0)
    assert frame_keys(csv_rows(tmp_path)) == [("A1", "4")]


def test_dashboard_errors_panel_sums_quarantined_and_skipped_files():
    import json
    from pathlib import Path

    dash = json.loads((Path(__file__).resolve().parents[2] / "config/grafana/dashboards/cellmonitor.json").read_text())
    (panel,) = [p for p in dash["panels"] if "not counted" in p["title"]]
    expr = panel["targets"][0]["expr"]
    assert "cellmonitor_files_total" in expr and "quarantined" in expr and "skipped" in expr


@pytest.mark.usefixtures("no_thread_leak")
def test_service_threads_stop(tmp_path):
    svc = fault_service(tmp_path)
    stop = threading.Event()
    th = threading.Thread(target=svc.run, args=(stop,), kwargs={"observe": False})
    th.start()
    # stop a service that is running, its guard thread up (a fixed 0.2 s could stop it before it started)
    wait_for(lambda: any(t.name == "cellmonitor-frame-guard" for t in threading.enumerate()), what="the frame guard thread to start")
    stop.set()
    th.join(60)
    svc.close()
    assert not th.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "cellmonitor-frame-guard"]


def test_a_counts_csv_begun_by_an_earlier_version_is_continued_in_its_columns(tmp_path):
    svc = fault_service(tmp_path)
    drop(svc.settings.watch_dir, "A1_t1_phase.npy", blobs(2, 0.3))
    run_idle(svc)
    svc.close()
    path = tmp_path / "state" / "counts.csv"
    import csv as csvmod

    rows = list(csvmod.reader(path.open(newline="")))
    keep = [i for i, c in enumerate(rows[0]) if not c.startswith("state_")]
    with path.open("w", newline="") as f:  # the file as the previous version wrote it
        csvmod.writer(f).writerows([[r[i] for i in keep] for r in rows])
    drop(svc.settings.watch_dir, "A1_t2_phase.npy", blobs(3, 0.3))
    svc = fault_service(tmp_path)
    run_idle(svc)
    svc.close()
    got = csv_rows(tmp_path)
    assert [(r["timepoint"], r["n_cells"]) for r in got] == [("1", "2"), ("2", "3")]
    assert not any(k.startswith("state_") for k in got[0])
