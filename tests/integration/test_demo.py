"""The demo end to end: real reader, segmenter, encoder (Lite0 weights), index, watcher, CSV, /metrics."""

from __future__ import annotations

import csv
import re
import socket

import pytest

from monitor.demo.run import run_demo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gauge(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} {labels} not in /metrics")


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("no_thread_leak")
def test_small_demo_csv_matches_metrics_and_trends(tmp_path):
    res = run_demo(tmp_path / "demo", n_timepoints=4, wells=("A1",), cells_per_field=14, per_state=20, metrics_port=free_port(), say=lambda m: None)
    rows = list(csv.DictReader(res.csv_path.open()))
    assert [int(r["timepoint"]) for r in rows] == [1, 2, 3, 4]
    assert all(r["pixel_size_source"] == "metadata:resolution" and r["pixel_size_um"] == "0.3220" for r in rows)
    # every CSV count adds up
    for r in rows:
        assert sum(int(r[f"n_{s}"]) for s in ("live", "apoptotic", "necrotic", "dead")) == int(r["n_cells"])
    # the last row and the scraped /metrics agree
    last = rows[-1]
    for s in ("live", "dead"):
        assert gauge(res.metrics_text, "cellmonitor_latest_cells", experiment="demo", well="A1", state=s) == float(last[f"n_{s}"])
        assert gauge(res.metrics_text, "cellmonitor_state_fraction", experiment="demo", well="A1", state=s) == pytest.approx(float(last[f"frac_{s}"]), abs=1e-4)
    assert gauge(res.metrics_text, "cellmonitor_control_area_fraction", well="A1") == pytest.approx(float(last["control_area_fraction"]), abs=1e-5)
    assert re.search(r'cellmonitor_frames_total\{result="counted"\} 4\.0', res.metrics_text)
    # biology of the generator: live falls, dead rises, control signal rises
    live = [float(r["frac_live"]) for r in rows]
    dead = [float(r["frac_dead"]) for r in rows]
    ctl = [float(r["control_area_fraction"]) for r in rows]
    assert live[0] > 0.9 and live[-1] < live[0] - 0.3
    assert dead[-1] > dead[0] + 0.2
    assert ctl[-1] > ctl[0] + 0.01
    assert all(b >= a - 0.002 for a, b in zip(ctl, ctl[1:], strict=False))  # the control signal rises with death
    # the Apo-15 channel read as the death marker: agreement on every frame, in the CSV and /metrics
    for r in rows:
        assert int(r["marker_cells"]) >= int(r["n_cells"]) - 3 and int(r["marker_agree"]) >= 0.8 * int(r["marker_cells"])
        assert r["index_version"] == "1"
    # every demo cell is of a referenced kind: few flagged unknown (the calibration's 0.99 quantile)
    assert sum(int(r["n_unknown"]) for r in rows) <= 0.05 * sum(int(r["n_cells"]) for r in rows)
    assert gauge(res.metrics_text, "cellmonitor_marker_agreement", well="A1") == pytest.approx(float(last["marker_agreement"]), abs=1e-4)
    assert gauge(res.metrics_text, "cellmonitor_unknown_cells", well="A1") == float(last["n_unknown"])
    # the counts follow the generator's truth
    for c in res.counts:
        truth = res.truth[(c.key.well, c.key.timepoint)]
        n_true = sum(truth.values())
        assert abs(c.n_cells - n_true) <= 2
        for s in ("live", "apoptotic", "necrotic", "dead"):
            assert abs(c.fraction(s) - truth[s] / n_true) < 0.15, (c.key, s)


def test_replay_reproduces_live_counts_and_export(tmp_path):
    from monitor.cli.main import main

    res = run_demo(tmp_path / "demo", n_timepoints=2, wells=("A1",), cells_per_field=10, per_state=12, metrics_port=None, say=lambda m: None)
    cfg = (tmp_path / "demo" / "demo.toml").read_text().replace('state_dir = "state"', 'state_dir = "state2"')
    (tmp_path / "demo" / "replay.toml").write_text(cfg)
    assert main(["-q", "replay", str(tmp_path / "demo" / "replay.toml"), "--no-metrics"]) == 0
    live = list(csv.DictReader(res.csv_path.open()))
    again = list(csv.DictReader((tmp_path / "demo" / "state2" / "counts.csv").open()))
    cols = [c for c in live[0] if c.startswith(("n_", "frac_", "control_"))]
    assert [[r[c] for c in cols] for r in again] == [[r[c] for c in cols] for r in live]
    # a second replay finds everything in the ledger and adds nothing
    assert main(["-q", "replay", str(tmp_path / "demo" / "replay.toml"), "--no-metrics"]) == 0
    assert len(list(csv.DictReader((tmp_path / "demo" / "state2" / "counts.csv").open()))) == 2
    # post-run export, long format: one row per frame and state
    out = tmp_path / "export.csv"
    assert main(["-q", "export", str(tmp_path / "demo" / "replay.toml"), "--out", str(out), "--format", "long"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * 4 and {r["state"] for r in rows} == {"live", "apoptotic", "necrotic", "dead"}
    # what says how far a frame's counts can be trusted stays with each state's row
    assert {"n_unknown", "n_uncertain", "missing_channels"} <= set(rows[0])


def test_run_without_index_is_one_line_exit_78(tmp_path, capsys):
    from monitor.cli.main import main

    cfg = tmp_path / "c.toml"
    cfg.write_text('[service]\nmetrics_port = 0\n[classifier]\nindex = "missing-index"\n')
    assert main(["run", str(cfg)]) == 69  # the watch folder is checked first, before any model loads
    assert "service.watch_dir" in capsys.readouterr().err
    (tmp_path / "input").mkdir()
    assert main(["run", str(cfg)]) == 78
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cellmonitor: error: {tmp_path / 'missing-index'}: not a cellmonitor index (no meta.json); build one with 'cellmonitor index build'"]


def test_export_refuses_a_foreign_csv_in_one_line(tmp_path, capsys):
    from monitor.cli.main import main

    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["export", str(bad), "--out", str(tmp_path / "o.csv")]) == 65
    assert capsys.readouterr().err.strip() == f"cellmonitor: error: {bad}: not a cellmonitor counts CSV (missing columns: experiment, well, field, timepoint, n_cells)"


def test_unwritable_output_is_one_line_not_an_internal_error(tmp_path, capsys):
    from monitor.cli.main import main

    src = tmp_path / "counts.csv"
    src.write_text("experiment,well,field,timepoint,n_cells,n_live,frac_live\ne,A1,1,1,2,2,1.0\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "x.csv"  # a folder that cannot exist, whoever runs the test
    assert main(["export", str(src), "--out", str(out)]) == 74
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cellmonitor: error: ") and "internal error" not in err[0]
    assert "a-file" in err[0]


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("no_thread_leak")
def test_dose_series_demo_has_tracks_fates_and_dose_response(tmp_path, capsys):
    """The default demo plate: vehicle controls and a dose series, tracked and fitted as it runs."""
    import sqlite3

    pytest.importorskip("laptrack")
    from monitor.cli.demo import _fates_summary
    from monitor.fate.platemap import parse_plate_map
    from monitor.fate.table import read_cells

    res = run_demo(tmp_path / "demo", n_timepoints=4, cells_per_field=8, per_state=12, metrics_port=None, say=lambda m: None)
    assert res.dose is not None
    plate = parse_plate_map(tmp_path / "demo" / "plate.csv")
    assert plate.errors == () and plate.controls() == ["A1", "A2"] and len(plate.wells) == 8
    cells = read_cells(tmp_path / "demo" / "state" / "cells")
    assert cells["track_id"].notna().all() and set(cells["well"]) == set(plate.wells)
    # cells wander but keep their tracks: most cells of the last frame were there at the first
    last = cells[cells.timepoint == 4]
    assert (last["track_id"] // 1_000_000 == 1).mean() > 0.8
    with sqlite3.connect(tmp_path / "demo" / "state" / "fates.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM smoothed_counts").fetchone()[0] == 8 * 4
        assert {r[0] for r in db.execute("SELECT DISTINCT timepoint FROM dose_response")} == {1, 2, 3, 4}
    # the generator: the highest dose kills more than the controls by the last timepoint
    truth_last = {w: res.truth[(w, 4)] for w, _ in res.dose.wells}
    assert truth_last["A8"]["dead"] + truth_last["A8"]["necrotic"] > truth_last["A1"]["dead"] + truth_last["A1"]["necrotic"]
    _fates_summary(res, tmp_path / "demo")
    out = capsys.readouterr().out
    assert "tracks: " in out and "A8" in out and "the generator's: 1.5 uM" in out
