"""From the recorded per-cell table to fates: smoothed states, per-cell times, survival per
well and dose response per compound, as plain pandas tables.

The per-cell table (the cells sink's rows, with ``track_id``) is the input; the
raw per-frame calls in it stay the record of truth. Everything here is derived,
and every derived column says so (``smoothed_*``).

Policy
------
* Time: hours since the experiment's first acquisition when every row of a
  field has ``acquired_at``; otherwise ``timepoint * interval_h`` (the report
  says which).
* A track is smoothed as one cell (:func:`monitor.fate.smoothing.smooth_field`: every
  track of a field at once, equal to ``smooth_track`` on each).
  A daughter track starts at its division with the model's start
  probabilities: a mother's death is not inherited.
* Survival (per well): a track's time is its time of death, or its last time
  seen, censored. Tracks seen in one frame only carry no follow-up and are
  left out. The log-rank test compares each well with the pooled control
  wells of the plate map (none: not done, said in ``logrank_note``).
* Dose response (per compound and timepoint, smoothed states): the dead
  fraction (dead + necrotic) and the apoptotic + dead fraction per well,
  the control wells at concentration 0 (:func:`monitor.fate.doseresponse.fit_dose_response`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.fate.doseresponse import fit_dose_response
from monitor.fate.platemap import PlateMap
from monitor.fate.smoothing import STATES, HMMParams, smooth_field
from monitor.fate.survival import kaplan_meier, log_rank, median_time
from monitor.readkit import well_name

_KEYS = ["experiment", "well", "field"]


@dataclass(frozen=True)
class Fates:
    """Derived tables: ``cells`` (the input rows with ``time_h`` and ``smoothed_state``),
    ``tracks`` (one row per track: well, first/last time, onset of apoptosis, time of
    death, died), ``smoothed_counts`` (per frame: ``smoothed_<state>`` counts beside the
    raw ``<state>`` counts) and ``time_basis`` (``acquired_at`` or ``timepoint``)."""

    cells: Any
    tracks: Any
    smoothed_counts: Any
    time_basis: str


def add_time_h(cells: Any, interval_h: float = 1.0) -> tuple[Any, str]:
    """The table with ``time_h`` (module docstring) and which basis was used."""
    import pandas as pd

    df = cells.copy()
    stamps = pd.to_datetime(df["acquired_at"], errors="coerce", utc=True) if "acquired_at" in df else None
    if stamps is not None and len(df) and stamps.notna().all() and stamps.nunique() > 1:
        t0 = stamps.groupby(df["experiment"]).transform("min")
        df["time_h"] = (stamps - t0).dt.total_seconds() / 3600.0
        return df, "acquired_at"
    df["time_h"] = df["timepoint"].astype(float) * float(interval_h)
    return df, "timepoint"


def smooth_cells(cells: Any, params: HMMParams | None = None, interval_h: float = 1.0) -> Fates:
    """Smooth every track of a per-cell table and summarise it (module docstring)."""
    import pandas as pd

    df, basis = add_time_h(cells, interval_h)
    df = df.sort_values([*_KEYS, "timepoint", "label"], kind="stable").reset_index(drop=True)
    smoothed = df["state"].astype(str).to_numpy(dtype=object)
    post = np.full((len(df), len(STATES)), np.nan)
    rows = []
    if "track_id" in df and len(df):
        index = {s: i for i, s in enumerate(STATES)}
        parents = df["parent_track_id"].to_numpy(float) if "parent_track_id" in df else np.full(len(df), np.nan)
        unk_all = df["unknown"].astype(bool).to_numpy() if "unknown" in df else np.zeros(len(df), bool)
        raw_states = df["state"].astype(str).to_numpy()
        tracked = df[df["track_id"].notna()]
        for (exp, well, fld), g in tracked.groupby(_KEYS, sort=True):
            # the field's timeline, and one row per track on it (all tracks smoothed at once)
            tps = np.sort(g["timepoint"].unique())
            col = {int(tp): i for i, tp in enumerate(tps)}
            times = g.groupby("timepoint")["time_h"].first().reindex(tps).to_numpy(float)
            tids, row_of = np.unique(g["track_id"].to_numpy(np.int64), return_inverse=True)
            cols = np.array([col[int(tp)] for tp in g["timepoint"]], dtype=np.int64)
            shape = (len(tids), len(tps))
            calls, cert = np.full(shape, -1, np.int64), np.zeros(shape)
            present, unk = np.zeros(shape, bool), np.zeros(shape, bool)
            where = g.index.to_numpy()
            calls[row_of, cols] = g["state"].astype(str).map(index).fillna(-1).to_numpy(np.int64)
            cert[row_of, cols] = g["certainty"].astype(float).to_numpy()
            present[row_of, cols] = True
            unk[row_of, cols] = unk_all[where]
            sm = smooth_field(times, calls, cert, present, params, unk)
            row_idx = np.full(shape, -1, np.int64)
            row_idx[row_of, cols] = where
            smoothed[where] = [STATES[j] for j in sm.path[row_of, cols]]
            post[where] = sm.posterior[row_of, cols]
            for r, tid in enumerate(tids):
                seen = np.nonzero(present[r])[0]
                i0, i1 = seen[0], seen[-1]
                first_row, last_row = row_idx[r, i0], row_idx[r, i1]
                rows.append({"experiment": exp, "well": well, "field": fld, "track_id": int(tid),
                             "parent_track_id": parents[first_row], "first_h": float(times[i0]), "last_h": float(times[i1]),
                             "frames": len(seen), "first_timepoint": int(tps[i0]), "last_timepoint": int(tps[i1]),
                             "onset_apoptosis_h": float(sm.onset_apoptosis_h[r]), "death_h": float(sm.death_h[r]),
                             "died": bool(np.isfinite(sm.death_h[r])), "fate": STATES[int(sm.path[r, i1])],
                             "raw_last_state": str(raw_states[last_row])})
    df["smoothed_state"] = smoothed
    for j, s in enumerate(STATES):
        df[f"p_{s}"] = post[:, j]
    tracks = pd.DataFrame(rows, columns=["experiment", "well", "field", "track_id", "parent_track_id", "first_h", "last_h",
                                         "frames", "first_timepoint", "last_timepoint", "onset_apoptosis_h", "death_h",
                                         "died", "fate", "raw_last_state"])
    frame_keys = [*_KEYS, "timepoint"]
    counts = None
    for prefix, column in (("", "state"), ("smoothed_", "smoothed_state")):
        n = df.groupby([*frame_keys, column], sort=True).size().unstack(fill_value=0) if len(df) else None
        part = pd.DataFrame({f"{prefix}{s}": (n[s] if n is not None and s in n else 0) for s in STATES},
                            index=n.index if n is not None else pd.MultiIndex.from_tuples([], names=frame_keys))
        counts = part if counts is None else counts.join(part, how="outer").fillna(0)
    assert counts is not None
    counts = counts[[c for s in STATES for c in (s, f"smoothed_{s}")]].astype(int)
    counts = counts.reset_index()
    return Fates(df, tracks, counts, basis)


def well_survival(tracks: Any, plate: PlateMap | None = None) -> Any:
    """Per experiment and well: tracks followed, deaths, median time to death with its 95%
    interval, and the log-rank test against the experiment's pooled control wells (module
    docstring)."""
    import pandas as pd

    parts = [_well_survival(g, plate).assign(experiment=exp) for exp, g in tracks.groupby("experiment", sort=True)] \
        if len(tracks) and "experiment" in tracks else [_well_survival(tracks, plate).assign(experiment="")]
    out = pd.concat(parts, ignore_index=True)
    return out[["experiment", *[c for c in out.columns if c != "experiment"]]]


def _well_survival(tracks: Any, plate: PlateMap | None) -> Any:
    import pandas as pd

    t = tracks[tracks["frames"] > 1] if len(tracks) else tracks
    controls = {w for w in (plate.controls() if plate else [])}
    ctl = t[t["well"].map(well_name).isin(controls)] if len(t) else t
    rows = []
    for well, g in (t.groupby("well", sort=True) if len(t) else []):
        dur = np.where(g["died"], g["death_h"] - g["first_h"], g["last_h"] - g["first_h"])
        km = kaplan_meier(dur, g["died"].to_numpy(bool))
        med = median_time(km)
        info = plate.wells.get(well_name(str(well))) if plate else None
        row = {"well": well, "compound": info.compound if info else "", "concentration": info.concentration if info else np.nan,
               "unit": info.unit if info else "", "role": info.role if info else "", "tracks": km.n, "deaths": km.events,
               "median_ttd_h": med.median_h, "median_ttd_low_h": med.lower_h, "median_ttd_high_h": med.upper_h,
               "logrank_chi2": np.nan, "logrank_p": np.nan, "logrank_note": ""}
        if not controls:
            row["logrank_note"] = "no control wells in the plate map"
        elif info is not None and info.control:
            row["logrank_note"] = "control well"
        elif len(ctl) == 0:
            row["logrank_note"] = "the control wells have no tracks"
        else:
            cdur = np.where(ctl["died"], ctl["death_h"] - ctl["first_h"], ctl["last_h"] - ctl["first_h"])
            lr = log_rank(dur, g["died"].to_numpy(bool), cdur, ctl["died"].to_numpy(bool))
            row["logrank_chi2"], row["logrank_p"] = lr.chi2, lr.p_value
            if not np.isfinite(lr.chi2):
                row["logrank_note"] = "no deaths to compare"
        rows.append(row)
    return pd.DataFrame(rows, columns=["well", "compound", "concentration", "unit", "role", "tracks", "deaths",
                                       "median_ttd_h", "median_ttd_low_h", "median_ttd_high_h",
                                       "logrank_chi2", "logrank_p", "logrank_note"])


def survival_curves(tracks: Any) -> dict[str, Any]:
    """Kaplan-Meier curve per well (for the report's figure)."""
    t = tracks[tracks["frames"] > 1] if len(tracks) else tracks
    out = {}
    for well, g in (t.groupby("well", sort=True) if len(t) else []):
        dur = np.where(g["died"], g["death_h"] - g["first_h"], g["last_h"] - g["first_h"])
        out[str(well)] = kaplan_meier(dur, g["died"].to_numpy(bool))
    return out


def well_fractions(counts: Any, prefix: str = "smoothed_") -> Any:
    """Per well and timepoint: cells, the dead fraction and the apoptotic + dead fraction
    (from the ``smoothed_`` counts by default; ``prefix=""`` for the raw ones)."""
    keys = ["experiment", "well", "timepoint"] if "experiment" in counts else ["well", "timepoint"]
    g = counts.groupby(keys, sort=True)[[f"{prefix}{s}" for s in STATES]].sum()
    total = g.sum(axis=1)
    out = g.assign(cells=total)
    dead = g[f"{prefix}dead"] + g[f"{prefix}necrotic"]
    out["dead_fraction"] = (dead / total.where(total > 0)).astype(float)
    out["apoptotic_dead_fraction"] = ((dead + g[f"{prefix}apoptotic"]) / total.where(total > 0)).astype(float)
    return out.reset_index()


def dose_response(counts: Any, plate: PlateMap, prefix: str = "smoothed_") -> Any:
    """One row per experiment, compound, timepoint and measure (``dead`` or
    ``apoptotic+dead``): the 4PL fit, EC50 with its interval, and the reason when the fit is
    not usable."""
    import pandas as pd

    parts = [_dose_response(g, plate, prefix).assign(experiment=exp) for exp, g in counts.groupby("experiment", sort=True)] \
        if len(counts) and "experiment" in counts else [_dose_response(counts, plate, prefix).assign(experiment="")]
    out = pd.concat(parts, ignore_index=True)
    return out[["experiment", *[c for c in out.columns if c != "experiment"]]]


def _dose_response(counts: Any, plate: PlateMap, prefix: str) -> Any:
    import pandas as pd

    fr = well_fractions(counts, prefix)
    fr["well_key"] = fr["well"].map(lambda w: well_name(str(w)))
    rows = []
    controls = set(plate.controls())
    unit_of = {x.compound: x.unit for x in plate.wells.values()}
    for compound in plate.compounds():
        wells = {w for w, x in plate.wells.items() if x.compound == compound} | controls
        sub = fr[fr["well_key"].isin(wells)]
        missing = sorted(w for w in wells if w not in set(fr["well_key"]))
        for tp, g in sub.groupby("timepoint", sort=True):
            conc = g["well_key"].map(lambda w: 0.0 if w in controls else plate.wells[w].concentration).to_numpy(float)
            for measure, col in (("dead", "dead_fraction"), ("apoptotic+dead", "apoptotic_dead_fraction")):
                fit = fit_dose_response(conc, g[col].to_numpy(float), g["cells"].to_numpy(float))
                rows.append({"compound": compound, "unit": unit_of.get(compound, ""), "timepoint": int(tp), "measure": measure,
                             "wells": int(len(g)), "ec50": fit.ec50, "ec50_low": fit.ec50_low, "ec50_high": fit.ec50_high,
                             "hill": fit.hill, "bottom": fit.bottom, "top": fit.top, "ok": fit.ok, "reason": fit.reason,
                             "missing_wells": ";".join(missing)})
    return pd.DataFrame(rows, columns=["compound", "unit", "timepoint", "measure", "wells", "ec50", "ec50_low", "ec50_high",
                                       "hill", "bottom", "top", "ok", "reason", "missing_wells"])


def hmm_params(tracking: Any) -> HMMParams:
    """The smoothing model of a ``[tracking]`` table (defaults when None)."""
    if tracking is None:
        return HMMParams()
    return HMMParams(apoptosis_per_h=tracking.apoptosis_per_h, death_per_h=tracking.death_per_h,
                     necrosis_per_h=tracking.necrosis_per_h, accuracy=tracking.accuracy,
                     unknown_weight=tracking.unknown_weight)


def fate_tables(cells: Any, tracking: Any = None, plate: PlateMap | None = None) -> dict[str, Any]:
    """Every derived table, by name, from a per-cell table with tracks: ``tracks`` (each row
    with ``time_h``, ``smoothed_state`` and the state posteriors), ``fates`` (one row per
    track), ``smoothed_counts`` (per frame, raw and ``smoothed_`` counts), ``survival`` (per
    well) and, with a plate map, ``dose_response`` (per compound, timepoint and measure).
    What ``cellmonitor export --fates`` writes and the report draws."""
    f = smooth_cells(cells, hmm_params(tracking), tracking.interval_h if tracking is not None else 1.0)
    out = {"tracks": f.cells, "fates": f.tracks, "smoothed_counts": f.smoothed_counts,
           "survival": well_survival(f.tracks, plate)}
    if plate is not None and plate.wells:
        out["dose_response"] = dose_response(f.smoothed_counts, plate)
    return out
