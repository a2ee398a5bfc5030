"""The report's view of cells through time: tracks over the frame, survival curves, EC50 over
time and dose-response curves (from the per-cell table with tracks, :mod:`monitor.fate`).

Policy
------
* The per-cell table is the cells sink's folder: the config's (``[[sinks]] cells``
  ``folder`` option, else ``<state_dir>/cells``), or ``cells/`` beside the counts
  CSV when the report is built from the CSV alone. No folder, or rows without
  ``track_id``: the section says so, and the rest of the report is unchanged.
* Raw per-frame counts stay the record of truth (the report's other sections);
  everything here is derived and labelled smoothed where it is.
* Fits that are not usable are listed with their reason, never left out.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from monitor.fate.doseresponse import logistic4
from monitor.fate.fates import fate_tables, survival_curves
from monitor.fate.platemap import PlateMap, parse_plate_map
from monitor.report.figures import _plt, _png, _well_colours
from monitor.report.page import download, esc, figure, html_table

log = logging.getLogger(__name__)

STATE_RGB = {"live": (0.16, 0.6, 0.3), "apoptotic": (0.95, 0.6, 0.1), "dead": (0.75, 0.15, 0.15), "necrotic": (0.45, 0.2, 0.55)}


def cells_folder(cfg: Any, counts_csv: Path) -> Path:
    """Where the per-cell table is (module docstring)."""
    if cfg is not None:
        for ref in cfg.sinks:
            if ref.name == "cells":
                folder = (ref.options or {}).get("folder")
                return Path(folder) if folder else Path(cfg.service.state_dir) / "cells"
        return Path(cfg.service.state_dir) / "cells"
    return counts_csv.parent / "cells"


def load_cells(cfg: Any, counts_csv: Path) -> tuple[Any, Path]:
    """The run's per-cell rows (None when there is no per-cell table) and where they are."""
    from monitor.fate.table import read_cells

    folder = cells_folder(cfg, counts_csv)
    return (read_cells(folder) if folder.is_dir() else None), folder


def load_fates(cfg: Any, cells: Any, folder: Path) -> tuple[dict[str, Any] | None, str, PlateMap | None]:
    """The derived tables of every experiment (or None) and why there are none, from :func:`load_cells`'s rows."""
    if cells is None:
        return None, f"no per-cell table at {folder} (add the cells sink to the config's [[sinks]] for tracks and fates)", None
    if "track_id" not in cells or cells["track_id"].isna().all():
        return None, f"the per-cell rows at {folder} carry no track ids ([tracking] enabled = false, or laptrack missing)", None
    tracking = getattr(cfg, "tracking", None)
    plate = None
    if tracking is not None and tracking.plate_map is not None:
        plate = parse_plate_map(tracking.plate_map)
    return fate_tables(cells, tracking, plate), "", plate


def _tracks_figure(tracks: Any, max_wells: int = 4) -> bytes:
    plt = _plt()
    every = sorted(tracks["well"].unique())
    # up to four wells spread over the plate (first, last and between: a dose series shows its range)
    wells = sorted({every[round(i * (len(every) - 1) / max(1, max_wells - 1))] for i in range(min(max_wells, len(every)))})
    fig, axes = plt.subplots(1, len(wells), figsize=(3.4 * len(wells), 3.4), squeeze=False)
    for ax, w in zip(axes[0], wells, strict=True):
        sub = tracks[tracks["well"] == w]
        fld = sorted(sub["field"].unique())[0]
        sub = sub[sub["field"] == fld]
        for _, g in sub.groupby("track_id"):
            g = g.sort_values("timepoint")
            st = g["smoothed_state"].to_numpy()
            x, y = g["centroid_x_um"].to_numpy(), g["centroid_y_um"].to_numpy()
            ax.plot(x, y, "-", lw=0.8, color=(0.5, 0.5, 0.5))
            ax.scatter(x, y, s=6, c=[STATE_RGB.get(s, (0.3, 0.3, 0.3)) for s in st], zorder=3)
            ax.plot(x[-1:], y[-1:], "o", ms=5, mfc="none", color=STATE_RGB.get(st[-1], (0.3, 0.3, 0.3)))
        ax.set_title(f"{w}, field {fld}: {sub['track_id'].nunique()} tracks", fontsize=9)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xlabel("x (µm)")
        ax.set_ylabel("y (µm)")
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=s) for s, c in STATE_RGB.items()]
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", ncol=4, frameon=False, bbox_to_anchor=(0.5, 0.0), title="smoothed state")
    return _png(fig)


def _survival_figure(curves: dict[str, Any], time_label: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    colours = _well_colours(list(curves))
    for w, km in curves.items():
        ax.step(km.times_h, km.survival, where="post", color=colours[w], label=f"{w} (n={km.n})")
        ax.fill_between(km.times_h, km.lower, km.upper, step="post", color=colours[w], alpha=0.12, lw=0)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(time_label)
    ax.set_ylabel("surviving share of tracks")
    ax.legend(fontsize=7, ncol=2, frameon=False, loc="lower left")
    return _png(fig)


def _ec50_figure(dr: Any, unit: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for (compound, measure), g in dr.groupby(["compound", "measure"]):
        ok = g[g["ok"]]
        if len(ok):
            err = np.vstack([ok["ec50"] - ok["ec50_low"], ok["ec50_high"] - ok["ec50"]])
            ax.errorbar(ok["timepoint"], ok["ec50"], yerr=err, fmt="o-" if measure == "dead" else "s--", capsize=3, label=f"{compound}, {measure}")
    if ax.has_data():
        ax.set_yscale("log")
        ax.legend(fontsize=7, frameon=False)
    else:
        ax.text(0.5, 0.5, "no usable fit yet (see the table)", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("timepoint")
    ax.set_ylabel(f"EC50 ({unit})")
    return _png(fig)


def _dose_figure(counts: Any, dr: Any, plate: PlateMap) -> bytes:
    from monitor.fate.fates import well_fractions
    from monitor.readkit import well_name

    plt = _plt()
    fr = well_fractions(counts)
    fr["well_key"] = fr["well"].map(lambda w: well_name(str(w)))
    compounds = plate.compounds()
    last = int(fr["timepoint"].max())
    tps = sorted({int(t) for t in np.linspace(fr["timepoint"].min(), last, 3).round()})
    fig, axes = plt.subplots(1, max(1, len(compounds)), figsize=(4.6 * max(1, len(compounds)), 3.4), squeeze=False)
    controls = set(plate.controls())
    for ax, compound in zip(axes[0], compounds, strict=False):
        wells = {w for w, x in plate.wells.items() if x.compound == compound}
        conc = {w: plate.wells[w].concentration for w in wells}
        pos = [c for c in conc.values() if c > 0]
        lo = min(pos) / 3 if pos else 0.01
        cmap = plt.get_cmap("viridis")
        for i, tp in enumerate(tps):
            col = cmap(i / max(1, len(tps) - 1))
            g = fr[(fr["timepoint"] == tp) & fr["well_key"].isin(wells | controls)]
            x = np.array([conc.get(w, 0.0) for w in g["well_key"]])
            xs = np.where(x > 0, x, lo)
            ax.plot(xs, g["dead_fraction"], "o", color=col, label=f"t{tp}")
            row = dr[(dr["compound"] == compound) & (dr["timepoint"] == tp) & (dr["measure"] == "dead")]
            if len(row) and bool(row["ok"].iloc[0]):
                r = row.iloc[0]
                grid = np.logspace(np.log10(lo), np.log10(max(pos) * 3 if pos else 1), 100)
                ax.plot(grid, logistic4(grid, r.bottom, r.top, np.log10(r.ec50), r.hill), "-", color=col)
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{compound}: dead fraction (smoothed)", fontsize=9)
        ax.set_xlabel(f"concentration ({plate.wells[next(iter(wells))].unit}); controls at the left edge" if wells else "concentration")
        ax.set_ylabel("dead fraction")
        ax.legend(fontsize=7, frameon=False)
    return _png(fig)


def section(tables: dict[str, Any] | None, why: str, plate: PlateMap | None, experiment: str, name: str,
            data_dir: Path, time_label: str = "hours") -> tuple[str, list[tuple[str, str]]]:
    """The HTML of the tracks-and-fates sections of one experiment, and their nav entries."""
    if tables is None:
        return (f"<section id='tracks'><h2>Tracks and fates</h2><p class='note'>No tracks: {esc(why)}.</p></section>",
                [("tracks", "Tracks")])
    t = {k: v[v["experiment"] == experiment] if "experiment" in v else v for k, v in tables.items()}
    if t["tracks"].empty:
        return "<section id='tracks'><h2>Tracks and fates</h2><p class='note'>No tracked cells in this experiment.</p></section>", [("tracks", "Tracks")]
    csvs: dict[str, str] = {}
    for k in ("fates", "smoothed_counts", "survival", "dose_response"):
        if k in t:
            csvs[k] = t[k].to_csv(index=False)
            (data_dir / f"{k}.csv").write_text(csvs[k], encoding="utf-8")

    def dl(k: str) -> str:
        return download(f"{name}_{k}.csv", csvs[k], f"{k}.csv")

    fates = t["fates"]
    n_div = int(fates["parent_track_id"].notna().sum()) if len(fates) else 0
    parts = ["<section id='tracks'><h2>Tracks over the frame</h2>"
             + figure(_tracks_figure(t["tracks"]), "cell tracks over the frame",
                      f"Each field's cells linked across timepoints (laptrack): {len(fates)} tracks, {n_div} daughter tracks after divisions. "
                      "Dots: centroids, coloured by the smoothed (one-way) state; ring: where the track ends. First field of up to four wells, "
                      "spread over the plate.",
                      [dl("fates")], html_table(fates))
             + "</section>"]
    nav = [("tracks", "Tracks")]
    surv = t["survival"]
    curves = survival_curves(fates)
    if curves:
        note = "" if plate is not None and plate.controls() else " No plate map with control wells: no log-rank test."
        parts.append("<section id='survival'><h2>Survival</h2>"
                     + figure(_survival_figure(curves, time_label), "Kaplan-Meier survival per well",
                              "Kaplan-Meier curves per well (time from a track's first frame to its smoothed time of death; "
                              "tracks that end alive are censored; 95% log(-log) band). Table: median time to death with its 95% "
                              "interval (empty: not reached) and the log-rank test against the pooled control wells." + note,
                              [dl("survival")], html_table(surv))
                     + "</section>")
        nav.append(("survival", "Survival"))
    if "dose_response" in t and plate is not None:
        dr = t["dose_response"]
        bad = dr[~dr["ok"]]
        unit = next((x.unit for x in plate.wells.values() if not x.control), "uM")
        errs = "".join(f"<p class='warn'>plate map: {esc(line)}</p>" for line in plate.errors)
        parts.append("<section id='ec50'><h2>EC50 over time</h2>" + errs
                     + figure(_ec50_figure(dr, unit), "EC50 against timepoint",
                              "Four-parameter logistic fit of the smoothed dead fraction (and apoptotic + dead fraction) against "
                              "concentration, per compound and timepoint, with the control wells at concentration 0; bars: 95% interval. "
                              f"{len(bad)} of {len(dr)} fits are not usable; each is in the table with its reason.",
                              [dl("dose_response")], html_table(dr))
                     + "</section>")
        parts.append("<section id='dose'><h2>Dose-response curves</h2>"
                     + figure(_dose_figure(t["smoothed_counts"], dr, plate), "dose-response curves",
                              "Smoothed dead fraction per well against concentration at three timepoints, with the fitted curve where the fit is usable.",
                              [dl("smoothed_counts")])
                     + "</section>")
        nav += [("ec50", "EC50"), ("dose", "Dose response")]
    else:
        parts.append("<section id='ec50'><h2>EC50 over time</h2><p class='note'>No plate map ([tracking] plate_map in the config): "
                     "no dose response.</p></section>")
        nav.append(("ec50", "EC50"))
    return "".join(parts), nav
