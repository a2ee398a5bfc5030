"""Tracks and fates where people look: ``cellmonitor export --fates`` (Parquet) and the report's
tracks, survival, EC50 and dose-response sections, from tables the sinks wrote (a dose series
whose EC50 and death times are known)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("laptrack")

from cellmonitor_plugins.sinks.cells import CellTableSink  # noqa: E402
from cellmonitor_plugins.sinks.csv import PLUGIN as CSV  # noqa: E402

from monitor.cli.main import main  # noqa: E402
from monitor.config import load_config  # noqa: E402
from monitor.fate.tracking import LinkParams  # noqa: E402
from monitor.protocols import context_from  # noqa: E402
from monitor.records import CellCalls, Counts, FrameKey  # noqa: E402

PX = 0.5
CLASSES = ("live", "apoptotic", "necrotic", "dead")
DOSES = {"A1": 0.0, "A2": 0.0, "A3": 0.1, "A4": 0.3, "A5": 1.0, "A6": 3.0, "A7": 10.0, "A8": 30.0}
EC50, N, T = 1.0, 20, 8


def _frames():
    """Per well and timepoint: labels, centroids (um), state index and certainty; the dead
    fraction at the last timepoint follows a logistic of EC50 1 uM, deaths earlier at high dose."""
    out = {}
    for wi, (well, c) in enumerate(DOSES.items()):
        rng = np.random.default_rng(wi)
        pos = np.array([[30.0 + 40 * (i // 5), 30.0 + 40 * (i % 5)] for i in range(N)])
        p = 0.0 if c == 0 else 1 / (1 + (EC50 / c) ** 2)
        k = int(round(p * N))
        death = np.full(N, np.inf)
        death[:k] = np.clip(np.round((T - 2) * (1 - 0.6 * p) * rng.uniform(0.5, 1.0, k)), 1, T - 2)
        for t in range(1, T + 1):
            pos = pos + rng.normal(0, 1.0, pos.shape)
            st = np.where(t - 1 >= death + 1, 3, np.where(t - 1 >= death, 1, 0))
            flick = rng.random(N) < 0.1  # a few per-frame errors of the classifier
            st = np.where(flick, rng.integers(0, 4, N), st)
            out[(well, t)] = (np.arange(N) + 1, pos.copy(), st, np.where(flick, 0.3, 0.9))
    return out


def _counts(well, t, labels, yx, st, cert):
    n = len(labels)
    calls = CellCalls(np.zeros((8, 8)), np.zeros((8, 8), int), labels, st, np.zeros(n, bool), CLASSES, PX,
                      certainty=cert, centroid_yx_px=yx / PX, area_um2=np.full(n, 50.0))
    counts = {c: int((st == i).sum()) for i, c in enumerate(CLASSES)}
    return Counts(FrameKey("dose", well, "1", t), "t", None, PX, "config", n, counts, 0, float(cert.mean()), None,
                  sources=(Path(f"/x/{well}_{t}.tif"),), calls=calls)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fates")
    (root / "plate.csv").write_text("well,compound,concentration,unit,role\n" + "".join(
        f"{w},{'DMSO' if c == 0 else 'drugX'},{c * 1000:g},nM,{'control' if c == 0 else 'treated'}\n" for w, c in DOSES.items()))
    (root / "c.toml").write_text('[service]\nstate_dir = "state"\nexperiment = "dose"\n[tracking]\nplate_map = "plate.csv"\n'
                                 '[[sinks]]\nname = "csv"\n[[sinks]]\nname = "cells"\n')
    cfg = load_config(root / "c.toml")
    csv = CSV.build(CSV.Options(), context_from(cfg, device="cpu"))
    cells = CellTableSink(cfg.service.state_dir / "cells", tracking=LinkParams())
    for (well, t), f in sorted(_frames().items(), key=lambda kv: (kv[0][1], kv[0][0])):
        c = _counts(well, t, *f)
        csv.write(c)
        cells.write(c)
    csv.close()
    return root


def test_export_writes_tracks_and_fates_as_parquet(run, capsys):
    out = run / "fates"
    assert main(["-q", "export", str(run / "c.toml"), "--out", str(run / "counts.csv"), "--fates", str(out)]) == 0
    names = {p.stem for p in out.glob("*.parquet")}
    assert names == {"tracks", "fates", "smoothed_counts", "survival", "dose_response"}
    fates = pd.read_parquet(out / "fates.parquet")
    assert len(fates) == len(DOSES) * N and fates.frames.eq(T).all()  # every cell one track, start to end
    assert not fates[fates.well.isin(["A1", "A2"])].died.any()
    assert fates[fates.well == "A8"].died.sum() >= 0.9 * N * (1 / (1 + (EC50 / 30) ** 2)) - 1
    tracks = pd.read_parquet(out / "tracks.parquet")
    assert {"track_id", "smoothed_state", "p_dead", "time_h"} <= set(tracks.columns)
    smoothed = pd.read_parquet(out / "smoothed_counts.parquet")
    assert {"dead", "smoothed_dead", "live", "smoothed_live"} <= set(smoothed.columns)
    # smoothing: fewer dead-then-live flips than the raw calls
    raw_flips = sm_flips = 0
    for _, g in tracks.sort_values("timepoint").groupby(["well", "track_id"]):
        raw_flips += int(((g.state.shift() == "dead") & (g.state == "live")).sum())
        sm_flips += int(((g.smoothed_state.shift() == "dead") & (g.smoothed_state == "live")).sum())
    assert raw_flips > 0 and sm_flips == 0
    surv = pd.read_parquet(out / "survival.parquet").set_index("well")
    assert surv.loc["A8", "logrank_p"] < 0.01 and surv.loc["A1", "logrank_note"] == "control well"
    dr = pd.read_parquet(out / "dose_response.parquet")
    last = dr[(dr.timepoint == T) & (dr.measure == "dead")].iloc[0]
    assert last.ok and last.unit == "uM" and last.ec50 == pytest.approx(EC50, rel=0.3)
    assert (dr[~dr.ok].reason.str.len() > 0).all()


def test_report_shows_tracks_survival_ec50_and_dose_response(run):
    out = run / "report"
    assert main(["-q", "report", str(run / "c.toml"), "--out", str(out), "--no-gallery"]) == 0
    page = (out / "dose.html").read_text()
    for anchor in ("id='tracks'", "id='survival'", "id='ec50'", "id='dose'"):
        assert anchor in page
    assert "Kaplan-Meier" in page and "EC50" in page
    assert (out / "data" / "dose" / "dose_response.csv").is_file()
    dr = pd.read_csv(out / "data" / "dose" / "dose_response.csv")
    assert set(dr.compound) == {"drugX"}


def test_report_without_tracks_says_why(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "counts.csv").write_text("experiment,well,field,timepoint,n_cells,n_live,frac_live\ne,A1,1,1,2,2,1.0\n")
    assert main(["-q", "report", str(tmp_path / "state" / "counts.csv"), "--out", str(tmp_path / "r")]) == 0
    assert "No tracks: no per-cell table" in (tmp_path / "r" / "e.html").read_text()
