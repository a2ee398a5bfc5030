"""The numbers behind the report's figures, from the counts CSV (the record of truth).

Policy:

- Classes are the names with both an ``n_<class>`` and a ``frac_<class>``
  column; canonical states come from the ``state_<state>`` columns.
- A well's value at a timepoint pools its fields: counts are summed and
  fractions are recomputed from the sums (a field with many cells weighs
  more); the control area fraction is the mean over the fields.
- Time is hours since the experiment's first acquisition when every row has
  an ``acquired_at``; otherwise the timepoint number (and the axis says so).
- The death fraction is the share of cells whose canonical state is in
  ``death_states`` (default apoptotic + dead, the states the Apo-15 control
  marks).
- Columns the report does not know (added by a newer service: ``n_unknown``,
  ``index_version``, marker agreement ...) are never an error: a per-frame
  ``n_<x>`` becomes a share beside the uncertain share, other numeric columns
  are pooled by their mean and drawn as "further columns", text columns are
  listed with their distinct values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.service.rows import parse_times

#: columns whose meaning the report knows (besides n_/frac_/state_ per class and state)
KNOWN = {
    "experiment", "well", "field", "timepoint", "acquired_at", "processed_at", "instrument", "pixel_size_um",
    "pixel_size_source", "n_cells", "n_uncertain", "mean_certainty", "control_channel", "control_area_um2",
    "control_area_fraction", "control_regions", "missing_channels", "seconds_total", "sources",
}
DEATH_STATES = ("apoptotic", "dead")


@dataclass
class Experiment:
    """One experiment's rows and the per-well, per-timepoint table the figures draw."""

    name: str
    rows: Any  # DataFrame: the CSV rows of this experiment, as read
    wells: list[str]
    classes: list[str]
    states: list[str]  # canonical states present as state_ columns
    shares: list[str]  # extra n_<x> columns shown as shares (uncertain first)
    extra_numeric: list[str]
    extra_text: dict[str, list[str]]
    time_label: str
    table: Any  # DataFrame: one row per (well, timepoint)
    death_states: tuple[str, ...] = DEATH_STATES
    notes: list[str] = field(default_factory=list)


def classes_of(columns: Sequence[str]) -> list[str]:
    """Class names: ``x`` for every ``n_x`` that has a ``frac_x`` beside it, in column order."""
    cols = set(columns)
    return [c[2:] for c in columns if c.startswith("n_") and f"frac_{c[2:]}" in cols]


def experiments(df: Any, death_states: Sequence[str] = DEATH_STATES) -> list[Experiment]:
    """Split the counts table into experiments and pool each one per well and timepoint (module docstring)."""
    out = []
    for name, rows in df.groupby("experiment", sort=True):
        out.append(_experiment(str(name), rows, tuple(death_states)))
    return out


def _num(s: Any) -> Any:
    import pandas as pd

    return pd.to_numeric(s, errors="coerce")


def _experiment(name: str, rows: Any, death_states: tuple[str, ...]) -> Experiment:
    import pandas as pd

    cols = list(rows.columns)
    classes = classes_of(cols)
    states = [c[6:] for c in cols if c.startswith("state_")]
    shares = ["uncertain"] if "n_uncertain" in cols else []
    shares += [c[2:] for c in cols if c.startswith("n_") and c not in ("n_cells", "n_uncertain") and c[2:] not in classes]
    known = KNOWN | {f"n_{c}" for c in classes} | {f"frac_{c}" for c in classes} | {f"state_{s}" for s in states} | {f"n_{s}" for s in shares}
    extra_numeric, extra_text = [], {}
    for c in cols:
        if c in known:
            continue
        v = _num(rows[c])
        if v.notna().any() and v.notna().sum() >= rows[c].replace("", np.nan).notna().sum():
            extra_numeric.append(c)
        else:
            extra_text[c] = sorted({str(x) for x in rows[c].dropna().unique()})[:20]
    r = rows.copy()
    r["timepoint"] = _num(r["timepoint"]).astype("Int64")
    r["n_cells"] = _num(r["n_cells"]).fillna(0)
    if "acquired_at" in r:
        acq, clock = parse_times(r["acquired_at"])
    else:
        acq, clock = pd.Series(pd.NaT, index=r.index), ""
    timed = bool(len(r)) and bool(acq.notna().all())
    notes = []
    if timed and clock == "local":
        notes.append("Acquisition times are the instrument's local time, as its files give them (no time zone).")
    elif timed and clock == "mixed":
        notes.append("Some acquisition times carry a time zone and some do not: zoned ones are shown in UTC, "
                     "the others as the instrument wrote them.")
    if not timed:
        notes.append("No acquisition time in the CSV for every frame: time axes show the timepoint number.")
    elif acq.nunique() < 2 and r["timepoint"].nunique() > 1:  # every frame at one instant: hours would all be 0
        timed = False
        notes.append("Every frame has the same acquisition time: time axes show the timepoint number instead.")
    death_cols = [f"state_{s}" for s in death_states if f"state_{s}" in cols]
    if not death_cols:  # no canonical columns (an old CSV): classes named like the states
        death_cols = [f"n_{s}" for s in death_states if f"n_{s}" in cols]
    sums = {"n_cells": r["n_cells"]}
    for c in classes:
        sums[f"n_{c}"] = _num(r[f"n_{c}"]).fillna(0)
    for s in states:
        sums[f"state_{s}"] = _num(r[f"state_{s}"]).fillna(0)
    for s in shares:
        sums[f"n_{s}"] = _num(r[f"n_{s}"]).fillna(0)
    summed = pd.DataFrame(sums)
    summed["_death"] = sum((_num(r[c]).fillna(0) for c in death_cols), pd.Series(0.0, index=r.index))
    summed["well"], summed["timepoint"] = r["well"].astype(str), r["timepoint"]
    summed["fields"] = 1
    summed["_acq"] = acq
    if "control_area_fraction" in r:
        summed["_ctl"] = _num(r["control_area_fraction"])
    for c in extra_numeric:
        summed[f"_x_{c}"] = _num(r[c])
    agg: dict[str, Any] = {c: "sum" for c in sums} | {"_death": "sum", "fields": "sum", "_acq": "min"}
    if "_ctl" in summed:
        agg["_ctl"] = "mean"
    agg |= {f"_x_{c}": "mean" for c in extra_numeric}
    g = summed.groupby(["well", "timepoint"], sort=True).agg(agg).reset_index()
    t = pd.DataFrame({"experiment": name, "well": g["well"], "timepoint": g["timepoint"].astype(int)})
    if timed:
        t0 = g["_acq"].min()
        t["acquired_at"] = g["_acq"].map(lambda x: x.isoformat())
        t["hours"] = ((g["_acq"] - t0).dt.total_seconds() / 3600.0).round(4)
    t["fields"] = g["fields"].astype(int)
    t["n_cells"] = g["n_cells"].astype(int)
    t["cells_per_frame"] = (g["n_cells"] / g["fields"]).round(2)
    n = g["n_cells"].where(g["n_cells"] > 0)
    for c in classes:
        t[f"n_{c}"] = g[f"n_{c}"].astype(int)
    for c in classes:
        t[f"frac_{c}"] = (g[f"n_{c}"] / n).fillna(0).round(4)
    for s in states:
        t[f"state_{s}"] = g[f"state_{s}"].astype(int)
    for s in shares:
        t[f"n_{s}"] = g[f"n_{s}"].astype(int)
        t[f"share_{s}"] = (g[f"n_{s}"] / n).fillna(0).round(4)
    t["death_fraction"] = (g["_death"] / n).fillna(0).round(4)
    if "_ctl" in g:
        t["control_area_fraction"] = g["_ctl"].round(5)
    for c in extra_numeric:
        t[c] = g[f"_x_{c}"]
    wells = sorted(t["well"].unique(), key=well_sort_key)
    return Experiment(
        name, rows, wells, classes, states, shares, extra_numeric, extra_text,
        "hours since first acquisition" if timed else "timepoint", t, tuple(death_states), notes,
    )


def time_of(e: Experiment) -> Any:
    """The x values of the per-well table: hours, or the timepoint number."""
    return e.table["hours"] if "hours" in e.table else e.table["timepoint"]


def well_position(well: str) -> tuple[int, int] | None:
    """(row, column), both from 0, of a plate well name such as ``A1``, ``B12``, ``AA3`` or ``C05``; None otherwise."""
    import re

    m = re.fullmatch(r"([A-Za-z]{1,2})0*(\d{1,3})", well.strip())
    if not m:
        return None
    letters, num = m.group(1).upper(), int(m.group(2))
    row = 0
    for ch in letters:
        row = row * 26 + (ord(ch) - 64)
    return row - 1, num - 1


def well_sort_key(well: str) -> tuple[int, int, int, str]:
    """Plate order (A1, A2, ..., A12, B1): positions first, other names after, by name."""
    p = well_position(well)
    return (0, p[0], p[1], well) if p else (1, 0, 0, well)


def last_timepoint(e: Experiment) -> Any:
    """Each well's row at its last timepoint."""
    t = e.table
    return t.loc[t.groupby("well")["timepoint"].idxmax()].set_index("well").loc[e.wells].reset_index()


def correlation(x: Any, y: Any) -> tuple[float, float, int]:
    """(Pearson r, Spearman rho, n) over the pairs where both are finite; NaN when undefined."""
    a, b = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = int(len(a))
    def flat(v: np.ndarray) -> bool:  # constant up to rounding (a mean of equal values is not always exactly equal)
        return bool(np.ptp(v) <= 1e-9 * max(1.0, float(np.abs(v).max())))

    if n < 3 or flat(a) or flat(b):
        return float("nan"), float("nan"), n

    def ranks(v: np.ndarray) -> np.ndarray:
        from scipy.stats import rankdata

        return np.asarray(rankdata(v), float)

    return float(np.corrcoef(a, b)[0, 1]), float(np.corrcoef(ranks(a), ranks(b))[0, 1]), n
