"""``cellmonitor report``: the run report a biologist reads, built from the counts CSV.

One page per experiment, ``<out>/<experiment>.html``, self-contained
(:mod:`monitor.report.page`), with per-well time courses of every class's
fraction (uncertain share shaded), the Otsu control signal against the
predicted death fraction and their correlation, cells per frame, a plate map
of the last timepoint's death fraction, further columns a newer CSV may
carry, a per-state gallery of cell crops by timepoint range, and overlays of
a few frames per well. The table behind each figure is embedded as a CSV
download and written to ``<out>/data/<experiment>/``.

The gallery and the overlays need the frames and the pipeline: they are made
when a config is given (its watch folder holds the frames named in the CSV's
``sources``; its segmenter, encoders and index classify them). From a CSV
alone the page says why there is no gallery.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.errors import BadInput
from monitor.imageio import png_bytes
from monitor.report import fates as fate_view
from monitor.report import figures
from monitor.report.data import DEATH_STATES, Experiment, experiments, last_timepoint
from monitor.report.gallery import Gallery, build_gallery
from monitor.report.overlay import border, class_colours, draw_scale_bar
from monitor.report.page import download, esc, figure, html_table, page, png_uri
from monitor.service.recording import UNRELIABLE_MIN_CELLS, UNRELIABLE_SHARE
from monitor.service.rows import read_counts

log = logging.getLogger(__name__)


@dataclass
class ReportResult:
    """What was written: one page per experiment, and why there is no gallery (None when there is one)."""

    pages: list[Path] = field(default_factory=list)
    no_gallery: str | None = None
    frames: int = 0
    mismatched: int = 0


def counts_path(cfg: Any) -> Path:
    """The CSV the config's csv sink writes (its ``path`` option, else ``<state_dir>/counts.csv``)."""
    for ref in cfg.sinks:
        if ref.name == "csv":
            p = (ref.options or {}).get("path")
            if p:
                path = Path(p)
                if not path.is_absolute() and cfg.source is not None and not path.exists():
                    path = Path(cfg.source).parent / path
                return path
    return Path(cfg.service.state_dir) / "counts.csv"


def build_report(
    counts_csv: Path,
    out: Path,
    cfg: Any = None,
    pipeline: Any = None,
    readers: Any = None,
    *,
    no_gallery: str | None = None,
    frames_per_well: int = 3,
    per_state: int = 8,
    death_states: Sequence[str] = DEATH_STATES,
    roles: dict[str, str] | None = None,
    progress: bool = True,
) -> ReportResult:
    """Write the report pages for every experiment of ``counts_csv`` into ``out`` (module docstring).

    ``cfg``, ``pipeline`` and ``readers`` (as the service builds them) make
    the gallery and overlays; without them ``no_gallery`` is the reason the
    page gives. Raises :class:`~monitor.errors.BadInput` when the CSV is not
    a counts CSV or holds no rows.
    """

    df = read_counts(counts_csv)
    if df.empty:
        raise BadInput(counts_csv, "no rows: nothing has been counted yet")
    out.mkdir(parents=True, exist_ok=True)
    res = ReportResult(no_gallery=no_gallery if pipeline is None else None)
    if pipeline is None and res.no_gallery is None:
        res.no_gallery = "no config given (the report was built from the CSV alone)"
    cells, cells_at = fate_view.load_cells(cfg, counts_csv)  # read once: the fates and the marker view share it
    fates, no_fates, plate = fate_view.load_fates(cfg, cells, cells_at)
    prep = index_preprocessing(cfg)
    trust = marker_cv_note(prep)
    strength = marker_strength(cfg, prep, cells)
    for e in experiments(df, death_states):
        if trust:
            e.notes.append(trust)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", e.name).strip("._") or "experiment"
        gallery = None
        if pipeline is not None:
            gallery = build_gallery(e, cfg, pipeline, readers, out / "overlays" / name, frames_per_well, per_state, roles, progress=progress)
            res.frames += len(gallery.frames)
            res.mismatched += sum(not f.matches for f in gallery.frames)
        path = out / f"{name}.html"
        by_marker = strength(e.name) if strength is not None else None
        path.write_text(render(e, counts_csv, out, name, gallery, res.no_gallery, roles, (fates, no_fates, plate), by_marker), encoding="utf-8")
        res.pages.append(path)
    return res


def _tables(e: Experiment) -> dict[str, Any]:
    """The table behind each figure: columns of the per-well table (the numbers drawn, nothing else)."""
    t = e.table
    tcols = [c for c in ("hours", "acquired_at") if c in t]
    key = ["experiment", "well", "timepoint", *tcols]
    shares = [c for s in e.shares for c in (f"n_{s}", f"share_{s}")]
    out = {
        "timecourse": t[key + ["fields", "n_cells"] + [f"n_{c}" for c in e.classes] + [f"frac_{c}" for c in e.classes] + shares],
        "cells_per_frame": t[key + ["fields", "n_cells", "cells_per_frame"]],
        "plate_map": last_timepoint(e)[["experiment", "well", "timepoint", "n_cells", "death_fraction"] + [f"state_{s}" for s in e.death_states if f"state_{s}" in t]],
    }
    if _has_control(e):
        out["control_vs_death"] = t[key + ["control_area_fraction", "death_fraction"] + [f"state_{s}" for s in e.death_states if f"state_{s}" in t] + ["n_cells"]]
    if e.extra_numeric:
        out["further_columns"] = t[key + e.extra_numeric]
    return out


def _has_control(e: Experiment) -> bool:
    return "control_area_fraction" in e.table and bool(e.table["control_area_fraction"].notna().any())


def index_preprocessing(cfg: Any) -> dict[str, Any]:
    """The config's index's ``preprocessing`` record (what ``--from-marker`` fitted and scored); {} without one."""
    from monitor.index.metafile import read_meta

    if cfg is None:
        return {}
    try:
        return read_meta(Path(cfg.classifier.index) / "meta.json").preprocessing or {}
    except ValueError:
        return {}  # no index (yet), or not one this version reads: the page has nothing to say about it


def marker_strength(cfg: Any, prep: dict[str, Any], cells: Any) -> Any:
    """experiment -> its table of label-free calls by marker strength (:mod:`monitor.report.marker_view`);
    None when the run has no marker rules or no per-cell rows."""
    from monitor.report.marker_view import marker_rules, strength_table

    rules, margin = marker_rules(cfg, prep)
    if not rules or cells is None or cells.empty:
        return None
    return lambda name: strength_table(cells[cells["experiment"].astype(str) == str(name)], rules, margin)


def marker_cv_note(prep: dict[str, Any]) -> str:
    """What the config's index said when it was built ``--from-marker`` (``prep``: its preprocessing
    record): its cross-validation against the death marker, i.e. how far label-free calls go ("" without one)."""
    from monitor.index.from_marker import describe_cv

    cv = prep.get("marker_cv")
    if not isinstance(cv, dict) or not cv:
        return ""
    line = describe_cv(cv)
    return (line[0].upper() + line[1:] + ". That is how far the state calls on this page can be expected to agree with the "
            "death marker on cells like the references.")


def unreliable_banner(e: Experiment) -> str:
    """A banner naming the frames (well, timepoint) where half or more of the cells are unknown or uncertain; "" when none."""
    t = e.table
    cols = [c for c in ("share_unknown", "share_uncertain") if c in t]
    if not cols:
        return ""
    bad = t[(t[cols].max(axis=1) >= UNRELIABLE_SHARE) & (t["n_cells"] >= UNRELIABLE_MIN_CELLS)]
    if bad.empty:
        return ""
    where = ", ".join(f"{w} t{int(tp)}" for w, tp in list(zip(bad["well"], bad["timepoint"], strict=True))[:12])
    more = f" and {len(bad) - 12} more" if len(bad) > 12 else ""
    return (f"<p class='banner' style='background:#fde2e1;border:2px solid #c0392b;padding:.6em;font-weight:bold'>"
            f"Counts unreliable in {len(bad)} frame(s): half or more of their cells are unknown or uncertain ({esc(where)}{more}). "
            "Does the reference index fit these cells?</p>")


def render(e: Experiment, src: Path, out: Path, name: str, gallery: Gallery | None, no_gallery: str | None, roles: dict[str, str] | None = None,
           fates: tuple[Any, str, Any] | None = None, by_marker: Any = None) -> str:
    """The HTML page of one experiment (and its data CSVs under ``out/data/<name>/``); ``fates``:
    the derived track tables, why there are none, and the plate map (monitor.report.fates);
    ``by_marker``: its cells' label-free calls by marker strength (monitor.report.marker_view)."""
    colours = class_colours(e.classes, roles)
    tables = _tables(e)
    if by_marker is not None:
        tables["calls_by_marker"] = by_marker
    data_dir = out / "data" / name
    data_dir.mkdir(parents=True, exist_ok=True)
    csv_text: dict[str, str] = {}
    for k, df in tables.items():
        csv_text[k] = df.to_csv(index=False)
        (data_dir / f"{k}.csv").write_text(csv_text[k], encoding="utf-8")
    rows_csv = e.rows.to_csv(index=False)
    (data_dir / "counts.csv").write_text(rows_csv, encoding="utf-8")

    def dl(k: str) -> str:
        return download(f"{name}_{k}.csv", csv_text[k], f"{k}.csv")

    sections, nav = [], []
    # ---- summary
    last = last_timepoint(e)
    tps = sorted(e.table["timepoint"].unique())
    unsure = [f"share_{k}" for k in ("unknown", "uncertain") if f"share_{k}" in last]
    summary = last[["well", "timepoint", "n_cells", "death_fraction"] + [f"frac_{c}" for c in e.classes] + unsure].rename(
        columns={"timepoint": "last timepoint", "share_unknown": "unknown share", "share_uncertain": "uncertain share"})
    banner = unreliable_banner(e)
    legend = "".join(f"<span class='swatch' style='background:rgb{colours[c]}'></span>{esc(c)}" for c in e.classes)
    notes = "".join(f"<p class='note'>{esc(n)}</p>" for n in e.notes)
    text_cols = "".join(f"<p class='cap'><b>{esc(k)}</b>: {esc(', '.join(v))}</p>" for k, v in e.extra_text.items() if v)
    empty = [k for k, v in e.extra_text.items() if not v]
    if empty:
        text_cols += f"<p class='cap'>Columns empty in this run: {esc(', '.join(empty))}.</p>"
    sections.append(
        "<section id='summary'><h2>Summary</h2>"
        f"<p>{len(e.wells)} well(s), {len(e.rows)} frame(s), timepoints {tps[0]}–{tps[-1]}; classes: {legend}</p>"
        f"{banner}<p class='cap'>death fraction = share of cells called {esc(' + '.join(e.death_states))}; unknown and uncertain "
        f"cells are counted in the state they were called (their shares are beside them, so an unreliable well shows).</p>{notes}{text_cols}"
        + html_table(summary, 200).replace("<details>", "<details open>") + download(f"{name}_counts.csv", rows_csv, "all counts rows of this experiment (counts.csv)")
        + "</section>"
    )
    nav.append(("summary", "Summary"))
    # ---- time courses
    ov_links = " · ".join(f"<a href='#ov-{esc(w)}'>{esc(w)}</a>" for w in e.wells) if gallery and gallery.frames else ""
    shares = ", ".join(e.shares)
    sections.append(
        "<section id='timecourses'><h2>Time courses per well</h2>"
        + figure(
            figures.timecourses(e, colours), "fraction of each state against time, per well",
            f"Fraction of the well's cells in each class against {esc(e.time_label)} (fields pooled)."
            + (" Grey band: the uncertain share (cells whose certainty is below the floor; they keep their call and are counted in it)." if "uncertain" in e.shares else "")
            + (f" Dotted: {esc(shares)} share." if [s for s in e.shares if s != "uncertain"] else "")
            + (f" Overlays of frames: {ov_links}." if ov_links else ""),
            [dl("timecourse")], html_table(tables["timecourse"]),
        )
        + "</section>"
    )
    nav.append(("timecourses", "Time courses"))
    # ---- control
    if _has_control(e):
        png, r, rho, n = figures.control(e)
        sections.append(
            "<section id='control'><h2>Control signal against predicted death</h2>"
            + figure(png, "control area fraction against predicted death fraction",
                     f"Otsu control area fraction of the fluorescence channel against the predicted {esc(' + '.join(e.death_states))} fraction, "
                     "every well and timepoint: " + (f"Pearson r = {r:.3f}, Spearman ρ = {rho:.3f}, n = {n}." if n >= 3 and np.isfinite(r) and np.isfinite(rho)
                                                    else f"correlation undefined (n = {n}: too few pairs, or one of the two does not vary)."),
                     [dl("control_vs_death")], html_table(tables["control_vs_death"]))
            + "</section>"
        )
    else:
        sections.append("<section id='control'><h2>Control signal against predicted death</h2><p class='note'>No control (Otsu) signal in the CSV: the run had no fluorescence control channel.</p></section>")
    nav.append(("control", "Control"))
    # ---- cells per frame
    sections.append(
        "<section id='cells'><h2>Cells per frame</h2>"
        + figure(figures.cells_per_frame(e), "cells per frame against time", "Segmented cells per frame (mean over the well's fields).", [dl("cells_per_frame")], html_table(tables["cells_per_frame"]))
        + "</section>"
    )
    nav.append(("cells", "Cells"))
    # ---- label-free calls by marker strength
    if by_marker is not None:
        sections.append(
            "<section id='by-marker'><h2>Label-free calls by marker strength</h2><p class='cap'>Every cell of the per-cell table, "
            "binned by its death-marker value (the rule's units) around the rule's threshold, and the share the label-free call "
            "puts in the marker's state. A share that rises with the marker says the label-free call sees death that has gone "
            "far; the cells just past the threshold are the ones the marker sees first.</p>"
            + dl("calls_by_marker") + html_table(by_marker).replace("<details>", "<details open>") + "</section>")
        nav.append(("by-marker", "By marker"))
    # ---- plate map
    sections.append(
        "<section id='plate'><h2>Plate map</h2>"
        + figure(figures.plate_map(e), "plate map of the death fraction", f"Death fraction ({esc(' + '.join(e.death_states))}) at each well's last timepoint; grey: no such well.", [dl("plate_map")], html_table(tables["plate_map"]))
        + "</section>"
    )
    nav.append(("plate", "Plate map"))
    # ---- tracks, survival, EC50 and dose response
    if fates is not None:
        html, more = fate_view.section(fates[0], fates[1], fates[2], e.name, name, data_dir,
                                       "hours" if e.time_label != "timepoint" else "timepoint")
        sections.append(html)
        nav += more
    # ---- further columns
    if e.extra_numeric:
        figs = "".join(f"<h3>{esc(c)}</h3>" + figure(figures.extra_column(e, c), c, f"{esc(c)}: mean over the well's fields.", []) for c in e.extra_numeric)
        sections.append("<section id='extra'><h2>Further columns</h2><p class='cap'>Columns of the CSV this report has no special view for.</p>" + figs + dl("further_columns") + html_table(tables["further_columns"]) + "</section>")
        nav.append(("extra", "Further columns"))
    # ---- gallery and overlays
    sections.append(_gallery_section(e, gallery, no_gallery, colours, out, name))
    nav.append(("gallery", "Gallery"))
    if gallery is not None:
        sections.append(_overlay_section(e, gallery, out))
        nav.append(("overlays", "Overlays"))
    nav.append(("data", "Data"))
    files = "".join(f"<li><a href='{esc((data_dir / f'{k}.csv').relative_to(out).as_posix())}'>{esc(k)}.csv</a></li>" for k in sorted({*tables, "counts", *(q.stem for q in data_dir.glob("*.csv"))}))
    sections.append(f"<section id='data'><h2>Data</h2><p class='cap'>Source: {esc(src)}. Every table is embedded above as a download and written beside this page:</p><ul>{files}</ul></section>")
    return page(f"cellmonitor run report: {e.name}", [f"{len(e.wells)} wells · {len(e.rows)} frames · {esc(e.time_label)}", f"from {esc(src)}"], nav, sections)


def _gallery_section(e: Experiment, g: Gallery | None, no_gallery: str | None, colours: dict[str, tuple[int, int, int]], out: Path, name: str) -> str:
    head = "<section id='gallery'><h2>Cells behind the counts</h2>"
    if g is None:
        return head + f"<p class='note'>No gallery: {esc(no_gallery or 'not requested')}. Give the service's config (<code>cellmonitor report CONFIG</code>) to see the cells.</p></section>"
    parts = [head, "<p class='cap'>Sample crops, as the encoders saw them (the service's crop path), of frames re-read and re-classified with the config's pipeline; "
             "border: the call; caption: well, timepoint, certainty (? = uncertain).</p>"]
    bad = [f for f in g.frames if not f.matches]
    if bad:
        parts.append("<p class='warn'>Re-classified counts differ from the CSV for " + ", ".join(f"{esc(f.well)}/t{f.timepoint}" for f in bad)
                     + ": the index or config changed since these frames were counted; the crops show today's calls.</p>")
    if g.missing:
        parts.append(f"<p class='note'>Frame files not found in the watch folder for {len(g.missing)} frame(s): {esc(', '.join(g.missing[:10]))}.</p>")
    if g.failed:
        parts.append("<p class='warn'>Frames that could not be processed: " + esc("; ".join(g.failed[:10])) + "</p>")
    if not g.frames:
        return "".join(parts) + "</section>"
    ranges = g.ranges
    parts.append(f"<div class='grid-ranges' style='--n:{len(ranges)}'><div></div>" + "".join(f"<div><b>{'timepoint' if a == b else 'timepoints'} {a}{'' if a == b else f'–{b}'}</b></div>" for a, b in ranges))
    for c in e.classes:
        parts.append(f"<div class='lab'><span class='swatch' style='background:rgb{colours[c]}'></span>{esc(c)}</div>")
        for ri in range(len(ranges)):
            cells = g.cells.get((c, ri), [])
            items = []
            for gc in cells:
                crop = border(gc.crop, colours.get(gc.label, (128, 128, 128)), max(2, gc.crop.shape[0] // 56))
                if g.crop_pixel_size_um:
                    crop = draw_scale_bar(crop, g.crop_pixel_size_um, corner="bottom-right")
                q = " uncertain" if gc.uncertain else ""
                q += " <b>unknown</b>" if gc.unknown else ""
                items.append(f"<div class='cell'><img alt='{esc(c)} cell' src='{png_uri(png_bytes(crop))}'>{esc(gc.well)} t{gc.timepoint} #{gc.cell_id}<br>{gc.certainty:.2f}{q}</div>")
            parts.append("<div class='row'>" + ("".join(items) or "<span class='cap'>none</span>") + "</div>")
    parts.append("</div>")
    import pandas as pd

    rows = [{"well": gc.well, "field": gc.field, "timepoint": gc.timepoint, "cell_id": gc.cell_id, "label": gc.label, "certainty": round(gc.certainty, 4),
             "uncertain": gc.uncertain, "centroid_y_px": round(gc.centroid_yx_px[0], 1), "centroid_x_px": round(gc.centroid_yx_px[1], 1), "time_range": ri}
            for (_, ri), cells in sorted(g.cells.items()) for gc in cells]
    df = pd.DataFrame(rows)
    text = df.to_csv(index=False)
    (out / "data" / name / "gallery.csv").write_text(text, encoding="utf-8")
    parts.append(download(f"{name}_gallery.csv", text, "gallery.csv (the cells shown)"))
    return "".join(parts) + "</section>"


def _overlay_section(e: Experiment, g: Gallery, out: Path) -> str:
    parts = ["<section id='overlays'><h2>Overlays</h2><p class='cap'>Each cell's outline in its state's colour (white dot: uncertain), "
             "scale bar from the frame's pixel size. Click a thumbnail for the full-size PNG.</p>"]
    for w in e.wells:
        frames = [f for f in g.frames if f.well == w]
        if not frames:
            continue
        parts.append(f"<h3 id='ov-{esc(w)}'>{esc(w)}</h3><div class='row'>")
        for f in frames:
            rel = f.overlay_path.relative_to(out).as_posix()
            counts = ", ".join(f"{k} {v}" for k, v in f.counts.items())
            flag = "" if f.matches else " <b>(differs from CSV)</b>"
            parts.append(f"<div class='ov'><a href='{esc(rel)}'><img alt='overlay {esc(w)} t{f.timepoint}' src='{png_uri(png_bytes(f.thumbnail))}'></a>"
                         f"field {esc(f.field)}, t{f.timepoint}: {esc(counts)}{flag}</div>")
        parts.append("</div>")
    return "".join(parts) + "</section>"
