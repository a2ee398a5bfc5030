"""The service loop with fake plugins: files dropped into a folder, results read from sinks."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from cellmonitor_plugins.sinks.csv import CsvSink
from fixtures.service import blobs, drop, make_service, run_until
from fixtures.waiting import wait_for


@pytest.mark.usefixtures("no_thread_leak")
def test_files_dropped_while_running_are_counted_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="monitor.service.loop")
    svc, sink = make_service(tmp_path)
    watch = svc.settings.watch_dir

    def feeder():
        # drop them while the service watches (a fixed 0.3 s could drop them before it started)
        wait_for(lambda: any(r.getMessage().startswith("watching ") for r in list(caplog.records)), what="the service to watch its folder")
        drop(watch, "A1_t1_phase.npy", blobs(3, 0.3))
        drop(watch, "A1_t2_phase.npy", blobs(4, 0.9))

    th = threading.Thread(target=feeder)
    th.start()
    run_until(svc, lambda: len(sink.rows) >= 2, what="both frames' rows")
    th.join()
    svc.close()
    by_t = {c.key.timepoint: c for c in sink.rows}
    assert sorted(by_t) == [1, 2]
    assert by_t[1].n_cells == 3 and by_t[1].counts["live"] == 3
    assert by_t[2].n_cells == 4 and by_t[2].counts["dead"] == 4


def test_restart_processes_backlog_and_never_duplicates(tmp_path):
    svc, sink = make_service(tmp_path, sinks=None)
    watch = svc.settings.watch_dir
    drop(watch, "A1_t1_phase.npy", blobs(2, 0.3))
    csv_path = tmp_path / "state" / "counts.csv"
    svc.recorder.sinks = [CsvSink(csv_path), sink]
    svc.run(threading.Event(), until_idle=True, observe=False)
    svc.close()
    # files arrive while the service is down
    drop(watch, "A1_t2_phase.npy", blobs(5, 0.9))
    svc2, sink2 = make_service(tmp_path)
    svc2.recorder.sinks = [CsvSink(csv_path), sink2]
    svc2.run(threading.Event(), until_idle=True, observe=False)
    svc2.close()
    assert [c.key.timepoint for c in sink2.rows] == [2]  # t1 is in the ledger: not redone
    lines = csv_path.read_text().strip().splitlines()
    assert len(lines) == 3  # header + t1 + t2, exactly once each
    assert lines[2].split(",")[3] == "2"


def test_crash_between_csv_and_ledger_does_not_duplicate_rows(tmp_path):
    csv_path = tmp_path / "state" / "counts.csv"
    svc, sink = make_service(tmp_path)
    drop(svc.settings.watch_dir, "A1_t1_phase.npy", blobs(2, 0.3))
    svc.recorder.sinks = [CsvSink(csv_path)]
    svc.recorder.ledger.mark_counted = lambda *a, **k: None  # the 'crash': the ledger never hears of it
    svc.run(threading.Event(), until_idle=True, observe=False)
    svc.close()
    svc2, sink2 = make_service(tmp_path)
    svc2.recorder.sinks = [CsvSink(csv_path), sink2]
    svc2.run(threading.Event(), until_idle=True, observe=False)
    svc2.close()
    assert len(sink2.rows) == 1  # reprocessed ...
    assert len(csv_path.read_text().strip().splitlines()) == 2  # ... but recorded once


def test_half_written_file_is_retried_then_counted(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="monitor.intake.files")
    svc, sink = make_service(tmp_path, ready_deadline_s=60.0)  # the wait ends when the file is complete
    watch = svc.settings.watch_dir
    watch.mkdir(parents=True, exist_ok=True)
    p = watch / "A1_t1_phase.npy"
    full = tmp_path / "full.npy"
    np.save(full, blobs(3, 0.3))
    data = full.read_bytes()
    p.write_bytes(data[: len(data) // 3])  # truncated: the reader fails

    def finish():
        # complete it once the service has found it not ready: a fixed 0.4 s could complete it before
        # the first read (the retry untested) or, late on a loaded machine, after a 1 s deadline
        wait_for(lambda: any("A1_t1_phase.npy: not ready" in r.getMessage() for r in list(caplog.records)), what="the service to find the file not ready")
        p.write_bytes(data)

    th = threading.Thread(target=finish)
    th.start()
    # no watcher and no rescan: only the reader's NotReady -> retry branch can bring the file back
    svc.rescan_s = 3600
    run_until(svc, lambda: len(sink.rows) >= 1, observe=False, what="the completed file's row")
    th.join()
    svc.close()
    assert len(sink.rows) == 1 and sink.rows[0].n_cells == 3
    assert not (tmp_path / "state" / "quarantine.csv").exists()


def test_bad_file_is_quarantined_with_one_line_and_others_continue(tmp_path, caplog):
    svc, sink = make_service(tmp_path)
    watch = svc.settings.watch_dir
    watch.mkdir(parents=True, exist_ok=True)
    (watch / "A1_t1_phase.npy").write_bytes(b"this is not an array")
    drop(watch, "A1_t2_phase.npy", blobs(2, 0.3))
    svc.run(threading.Event(), until_idle=True, observe=False)
    svc.close()
    assert [c.key.timepoint for c in sink.rows] == [2]
    q = (tmp_path / "state" / "quarantine.csv").read_text().splitlines()
    assert len(q) == 2 and "A1_t1_phase.npy" in q[1]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("A1_t1_phase.npy" in m and "\n" not in m for m in errors)


def test_incomplete_frame_released_after_wait(tmp_path):
    svc, sink = make_service(tmp_path, channels=["phase", "apo15"], wait_s=0.3)
    drop(svc.settings.watch_dir, "A1_t1_phase.npy", blobs(2, 0.3))
    run_until(svc, lambda: len(sink.rows) >= 1, what="the incomplete frame's row")
    svc.close()
    assert len(sink.rows) == 1
    assert sink.rows[0].missing_channels == ("apo15",)
    assert sink.rows[0].control is None


def test_complete_frame_has_control_signal(tmp_path):
    svc, sink = make_service(tmp_path, channels=["phase", "apo15"], wait_s=30)
    watch = svc.settings.watch_dir
    drop(watch, "A1_t1_phase.npy", blobs(2, 0.3))
    fl = np.random.default_rng(1).normal(0.1, 0.005, (128, 128)).astype(np.float32)
    fl[:16, :16] = 1.0  # 256 px bright
    drop(watch, "A1_t1_apo15.npy", fl)
    svc.run(threading.Event(), until_idle=True, observe=False)
    svc.close()
    (c,) = sink.rows
    assert c.missing_channels == ()
    assert c.control is not None and c.control.channel == "apo15"
    assert c.control.area_um2 == pytest.approx(256 * 0.322**2, rel=1e-6)


def test_frame_without_primary_channel_is_quarantined(tmp_path):
    svc, sink = make_service(tmp_path, channels=["phase", "apo15"], wait_s=0.2)
    fl = np.zeros((64, 64), np.float32)
    drop(svc.settings.watch_dir, "A1_t1_apo15.npy", fl)
    quarantine = tmp_path / "state" / "quarantine.csv"  # created, then its header and line written
    run_until(svc, lambda: quarantine.exists() and len(quarantine.read_text().splitlines()) >= 2, what="the quarantine line")
    known = svc.recorder.ledger.is_known(svc.settings.watch_dir / "A1_t1_apo15.npy")
    svc.close()
    assert sink.rows == []
    q = (tmp_path / "state" / "quarantine.csv").read_text().splitlines()
    assert len(q) == 2 and "A1_t1_apo15.npy" in q[1] and ",assemble," in q[1]
    assert known  # finished in the ledger: not re-read at the next rescan


def test_missing_watch_folder_is_exit_69_not_created(tmp_path):
    svc, _ = make_service(tmp_path)
    svc.settings = svc.settings.model_copy(update={"watch_dir": tmp_path / "share" / "not-mounted"})
    from monitor.errors import Unavailable

    with pytest.raises(Unavailable) as e:
        svc.run(threading.Event())
    svc.close()
    assert str(e.value) == f"service.watch_dir {tmp_path / 'share' / 'not-mounted'}: no such folder (is the export share mounted?)"
    assert e.value.exit_status == 69
    assert not (tmp_path / "share").exists()


class _Failing:
    def __init__(self, truth: bool):
        self.name = "failing"
        self.record_of_truth = truth

    def write(self, counts):
        raise OSError(28, "No space left on device")

    def close(self):
        pass


@pytest.mark.parametrize("truth", [True, False])
def test_failed_record_of_truth_sink_stops_and_leaves_the_frame_for_the_next_start(tmp_path, truth):
    from monitor.errors import StateWriteError
    from monitor.records import FrameKey

    svc, sink = make_service(tmp_path)
    drop(svc.settings.watch_dir, "A1_t1_phase.npy", blobs(2, 0.3))
    svc.recorder.sinks = [sink, _Failing(truth)]
    if truth:
        with pytest.raises(StateWriteError) as e:
            svc.run(threading.Event(), until_idle=True, observe=False)
        assert e.value.exit_status == 74 and "No space left on device" in str(e.value) and "\n" not in str(e.value)
    else:
        svc.run(threading.Event(), until_idle=True, observe=False)
    key = FrameKey("test", "A1", "1", 1)
    done = svc.recorder.ledger.frame_done(key)
    stale = svc.recorder.ledger.stale_frames()
    svc.close()
    assert done is (not truth)
    # record of truth failed: the frame is shown nowhere; another sink failing: the others still got it
    assert len(sink.rows) == (0 if truth else 1)
    assert stale == []  # a clean stop uses up no attempt: the frame is not 'hung' at the next start
    if truth:  # space returns: the next start records it, once
        svc2, sink2 = make_service(tmp_path)
        svc2.run(threading.Event(), until_idle=True, observe=False)
        svc2.close()
        assert [c.key for c in sink2.rows] == [key]
        assert not (tmp_path / "state" / "quarantine.csv").exists()
