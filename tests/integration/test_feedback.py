"""Expert corrections dropped into the feedback folder reach the running index, the CSV and a restart."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from cellmonitor_plugins.sinks.csv import CsvSink
from fixtures.service import blobs, drop, make_service, run_until

from monitor.index.ewc import EWCClassifier
from monitor.index.store import ReferenceIndex
from monitor.service.feedback import Feedback


def _frame(bright: float, seed: int = 0) -> np.ndarray:
    img = blobs(3, bright, seed=seed)
    img[0, 0] = 1.0  # the references' display range
    return img


def _setup(tmp: Path):  # type: ignore[no-untyped-def]
    csv_path = tmp / "state" / "counts.csv"
    svc, sink = make_service(tmp, sinks=None)
    svc.recorder.sinks = [CsvSink(csv_path), sink]
    index = svc.pipeline.classifier.index  # type: ignore[attr-defined]
    if not (tmp / "index" / "meta.json").exists():
        index.save(tmp / "index")
    else:  # a restart: the index as the service loads it, corrections included
        loaded = ReferenceIndex.load(tmp / "index")
        svc.pipeline = type(svc.pipeline)(**{**svc.pipeline.__dict__, "classifier": EWCClassifier(loaded, index.ewc)})
    svc.feedback = Feedback(tmp / "feedback", tmp / "index", svc.pipeline, svc.readers, svc.settings.watch_dir, svc.metrics, stable_s=0.0, interval_s=0.0)
    (tmp / "feedback").mkdir(exist_ok=True)
    return svc, sink, csv_path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_corrections_reach_later_frames_the_csv_and_a_restart(tmp_path: Path) -> None:
    svc, sink, csv_path = _setup(tmp_path)
    watch = svc.settings.watch_dir
    drop(watch, "A1_t1_phase.npy", _frame(0.7))
    run_until(svc, lambda: len(sink.rows) == 1, what="the first frame's row")
    first = sink.rows[0]
    called = max(first.counts, key=first.counts.get)
    other = "live" if called == "dead" else "dead"
    assert first.index_version == 1 and first.counts[called] == 3
    # the expert says these three cells are the other state
    (tmp_path / "feedback" / "review.csv").write_text("frame,cell,state\n" + "".join(f"A1_t1_phase.npy,{i},{other}\n" for i in (1, 2, 3)))
    # the loop polls the feedback folder after the frames of its step: a frame dropped with the
    # corrections may be counted before they are applied. Wait until they are (the move to applied/
    # is the poll's last write, after the index and its version gauge), then drop the next frame.
    applied = tmp_path / "feedback" / "applied" / "review.csv"
    run_until(svc, applied.is_file, what="the corrections to be applied (feedback/applied/review.csv)")
    drop(watch, "A1_t2_phase.npy", _frame(0.7))
    run_until(svc, lambda: len(sink.rows) == 2, what="the second frame's row")
    svc.close()
    second = sink.rows[1]
    assert second.index_version == 2 and second.counts[other] == 3, second.counts
    assert applied.is_file()
    assert [r["index_version"] for r in _rows(csv_path)] == ["1", "2"]
    assert svc.metrics.index_version._value.get() == 2

    # a restart loads the corrections with the index
    svc2, sink2, _ = _setup(tmp_path)
    drop(watch, "A1_t3_phase.npy", _frame(0.7))
    run_until(svc2, lambda: len(sink2.rows) == 1, what="the restarted service's first row")
    svc2.close()
    assert sink2.rows[0].index_version == 2 and sink2.rows[0].counts[other] == 3
    assert [r["index_version"] for r in _rows(csv_path)] == ["1", "2", "2"]


def test_labelled_crop_images_and_bad_files(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    import tifffile

    svc, _sink, _ = _setup(tmp_path)
    fb = svc.feedback
    crop = (np.clip(_frame(0.5)[10:34, 10:34], 0, 1) * 255).astype(np.uint8)
    (tmp_path / "feedback" / "dead").mkdir()
    tifffile.imwrite(tmp_path / "feedback" / "dead" / "cell.tif", crop)
    (tmp_path / "feedback" / "necrotic").mkdir()
    tifffile.imwrite(tmp_path / "feedback" / "necrotic" / "cell.tif", crop)
    (tmp_path / "feedback" / "bad.csv").write_text("frame,cell,state\nnope.npy,1,dead\n")
    (tmp_path / "feedback" / "cols.csv").write_text("a,b\n1,2\n")
    with caplog.at_level(logging.WARNING):
        added = fb.poll()
    assert added == 1 and fb.index.version == 2 and fb.index.n_corrections == 1
    assert (tmp_path / "feedback" / "applied" / "dead" / "cell.tif").is_file()
    rejected = sorted(p.name for p in (tmp_path / "feedback" / "rejected").rglob("*") if p.is_file())
    assert rejected == ["bad.csv", "cell.tif", "cols.csv"]
    lines = [r.getMessage() for r in caplog.records]
    assert any("necrotic" in m and "not a class of the index" in m for m in lines)
    assert any("bad.csv" in m and "not found" in m for m in lines)
    assert any("cols.csv" in m and "frame,cell,state" in m for m in lines)
    assert fb.poll() == 0  # nothing left; nothing added twice


def test_a_file_applied_before_a_crash_is_not_added_twice(tmp_path: Path) -> None:
    import tifffile

    svc, _sink, _ = _setup(tmp_path)
    crop = (np.clip(_frame(0.5)[10:34, 10:34], 0, 1) * 255).astype(np.uint8)
    (tmp_path / "feedback" / "live").mkdir()
    path = tmp_path / "feedback" / "live" / "c.tif"
    tifffile.imwrite(path, crop)
    fb = svc.feedback
    fb._move = lambda p, where: None  # the crash: saved, never moved
    assert fb.poll() == 1
    assert fb.poll() == 0 and fb.index.n_corrections == 1 and fb.index.version == 2


def _crop_file(path: Path) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, (np.clip(_frame(0.5)[10:34, 10:34], 0, 1) * 255).astype(np.uint8))


def test_a_failed_save_moves_nothing_and_is_retried(tmp_path: Path) -> None:
    svc, _sink, _ = _setup(tmp_path)
    fb = svc.feedback
    _crop_file(tmp_path / "feedback" / "dead" / "c.tif")
    real = fb.index.save_corrections
    fb.index.save_corrections = lambda folder: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    try:
        fb.poll()
    except OSError:
        pass  # the loop logs it and goes on counting
    assert (tmp_path / "feedback" / "dead" / "c.tif").is_file()  # not moved: not on disk yet
    fb.index.save_corrections = real
    assert fb.poll() == 0  # the retried save persists it; the file is then known and moved
    assert (tmp_path / "feedback" / "applied" / "dead" / "c.tif").is_file()
    assert ReferenceIndex.load(tmp_path / "index").n_corrections == 1


def test_the_same_crop_relabelled_and_stray_files(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    svc, _sink, _ = _setup(tmp_path)
    fb = svc.feedback
    _crop_file(tmp_path / "feedback" / "live" / "c.tif")
    assert fb.poll() == 1
    _crop_file(tmp_path / "feedback" / "dead" / "c.tif")  # same bytes, the expert changed their mind
    _crop_file(tmp_path / "feedback" / "loose.tif")
    _crop_file(tmp_path / "feedback" / "dead" / "batch1" / "d.tif")
    (tmp_path / "feedback" / "notes.txt").write_text("hello")
    with caplog.at_level(logging.WARNING):
        assert fb.poll() == 1
    assert list(fb.index.labels[-2:]) == [0, 1]
    rejected = sorted(p.name for p in (tmp_path / "feedback" / "rejected").rglob("*") if p.is_file())
    assert rejected == ["d.tif", "loose.tif", "notes.txt"]
    assert sum("not a labelled crop" in r.getMessage() for r in caplog.records) == 3
    assert fb.pending() == []
