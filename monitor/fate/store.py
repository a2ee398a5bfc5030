"""The live fates store: smoothed counts and EC50 over time, updated as frames are recorded,
in one SQLite file that Grafana reads (``<state_dir>/fates.sqlite``).

Policy
------
* Written by the per-cell sink after each frame (both engines record through it):
  the frame's field is smoothed again (:func:`monitor.fate.fates.smooth_cells`,
  every track of the field: a new frame can change earlier smoothed states) and
  its rows in ``smoothed_counts`` are replaced; then, with a plate map, the
  dose response at that timepoint is fitted again from every well's smoothed
  counts and its rows in ``dose_response`` are replaced.
* ``smoothed_counts``: one row per frame: the keys, ``time_s`` (acquisition
  time, epoch seconds; NULL without one), the raw ``<state>`` counts beside the
  ``smoothed_<state>`` counts. ``dose_response``: one row per experiment,
  compound, timepoint and measure (``dead``, ``apoptotic+dead``) with EC50, its
  interval, ``ok`` and the reason when not ok.
* The plate map is re-read when its file changes (logged; :class:`PlateMapFile`).
* Never the record of truth: a failure is one warning, the frame stays counted.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np

from monitor.fate.fates import dose_response, smooth_cells
from monitor.fate.platemap import PlateMapFile
from monitor.fate.smoothing import STATES, HMMParams

log = logging.getLogger(__name__)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS smoothed_counts (experiment TEXT, well TEXT, field TEXT, timepoint INTEGER, time_s REAL, "
    + ", ".join(f"{s} INTEGER, smoothed_{s} INTEGER" for s in STATES)
    + ", PRIMARY KEY (experiment, well, field, timepoint))",
    "CREATE TABLE IF NOT EXISTS dose_response (experiment TEXT, compound TEXT, unit TEXT, timepoint INTEGER, time_s REAL, "
    "measure TEXT, wells INTEGER, ec50 REAL, ec50_low REAL, ec50_high REAL, hill REAL, bottom REAL, top REAL, ok INTEGER, "
    "reason TEXT, PRIMARY KEY (experiment, compound, timepoint, measure))",
)


class FateStore:
    """``fates.sqlite`` (module docstring)."""

    def __init__(self, path: Path, params: HMMParams | None = None, interval_h: float = 1.0, plate_map: Path | None = None,
                 metrics: Any = None):
        self.path = path
        #: the service's metrics (its ``smoothed_cells`` and ``ec50`` gauges are set), or None
        self.metrics = metrics
        self._latest: dict[tuple[str, str, str], dict[str, int]] = {}
        self.params = params or HMMParams()
        self.interval_h = interval_h
        self.plate = PlateMapFile(plate_map) if plate_map is not None else None
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            for stmt in _SCHEMA:
                db.execute(stmt)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def update(self, field_rows: Any) -> None:
        """Smooth one field's rows (all its frames, with ``track_id``) and refresh its
        smoothed counts, then the dose response at the timepoints of the changed frames."""
        import pandas as pd

        if field_rows is None or len(field_rows) == 0:
            return
        fates = smooth_cells(field_rows, self.params, self.interval_h)
        sc = fates.smoothed_counts
        stamps = pd.to_datetime(field_rows["acquired_at"], errors="coerce", utc=True) if "acquired_at" in field_rows else None
        time_of: dict[int, float] = {}
        if stamps is not None:
            for tp, ts in zip(field_rows["timepoint"], stamps, strict=True):
                if not pd.isna(ts):
                    time_of[int(tp)] = ts.timestamp()
        cols = ["experiment", "well", "field", "timepoint", "time_s", *[c for s in STATES for c in (s, f"smoothed_{s}")]]
        rows = [(str(r.experiment), str(r.well), str(r.field), int(r.timepoint), time_of.get(int(r.timepoint)),
                 *[int(getattr(r, c)) for s in STATES for c in (s, f"smoothed_{s}")]) for r in sc.itertuples()]
        with self._lock, self._db() as db:
            db.executemany(f"INSERT OR REPLACE INTO smoothed_counts ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows)
            experiment = str(field_rows["experiment"].iloc[0])
            if self.plate is not None:
                plate = self.plate.current()
                if plate.wells:
                    self._dose(db, experiment, plate, sorted({int(t) for t in field_rows["timepoint"]}))
            if self.metrics is not None:
                self._gauges(db, sc, experiment)

    def _gauges(self, db: sqlite3.Connection, sc: Any, experiment: str) -> None:
        """Smoothed counts of each well's latest frames, and the latest EC50 per compound."""
        m = self.metrics
        if len(sc):
            last = sc[sc["timepoint"] == sc["timepoint"].max()].iloc[0]
            self._latest[(str(last["experiment"]), str(last["well"]), str(last["field"]))] = {s: int(last[f"smoothed_{s}"]) for s in STATES}
            well = str(last["well"])
            for s in STATES:
                n = sum(v[s] for k, v in self._latest.items() if k[0] == experiment and k[1] == well)
                m.smoothed_cells.labels(experiment, well, s).set(n)
        q = ("SELECT compound, measure, unit, ec50, ok FROM dose_response WHERE experiment = ? AND timepoint = "
             "(SELECT MAX(timepoint) FROM dose_response WHERE experiment = ?)")
        for compound, measure, unit, ec50, ok in db.execute(q, (experiment, experiment)).fetchall():
            if ok and ec50 is not None:
                m.ec50.labels(experiment, compound, measure, unit).set(ec50)
            else:
                try:
                    m.ec50.remove(experiment, compound, measure, unit)
                except KeyError:
                    pass

    def _dose(self, db: sqlite3.Connection, experiment: str, plate: Any, timepoints: list[int]) -> None:
        import pandas as pd

        q = f"SELECT * FROM smoothed_counts WHERE experiment = ? AND timepoint IN ({', '.join('?' * len(timepoints))})"
        counts = pd.read_sql_query(q, db, params=[experiment, *timepoints])
        if counts.empty:
            return
        dr = dose_response(counts, plate)
        if dr.empty:
            return
        when = counts.groupby("timepoint")["time_s"].mean()
        rows = [(experiment, str(r.compound), str(r.unit), int(r.timepoint), _num(when.get(int(r.timepoint))), str(r.measure),
                 int(r.wells), _num(r.ec50), _num(r.ec50_low), _num(r.ec50_high), _num(r.hill), _num(r.bottom), _num(r.top),
                 int(bool(r.ok)), str(r.reason)) for r in dr.itertuples()]
        db.executemany("INSERT OR REPLACE INTO dose_response VALUES (" + ", ".join("?" * 15) + ")", rows)


def _num(v: Any) -> float | None:
    """A float for SQLite, NULL for NaN or missing."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None
