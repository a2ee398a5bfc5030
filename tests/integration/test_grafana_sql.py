"""Every SQLite panel of the Grafana dashboard, run against a ledger the service wrote.

The panels plot the per-timepoint table by acquisition time; this runs each
panel's query text, with Grafana's variables and macros substituted as the
frser-sqlite-datasource plugin does, and compares the answer with the CSV.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fixtures.faultkit import csv_rows, fault_service, run_idle
from fixtures.service import blobs, drop

from monitor.intake.readers import ReaderSet
from monitor.testing import ArrayReader

DASH = Path(__file__).resolve().parents[2] / "config/grafana/dashboards/cellmonitor.json"
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


class TimedReader(ArrayReader):
    """The fake reader, with an acquisition time of T0 + timepoint hours."""

    def read(self, path):
        acq = super().read(path)
        return replace(acq, acquired_at=T0 + timedelta(hours=acq.key.timepoint))


def sql_panels(uid: str = "cellmonitor-sqlite"):
    """(title, query) of every SQLite panel reading the datasource ``uid``: the ledger
    (cellmonitor-sqlite) or the fates store (cellmonitor-fates)."""
    dash = json.loads(DASH.read_text())
    return [(p["title"], t["rawQueryText"]) for p in dash["panels"]
            if p["datasource"]["type"] == "frser-sqlite-datasource" and p["datasource"]["uid"] == uid for t in p["targets"]]


def substitute(sql: str, values: dict[str, list[str]], t_from: float, t_to: float) -> str:
    def fmt(m: re.Match) -> str:
        return ",".join("'" + v.replace("'", "''") + "'" for v in values[m.group(1)])

    sql = re.sub(r"\$\{(\w+):sqlstring\}", fmt, sql)
    sql = sql.replace("$__unixEpochFrom()", repr(t_from)).replace("$__unixEpochTo()", repr(t_to))
    assert "$" not in sql, sql
    return sql


store_registry: list = []


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from prometheus_client import CollectorRegistry

    tmp = tmp_path_factory.mktemp("grafana")
    store_registry[:] = [CollectorRegistry()]
    # a plate map: A1 and B2 are the controls, C3..F6 a dose series whose top doses kill every cell
    (tmp / "plate.csv").write_text("well,compound,concentration,unit,role\nA1,DMSO,0,uM,control\nB2,DMSO,0,uM,control\n"
                                   "C3,drugX,0.1,uM,\nD4,drugX,1,uM,\nE5,drugX,10,uM,\nF6,drugX,100,uM,\n")
    svc = fault_service(tmp, readers=lambda cfg: ReaderSet([TimedReader()]), assembly={"channels": ["phase", "apo15"], "wait_s": 30},
                        tracking={"plate_map": "plate.csv"}, registry=store_registry[0])
    w = svc.settings.watch_dir

    def fluo(t: int) -> np.ndarray:
        img = np.random.default_rng(t).normal(0.1, 0.005, (128, 128)).astype(np.float32)
        img[: 8 * t, :16] = 1.0
        return img

    # A1 dies over time, B2 stays live; t3 of A1 arrives late (a catch-up): it must still be in place
    for t, (n_live, n_dead) in {1: (3, 0), 2: (2, 1), 4: (0, 3)}.items():
        img = blobs(n_live + n_dead, 0.3)
        if n_dead:
            img = blobs(n_dead, 0.9, size=128)
        drop(w, f"A1_t{t}_phase.npy", img)
        drop(w, f"A1_t{t}_apo15.npy", fluo(t))
    for t in (1, 2, 3, 4):
        drop(w, f"B2_t{t}_phase.npy", blobs(2, 0.3))
        drop(w, f"B2_t{t}_apo15.npy", fluo(1))
    for well, n_dead in (("C3", 0), ("D4", 1), ("E5", 3), ("F6", 3)):
        for t in (1, 2, 3, 4):
            dead = n_dead if t >= 3 else 0
            img = blobs(3 - dead, 0.3, seed=7) if dead < 3 else blobs(3, 0.9, seed=7)
            if 0 < dead < 3:
                img = np.maximum(img, blobs(dead, 0.9, size=128, seed=8))
            drop(w, f"{well}_t{t}_phase.npy", img)
            drop(w, f"{well}_t{t}_apo15.npy", fluo(1))
    run_idle(svc)
    drop(w, "A1_t3_phase.npy", blobs(2, 0.9))
    drop(w, "A1_t3_apo15.npy", fluo(3))
    run_idle(svc)
    svc.close()
    return tmp


def test_every_sql_panel_runs_against_the_service_ledger(store):
    panels = sql_panels()
    assert len(panels) >= 4
    db = sqlite3.connect(f"file:{store / 'state' / 'ledger.sqlite'}?mode=ro", uri=True)
    values = {"instrument": ["test"], "experiment": ["test"], "well": ["A1", "B2"]}
    for title, sql in panels:
        rows = db.execute(substitute(sql, values, T0.timestamp(), (T0 + timedelta(days=1)).timestamp())).fetchall()
        assert rows, title
        times = [r[0] for r in rows]
        assert times == sorted(times), title
        assert all(T0.timestamp() < t <= (T0 + timedelta(hours=4)).timestamp() for t in times), title
    # outside the dashboard's time range: nothing
    for title, sql in panels:
        assert db.execute(substitute(sql, values, 0.0, 1.0)).fetchall() == [], title
    db.close()


def test_dead_fraction_panel_matches_the_csv_at_every_acquisition_time(store):
    (sql,) = [q for t, q in sql_panels() if t.startswith("Apoptotic + dead fraction per well")]
    db = sqlite3.connect(store / "state" / "ledger.sqlite")
    rows = db.execute(substitute(sql, {"instrument": ["test"], "experiment": ["test"], "well": ["A1"]}, 0, 4e9)).fetchall()
    db.close()
    csv_a1 = sorted((int(r["timepoint"]), float(r["frac_dead"])) for r in csv_rows(store) if r["well"] == "A1")
    assert [round((t - T0.timestamp()) / 3600) for t, _, _ in rows] == [1, 2, 3, 4]  # no hole: the late t3 is in place
    assert [w for _, w, _ in rows] == ["test/A1"] * 4
    assert [round(f, 4) for _, _, f in rows] == [f for _, f in csv_a1]
    assert rows[-1][2] == 1.0 and rows[0][2] == 0.0


def test_control_panel_matches_the_csv(store):
    (sql,) = [q for t, q in sql_panels() if t.startswith("Control signal")]
    db = sqlite3.connect(store / "state" / "ledger.sqlite")
    rows = db.execute(substitute(sql, {"instrument": ["test"], "experiment": ["test"], "well": ["A1"]}, 0, 4e9)).fetchall()
    db.close()
    csv_a1 = sorted((int(r["timepoint"]), float(r["control_area_fraction"])) for r in csv_rows(store) if r["well"] == "A1")
    assert [round(f, 5) for _, _, f in rows] == [f for _, f in csv_a1]
    assert [f for _, f in csv_a1] == sorted(f for _, f in csv_a1) and csv_a1[0][1] > 0


def test_state_fraction_panel_sums_to_one_per_timepoint(store):
    (sql,) = [q for t, q in sql_panels() if t.startswith("Cell state fractions by acquisition time")]
    db = sqlite3.connect(store / "state" / "ledger.sqlite")
    rows = db.execute(substitute(sql, {"instrument": ["test"], "experiment": ["test"], "well": ["B2"]}, 0, 4e9)).fetchall()
    db.close()
    by_time: dict[float, float] = {}
    for t, state, f in rows:
        assert state in ("live", "apoptotic", "necrotic", "dead", "other")
        by_time[t] = by_time.get(t, 0) + f
    assert len(by_time) == 4 and all(abs(v - 1) < 1e-9 for v in by_time.values())


def test_fates_panels_run_against_the_fates_store_the_service_wrote(store):
    panels = sql_panels("cellmonitor-fates")
    assert {t.split(" (")[0] for t, _ in panels} == {"Smoothed cell states by acquisition time", "EC50 over time"}
    db = sqlite3.connect(f"file:{store / 'state' / 'fates.sqlite'}?mode=ro", uri=True)
    values = {"instrument": ["test"], "experiment": ["test"], "well": ["A1", "B2"]}
    (smoothed,) = [q for t, q in panels if t.startswith("Smoothed")]
    rows = db.execute(substitute(smoothed, values, T0.timestamp(), (T0 + timedelta(days=1)).timestamp())).fetchall()
    by_time: dict[float, float] = {}
    for t, state, f in rows:
        assert state.startswith("smoothed_")
        by_time[t] = by_time.get(t, 0) + f
    assert sorted(round((t - T0.timestamp()) / 3600) for t in by_time) == [1, 2, 3, 4]
    assert all(abs(v - 1) < 1e-9 for v in by_time.values())
    # the smoothed counts keep the raw ones beside them, frame by frame
    raw = db.execute("SELECT SUM(live + apoptotic + dead + necrotic), SUM(smoothed_live + smoothed_apoptotic + smoothed_dead + smoothed_necrotic) "
                     "FROM smoothed_counts").fetchone()
    assert raw[0] == raw[1] > 0
    (ec50,) = [q for t, q in panels if t.startswith("EC50")]
    assert db.execute(substitute(ec50, values, 0.0, 1.0)).fetchall() == []  # outside the time range: nothing
    fits = db.execute("SELECT timepoint, measure, ok, reason FROM dose_response ORDER BY timepoint, measure").fetchall()
    assert {f[0] for f in fits} == {1, 2, 3, 4}
    assert all(f[3] for f in fits if not f[2])  # a fit that is not usable says why
    # the smoothed gauges: each well's latest frame, as in the store
    reg = store_registry[0]
    for well in ("A1", "F6"):
        want = dict(zip(("live", "apoptotic", "dead", "necrotic"), db.execute(
            "SELECT smoothed_live, smoothed_apoptotic, smoothed_dead, smoothed_necrotic FROM smoothed_counts "
            "WHERE well = ? ORDER BY timepoint DESC LIMIT 1", (well,)).fetchone(), strict=True))
        for state, n in want.items():
            assert reg.get_sample_value("cellmonitor_smoothed_cells", {"experiment": "test", "well": well, "state": state}) == n
    latest = db.execute("SELECT compound, measure, unit, ec50 FROM dose_response WHERE ok = 1 AND timepoint = 4").fetchall()
    for compound, measure, unit, ec50 in latest:
        got = reg.get_sample_value("cellmonitor_ec50", {"experiment": "test", "compound": compound, "measure": measure, "unit": unit})
        assert got == pytest.approx(ec50)
    db.close()


def test_sqlite_datasource_is_provisioned_for_the_ledger():
    import yaml

    ds = yaml.safe_load((DASH.parents[1] / "provisioning/datasources/cellmonitor.yml").read_text())["datasources"]
    sq, fs = [d for d in ds if d["type"] == "frser-sqlite-datasource"]
    assert sq["uid"] == "cellmonitor-sqlite" and sq["jsonData"]["path"].endswith("ledger.sqlite")
    assert fs["uid"] == "cellmonitor-fates" and fs["jsonData"]["path"].endswith("fates.sqlite")
    dash = json.loads(DASH.read_text())
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {"cellmonitor-prometheus", "cellmonitor-sqlite", "cellmonitor-fates"}
