"""What the service keeps between frames stays small (issue 23, "RSS flat"): the cells sink keeps a
field's earlier rows as plain arrays (no DataFrames gathering pandas' copy-on-write weak references
at every smoothing), and the loop gives the C heap's free pages back after each pass."""

from __future__ import annotations

import gc
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("laptrack")

from cellmonitor_plugins.sinks.cells import CellTableSink, read_cells  # noqa: E402
from fixtures.service import blobs, make_service  # noqa: E402

from monitor.fate.fates import smooth_cells  # noqa: E402
from monitor.fate.store import FateStore  # noqa: E402
from monitor.fate.tracking import LinkParams  # noqa: E402
from monitor.records import CellCalls, Counts, FrameKey  # noqa: E402
from monitor.service import loop  # noqa: E402

PX = 0.5
CLASSES = ("live", "apoptotic", "necrotic", "dead")


def _counts(field: str, t: int, pos: np.ndarray, rng: np.random.Generator) -> Counts:
    n = len(pos)
    st = rng.integers(0, 4, n)
    cert = rng.uniform(0.3, 1.0, n)
    calls = CellCalls(np.zeros((8, 8)), np.zeros((8, 8), int), np.arange(n) + 1, st, np.zeros(n, bool), CLASSES, PX,
                      certainty=cert, centroid_yx_px=pos / PX, area_um2=np.full(n, 50.0))
    return Counts(FrameKey("e", "A1", field, t), "t", None, PX, "config", n, {c: int((st == i).sum()) for i, c in enumerate(CLASSES)},
                  0, float(cert.mean()), None, sources=(Path(f"/x/{field}_{t}.tif"),), calls=calls)


def _run(sink: CellTableSink, t0: int, t1: int, pos: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    for t in range(t0, t1):
        for f in pos:
            pos[f] = pos[f] + rng.normal(0, 1.0, pos[f].shape)
            sink.write(_counts(f, t, pos[f], rng))


def _weakrefs() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is weakref.ReferenceType)


def test_the_cells_sink_keeps_plain_arrays_and_gathers_no_weak_references(tmp_path):
    rng = np.random.default_rng(0)
    sink = CellTableSink(tmp_path / "cells", tracking=LinkParams(), store=FateStore(tmp_path / "fates.sqlite"))
    pos = {f: rng.uniform(0, 300, (40, 2)) for f in ("1", "2")}
    _run(sink, 1, 6, pos, rng)  # warm-up: caches of pandas, laptrack, sqlite
    before = _weakrefs()
    _run(sink, 6, 26, pos, rng)
    # kept DataFrames gathered a dead weak reference at every smoothing of their field (thousands here)
    assert _weakrefs() - before < 300
    kept = [v for table in sink._tables.values() for frame in table.values() for v in frame.values()]
    assert kept and not any(isinstance(v, pd.DataFrame | pd.Series | pd.Index) for v in kept)
    # text (names, states) is kept once per distinct value, not once per cell
    frame = sink._tables[("e", "A1", "1")][25]
    assert len(frame["label"]) == 40 and len(frame["state"].values) <= len(CLASSES) and len(frame["well"].values) == 1


def test_the_smoothed_counts_are_those_of_the_whole_recorded_table(tmp_path):
    rng = np.random.default_rng(1)
    sink = CellTableSink(tmp_path / "cells", tracking=LinkParams(), store=FateStore(tmp_path / "fates.sqlite"))
    _run(sink, 1, 9, {"1": rng.uniform(0, 300, (30, 2))}, rng)
    want = smooth_cells(read_cells(tmp_path / "cells")).smoothed_counts
    import sqlite3

    with sqlite3.connect(tmp_path / "fates.sqlite") as db:
        got = pd.read_sql_query("SELECT * FROM smoothed_counts ORDER BY timepoint", db)
    cols = [c for c in want.columns if c.startswith(("live", "apoptotic", "necrotic", "dead", "smoothed_"))]
    assert len(got) == len(want) == 8
    assert got[cols].to_numpy().tolist() == want.sort_values("timepoint")[cols].to_numpy().tolist()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_memory_calls_glibc():
    assert loop.release_free_memory() is True


def test_the_loop_gives_free_memory_back_after_each_pass_that_processed_frames(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(loop, "release_free_memory", lambda: calls.append(1) or True)
    svc, sink = make_service(tmp_path)
    np.save(svc.settings.watch_dir / "A1_t1_phase.npy", blobs(2, 0.3))
    svc.run(threading.Event(), until_idle=True, observe=False)
    assert len(sink.rows) == 1 and len(calls) >= 1
    n = len(calls)
    svc.handle_all([])  # nothing processed: nothing to give back
    assert len(calls) == n
    svc.trim_memory = False
    np.save(svc.settings.watch_dir / "A2_t1_phase.npy", blobs(2, 0.3))
    svc.run(threading.Event(), until_idle=True, observe=False)
    assert len(sink.rows) == 2 and len(calls) == n
    svc.close()
