"""monitor.fate: tracking, one-way smoothing, survival, plate map, dose response, on hand-made data."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("laptrack")

from monitor.fate.doseresponse import fit_dose_response, logistic4  # noqa: E402
from monitor.fate.fates import dose_response, smooth_cells, well_survival  # noqa: E402
from monitor.fate.platemap import PlateMapFile, parse_plate_map, well_name  # noqa: E402
from monitor.fate.smoothing import HMMParams, smooth_track  # noqa: E402
from monitor.fate.survival import kaplan_meier, log_rank, median_time  # noqa: E402
from monitor.fate.tracking import FieldTracks, LinkParams, Sealed, link_all, track_id_of  # noqa: E402


def _field(n=30, frames=8, seed=0, step=2.0):
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, 600, (n, 2))
    out = {}
    for t in range(frames):
        pos = pos + rng.normal(0, step, pos.shape)
        perm = rng.permutation(n)  # labels differ frame to frame, as a segmenter's do
        out[t] = (perm + 1, pos.copy())
    return out  # row i of every frame is the same true cell


def _truth_links(frames):
    ts = sorted(frames)
    return [((a, int(frames[a][0][i])), (b, int(frames[b][0][i]))) for a, b in zip(ts, ts[1:], strict=False)
            for i in range(len(frames[a][0]))]


# -- tracking ----------------------------------------------------------------------------------
def test_every_true_link_is_kept_and_ids_name_the_first_cell():
    frames = _field()
    ft = link_all(frames)
    ids = ft.track_ids()
    assert all(ids[a] == ids[b] for a, b in _truth_links(frames))
    assert len(set(ids.values())) == 30
    assert set(ids.values()) == {track_id_of(0, int(lab)) for lab in frames[0][0]}


def test_late_and_out_of_order_frames_give_the_same_tracks():
    frames = _field(seed=1)
    in_order = link_all(frames)
    shuffled = link_all(frames, order=[0, 2, 3, 1, 7, 5, 6, 4])
    assert shuffled.links == in_order.links
    assert shuffled.track_ids() == in_order.track_ids()


def test_a_late_frame_reports_every_frame_it_changed():
    frames = _field(seed=2)
    ft = link_all({t: frames[t] for t in frames if t != 0})
    changed = ft.add(0, *frames[0])  # every track now starts a frame earlier: all renamed
    assert changed == set(frames)


def test_a_cell_missing_for_one_frame_keeps_its_track():
    frames = _field(seed=3)
    labels, yx = frames[4]
    gone = int(labels[5])
    frames[4] = (np.delete(labels, 5), np.delete(yx, 5, axis=0))
    ids = link_all(frames).track_ids()
    before, after = int(frames[3][0][5]), int(frames[5][0][5])
    assert ids[(3, before)] == ids[(5, after)]
    assert (4, gone) not in ids


def test_a_missing_frame_is_bridged():
    frames = _field(seed=4)
    del frames[3]
    ids = link_all(frames).track_ids()
    assert all(ids[(2, int(frames[2][0][i]))] == ids[(4, int(frames[4][0][i]))] for i in range(30))


def test_a_division_starts_two_daughter_tracks_with_their_mother():
    frames = _field(n=10, seed=5, step=1.0)
    for t in range(4, 8):
        labels, yx = frames[t]
        yx = yx.copy()
        c = yx[0].copy()
        yx[0] = c + [0, 5]
        frames[t] = (np.append(labels, 500), np.vstack([yx, c - [0, 5]]))
    ft = link_all(frames)
    ids = ft.track_ids()
    mother = ids[(3, int(frames[3][0][0]))]
    daughters = {ids[(4, int(frames[4][0][0]))], ids[(4, 500)]}
    assert mother not in daughters and len(daughters) == 2
    assert ft.parents() == {d: mother for d in daughters}


def test_a_restart_from_recorded_rows_continues_the_same_tracks():
    frames = _field(seed=6)
    live = link_all({t: frames[t] for t in range(5)})
    rows = []
    for t in range(5):
        cols = live.frame_columns(t, frames[t][0])
        for i, lab in enumerate(frames[t][0]):
            rows.append((t, int(lab), *frames[t][1][i], cols["link_timepoint"][i], cols["link_label"][i]))
    t_, lab, y, x, lt, ll = zip(*rows, strict=True)
    restarted = FieldTracks.from_rows(t_, lab, y, x, lt, ll)
    for t in range(5, 8):
        restarted.add(t, *frames[t])
        live.add(t, *frames[t])
    assert restarted.track_ids() == live.track_ids() == link_all(frames).track_ids()


def test_cells_farther_than_the_step_are_not_linked():
    frames = {0: (np.array([1]), np.array([[0.0, 0.0]])), 1: (np.array([1]), np.array([[0.0, 100.0]]))}
    ft = link_all(frames, LinkParams(max_step_um=25))
    assert ft.links == {}


# -- smoothing ---------------------------------------------------------------------------------
def test_smoothing_makes_death_one_way_and_dates_it():
    times = np.arange(10.0)
    calls = ["live", "live", "dead", "live", "live", "apoptotic", "apoptotic", "dead", "dead", "live"]
    sm = smooth_track(times, calls, [0.6] * 10)
    order = {"live": 0, "apoptotic": 1, "dead": 2}
    assert [order[s] for s in sm.path] == sorted(order[s] for s in sm.path)  # never backwards
    assert sm.path[:5] == ("live",) * 5 and sm.path[-1] == "dead"
    assert sm.onset_apoptosis_h == 5.0 and sm.death_h == 7.0
    assert np.allclose(sm.posterior.sum(axis=1), 1.0)


def test_a_cell_that_stays_alive_has_no_time_of_death():
    sm = smooth_track(np.arange(6.0), ["live"] * 6, [0.9] * 6)
    assert sm.path == ("live",) * 6 and np.isnan(sm.death_h) and np.isnan(sm.onset_apoptosis_h)


def test_necrosis_is_its_own_absorbing_branch():
    sm = smooth_track(np.arange(6.0), ["live", "live", "necrotic", "necrotic", "dead", "necrotic"], [0.9] * 6)
    assert sm.path == ("live", "live", "necrotic", "necrotic", "necrotic", "necrotic")
    assert sm.death_h == 2.0


def test_uncertain_calls_weigh_less_than_certain_ones():
    calls = ["live", "live", "live", "dead", "live", "live"]
    assert smooth_track(np.arange(6.0), calls, [0.9, 0.9, 0.9, 0.05, 0.9, 0.9]).path[3] == "live"
    sure = smooth_track(np.arange(6.0), ["live", "live", "live", "dead", "dead", "dead"], [0.9] * 6)
    assert sure.path[3:] == ("dead",) * 3


# -- survival ----------------------------------------------------------------------------------
def test_kaplan_meier_by_hand():
    km = kaplan_meier([1, 2, 2, 3, 4], [True, True, False, True, False])
    assert np.allclose(km.times_h, [0, 1, 2, 3])
    assert np.allclose(km.survival, [1.0, 0.8, 0.6, 0.3])
    assert np.all(km.lower <= km.survival) and np.all(km.survival <= km.upper)
    assert median_time(km).median_h == 3.0


def test_median_not_reached_is_nan():
    assert np.isnan(median_time(kaplan_meier([5, 6, 7], [True, False, False])).median_h)


def test_log_rank_by_hand():
    lr = log_rank([1, 2], [True, True], [3, 4], [True, True])
    assert lr.observed == 2 and lr.expected == pytest.approx(5 / 6)
    assert lr.chi2 == pytest.approx((2 - 5 / 6) ** 2 / (0.25 + 2 / 9))
    same = log_rank([1, 2, 3], [True] * 3, [1, 2, 3], [True] * 3)
    assert same.chi2 == pytest.approx(0.0) and same.p_value == pytest.approx(1.0)


# -- plate map ---------------------------------------------------------------------------------
def test_plate_map_reads_units_and_controls(tmp_path):
    p = tmp_path / "plate.csv"
    p.write_text("well,compound,concentration,unit,role\nA01,DMSO,0,uM,control\nA2,stauro,100,nM,treated\n"
                 "a3,stauro,1 uM,,treated\nA4,stauro,10,µM,\n")
    pm = parse_plate_map(p)
    assert pm.errors == ()
    assert pm.controls() == ["A1"] and pm.compounds() == ["stauro"]
    assert [pm.wells[w].concentration for w in ("A2", "A3", "A4")] == pytest.approx([0.1, 1.0, 10.0])
    assert well_name("b07") == "B7"


def test_plate_map_bad_rows_are_one_line_each(tmp_path):
    p = tmp_path / "plate.csv"
    p.write_text("well,compound,concentration,unit,role\nA1,X,1,uM,\nA1,X,2,uM,\nA2,X,lots,uM,\n"
                 "A3,Y,1,uM,\nA4,Y,5,ug/mL,\nA5,X,3,furlongs,\nA6,X,4,uM,\n")
    pm = parse_plate_map(p)
    assert len(pm.errors) == 4, pm.errors
    assert f"{p}:row 3: well A1 is named twice" in pm.errors[0]
    assert f"{p}:row 4: concentration is not a number (got 'lots')" == pm.errors[1]
    assert "unknown unit" in pm.errors[2] and "row 7" in pm.errors[2]
    assert "compound Y mixes units" in pm.errors[3]
    assert sorted(pm.wells) == ["A1", "A6"]  # the good rows stay; Y's wells are left out


def test_plate_map_is_reread_when_edited(tmp_path, caplog):
    p = tmp_path / "plate.csv"
    p.write_text("well,compound,concentration\nA1,X,1 uM\n")
    pf = PlateMapFile(p)
    assert list(pf.current().wells) == ["A1"]
    p.write_text("well,compound,concentration\nA1,X,1 uM\nA2,X,2 uM\n")
    st = p.stat()
    os.utime(p, (st.st_atime, time.time() + 5))
    with caplog.at_level(logging.INFO):
        assert list(pf.current().wells) == ["A1", "A2"]
    assert "re-read" in caplog.text
    p.unlink()
    assert list(pf.current().wells) == ["A1", "A2"]  # a vanished map keeps the last one
    caplog.clear()
    later = PlateMapFile(tmp_path / "not-yet.csv")
    with caplog.at_level(logging.INFO):
        assert later.current().wells == {} and later.current().wells == {}
    assert caplog.text.count("no such file") == 1  # said once, not per frame


# -- dose response -----------------------------------------------------------------------------
def test_four_parameter_fit_recovers_ec50():
    conc = np.array([0, 0, 0.1, 0.3, 1, 3, 10, 30, 100.0])
    y = logistic4(conc, 0.05, 0.9, np.log10(2.5), 1.3) + np.random.default_rng(0).normal(0, 0.01, len(conc))
    fit = fit_dose_response(conc, y)
    assert fit.ok, fit.reason
    assert fit.ec50 == pytest.approx(2.5, rel=0.1)
    assert fit.ec50_low < fit.ec50 < fit.ec50_high


@pytest.mark.parametrize(("conc", "y", "why"), [
    ([0, 1, 10], [0, 0.5, 1], "too few concentrations"),
    ([0, 1, 10, 100], [0.1, 0.1, 0.12, 0.11], "no response"),
    ([0, 1, 10, 100, 1000], [0.1, 0.9, 0.9, 0.9, 0.9], "outside the tested range"),
])
def test_bad_fits_say_why(conc, y, why):
    fit = fit_dose_response(conc, y)
    assert not fit.ok and why in fit.reason


# -- fates end to end ------------------------------------------------------------------------
def _cells_table():
    rows = []
    # well A1 control: 4 cells stay alive; wells A2..A5: cells die at dose-dependent times
    for w, death in (("A1", None), ("A2", 8), ("A3", 6), ("A4", 4), ("A5", 2)):
        for c in range(4):
            for t in range(10):
                dead = death is not None and t >= death + c % 2
                rows.append({"experiment": "e", "well": w, "field": "1", "timepoint": t, "acquired_at": None,
                             "label": c + 1, "state": "dead" if dead else "live", "certainty": 0.8, "unknown": False,
                             "track_id": track_id_of(0, c + 1), "parent_track_id": np.nan})
    return pd.DataFrame(rows)


def test_smooth_cells_gives_fates_counts_survival_and_dose_response(tmp_path):
    fates = smooth_cells(_cells_table())
    assert fates.time_basis == "timepoint"
    a5 = fates.tracks[fates.tracks.well == "A5"]
    assert sorted(a5.death_h) == [2, 2, 3, 3] and a5.died.all()
    assert not fates.tracks[fates.tracks.well == "A1"].died.any()
    last = fates.smoothed_counts[(fates.smoothed_counts.well == "A3") & (fates.smoothed_counts.timepoint == 9)]
    assert int(last.smoothed_dead.iloc[0]) == 4 and int(last.dead.iloc[0]) == 4
    p = tmp_path / "plate.csv"
    p.write_text("well,compound,concentration,unit,role\nA1,DMSO,0,uM,control\nA2,X,1,uM,\nA3,X,3,uM,\nA4,X,10,uM,\nA5,X,30,uM,\n")
    pm = parse_plate_map(p)
    surv = well_survival(fates.tracks, pm).set_index("well")
    assert surv.loc["A5", "median_ttd_h"] == 2.0 and surv.loc["A1", "logrank_note"] == "control well"
    assert surv.loc["A5", "logrank_p"] < 0.05
    dr = dose_response(fates.smoothed_counts, pm)
    assert set(dr.measure) == {"dead", "apoptotic+dead"} and len(dr) == 20
    assert not dr[dr.timepoint == 0].ok.any()  # nothing has died yet: the reason is given
    assert (dr[dr.timepoint == 0].reason.str.len() > 0).all()


def test_a_field_smoothed_at_once_equals_each_track_smoothed_alone():
    from monitor.fate.smoothing import STATES, smooth_field

    rng = np.random.default_rng(0)
    m, n = 12, 60
    times = np.cumsum(rng.uniform(0.5, 2, m))  # uneven intervals
    calls = rng.integers(-1, 4, (n, m))  # -1: a call that carries no information
    present = rng.random((n, m)) > 0.15  # frames a track is missing from
    for i in range(n):
        a, b = sorted(rng.integers(0, m, 2))
        present[i, :a] = present[i, b + 1:] = False  # tracks start and end anywhere
    cert, unk = rng.uniform(0, 1, (n, m)), rng.random((n, m)) < 0.1
    f = smooth_field(times, calls, cert, present, unknown=unk)
    for i in range(n):
        ix = np.nonzero(present[i])[0]
        if not len(ix):
            continue
        one = smooth_track(times[ix], [STATES[j] if j >= 0 else "other" for j in calls[i, ix]], cert[i, ix], unknown=unk[i, ix])
        assert tuple(STATES[j] for j in f.path[i, ix]) == one.path
        assert np.allclose(f.posterior[i, ix], one.posterior)
        assert np.array_equal([f.death_h[i], f.onset_apoptosis_h[i]], [one.death_h, one.onset_apoptosis_h], equal_nan=True)


def test_unknown_calls_count_for_less_but_a_run_of_them_still_counts():
    calls = ["live"] * 4 + ["dead"] + ["live"] * 3
    unknown = [False] * 4 + [True] + [False] * 3
    assert smooth_track(np.arange(8.0), calls, [1.0] * 8, unknown=unknown).path == ("live",) * 8
    run = ["live"] * 3 + ["dead"] * 5
    sm = smooth_track(np.arange(8.0), run, [1.0] * 8, unknown=[False] * 3 + [True] * 5)
    assert sm.path[-1] == "dead" and sm.death_h <= 4.0
    ignored = smooth_track(np.arange(8.0), run, [1.0] * 8, HMMParams(unknown_weight=0.0), unknown=[False] * 3 + [True] * 5)
    assert ignored.path == ("live",) * 8  # with the flag's calls ignored, nothing says the cell died


def test_the_fates_store_refits_when_the_plate_map_is_edited(tmp_path, caplog):
    from monitor.fate.store import FateStore

    cells = _cells_table()
    plate = tmp_path / "plate.csv"
    plate.write_text("well,compound,concentration,unit,role\nA1,DMSO,0,uM,control\nA2,X,1,uM,\nA3,X,3,uM,\nA4,X,10,uM,\nA5,X,30,uM,\n")
    store = FateStore(tmp_path / "fates.sqlite", plate_map=plate)
    for w in ("A1", "A2", "A3", "A4", "A5"):
        store.update(cells[cells.well == w])
    import sqlite3

    def compounds():
        with sqlite3.connect(tmp_path / "fates.sqlite") as db:
            return {r[0] for r in db.execute("SELECT DISTINCT compound FROM dose_response")}

    assert compounds() == {"X"}
    # the lab renames the compound while the service runs (and leaves a bad row): re-read, logged
    plate.write_text("well,compound,concentration,unit,role\nA1,DMSO,0,uM,control\nA2,Y,1,uM,\nA3,Y,3,uM,\nA4,Y,10,uM,\nA5,Y,30,uM,\nA6,Y,lots,uM,\n")
    st = plate.stat()
    os.utime(plate, (st.st_atime, st.st_mtime + 5))
    with caplog.at_level(logging.INFO):
        store.update(cells[cells.well == "A5"])
    assert "Y" in compounds()
    assert "re-read" in caplog.text and "concentration is not a number (got 'lots')" in caplog.text


@pytest.mark.filterwarnings("ignore:The confidence interval is undefined")
def test_kaplan_meier_and_log_rank_agree_with_scipy():
    from scipy import stats

    if not hasattr(stats, "logrank"):
        pytest.skip("scipy < 1.11 has no logrank")
    rng = np.random.default_rng(3)
    ta, tb = rng.integers(1, 20, 40).astype(float), rng.integers(3, 25, 35).astype(float)
    da, db = rng.random(40) < 0.7, rng.random(35) < 0.6
    km = kaplan_meier(ta, da)
    ref = stats.ecdf(stats.CensoredData(uncensored=ta[da], right=ta[~da])).sf
    assert np.allclose(km.survival[1:], ref.evaluate(km.times_h[1:]))
    ci = ref.confidence_interval(0.95, method="log-log")
    inside = (km.survival[1:] > 0) & (km.survival[1:] < 1)
    assert np.allclose(km.lower[1:][inside], ci.low.evaluate(km.times_h[1:])[inside], atol=1e-6)
    assert np.allclose(km.upper[1:][inside], ci.high.evaluate(km.times_h[1:])[inside], atol=1e-6)
    mine = log_rank(ta, da, tb, db)
    theirs = stats.logrank(stats.CensoredData(uncensored=ta[da], right=ta[~da]), stats.CensoredData(uncensored=tb[db], right=tb[~db]))
    assert mine.p_value == pytest.approx(theirs.pvalue, rel=1e-6)


def test_two_experiments_on_the_same_wells_are_never_pooled(tmp_path):
    a = _cells_table()
    b = _cells_table().assign(experiment="f", state="live")  # a second plate where nothing dies
    fates = smooth_cells(pd.concat([a, b], ignore_index=True))
    p = tmp_path / "plate.csv"
    p.write_text("well,compound,concentration,unit,role\nA1,DMSO,0,uM,control\nA2,X,1,uM,\nA3,X,3,uM,\nA4,X,10,uM,\nA5,X,30,uM,\n")
    pm = parse_plate_map(p)
    surv = well_survival(fates.tracks, pm).set_index(["experiment", "well"])
    assert surv.loc[("e", "A5"), "deaths"] == 4 and surv.loc[("f", "A5"), "deaths"] == 0
    dr = dose_response(fates.smoothed_counts, pm)
    last = dr[(dr.timepoint == 9) & (dr.measure == "dead")].set_index("experiment")
    assert last.loc["e", "ok"] and not last.loc["f", "ok"] and "no response" in last.loc["f", "reason"]


def _lineage(n=30, frames=40, seed=0):
    """Cells that drift, vanish for a frame now and then, and divide every fifth frame."""
    rng = np.random.default_rng(seed)
    pos, labs, nxt, out = rng.uniform(20, 380, (n, 2)), list(range(1, n + 1)), n + 1, {}
    for t in range(1, frames + 1):
        pos = pos + rng.normal(0, 2.0, pos.shape)
        keep = rng.random(len(pos)) > 0.05
        if t % 5 == 0:
            pos, labs, nxt = np.vstack([pos, pos[:1] + 3]), [*labs, nxt], nxt + 1
            keep = np.append(keep, True)
        out[t] = (np.array(labs)[keep], pos[keep].copy())
    return out


def _columns(ft, t, labels):
    return {k: np.array(v, float) for k, v in ft.frame_columns(t, labels).items()}


def test_a_sealed_tracker_writes_the_same_rows_and_holds_only_its_window():
    """Sealing (a run of weeks keeps a window) changes no track id, mother or link of any row the
    sink writes, for frames in order and frames a little late; it holds only the window."""
    frames = _lineage()
    order = [t for t in sorted(frames) if t != 33] + [33]  # 33 arrives after 40 (late, inside the window)
    full, sealed = FieldTracks(LinkParams()), FieldTracks(LinkParams())
    for t in order:
        full.add(t, *frames[t])
        sealed.add(t, *frames[t])
        want, got = _columns(full, t, frames[t][0]), _columns(sealed, t, frames[t][0])
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} at t{t}")
        sealed.seal(max(sealed.frames) - 12 + 1)
        assert len(sealed.frames) <= 12 and all(c[0] >= (sealed.sealed_before or 0) for c in sealed.links)
    assert any(tid in full.parents() for tid in sealed.track_ids().values())  # daughters kept their mothers
    for t in sealed.frames:  # every kept frame as the unbounded tracker has it
        want, got = _columns(full, t, frames[t][0]), _columns(sealed, t, frames[t][0])
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} at t{t}")


def test_a_sealed_tracker_refuses_a_frame_whose_neighbours_it_dropped():
    frames = _lineage(frames=20)
    ft = FieldTracks(LinkParams(max_gap=1))
    for t in range(1, 21):
        if t != 15:
            ft.add(t, *frames[t])
    ft.seal(14)
    assert not ft.accepts(15) and ft.accepts(16)  # 15 links to 14 and 13 (max_gap 1): 13 is gone
    with pytest.raises(Sealed, match="older than this field's tracker holds"):
        ft.add(15, *frames[15])
